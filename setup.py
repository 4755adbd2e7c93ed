# Metadata lives in pyproject.toml; this file adds the optional C++/CUDA extension
# `hrpo_kernels._C` (hrpo_kernels/csrc/, shipped as package data). It is built only when torch
# sees CUDA and nvcc is found, or when HRPO_BUILD_CUDA=1 forces it (HRPO_BUILD_CUDA=0 disables
# it). Otherwise the package installs without an extension and nothing is compiled;
# hrpo_kernels/_ext.py then JIT-builds those sources on first use, or falls back to the
# pure-torch references.
# torch must be importable at build time: `pip install --no-build-isolation -e .` on GPU hosts.
import os
import shutil

from setuptools import setup

CSRC = "hrpo_kernels/csrc"  # relative: setuptools rejects absolute source paths
SOURCES = [
    f"{CSRC}/bindings.cpp",
    f"{CSRC}/topk_sample_cpu.cpp",
    f"{CSRC}/step_controller_cpu.cpp",
    f"{CSRC}/gated_blend_cpu.cpp",
    f"{CSRC}/decode_body_cpu.cpp",
    f"{CSRC}/topk_sample.cu",
    f"{CSRC}/step_controller.cu",
]


def _cuda_extension():
    want = os.environ.get("HRPO_BUILD_CUDA", "").strip()
    if want == "0":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if want != "1" and not (torch.cuda.is_available() and nvcc and torch.version.cuda):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        name="hrpo_kernels._C",
        sources=SOURCES,
        include_dirs=[os.path.join(here, CSRC)],
        extra_compile_args={
            "cxx": ["-O3", "-ffp-contract=off", "-fopenmp"],  # the CPU twins' floats match the kernels'
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],  # at::parallel_for in the C++ decoder body
    )
    return ext, BuildExtension


_found = _cuda_extension()
if _found is None:
    setup()
else:
    setup(ext_modules=[_found[0]], cmdclass={"build_ext": _found[1].with_options(use_ninja=True)})
