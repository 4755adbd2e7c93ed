"""Loader of the C++/CUDA extension (csrc/).

load_extension() returns the module, trying in order: the prebuilt `hrpo_kernels._C`
(setup.py with CUDA), a ninja JIT build of csrc/ with torch.utils.cpp_extension.load (the
CUDA kernels when torch sees CUDA and nvcc exists, else the C++ twins only, built with
-DHRPO_CPU_ONLY), else None after one warning: the ops then use their pure-torch references.
The result is cached. HRPO_EXT_NO_JIT=1 skips the JIT build; HRPO_EXT_BUILD_DIR sets its folder.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from ._common import forced_reference

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("bindings.cpp", "topk_sample_cpu.cpp", "step_controller_cpu.cpp", "gated_blend_cpu.cpp",
               "decode_body_cpu.cpp")
CUDA_SOURCES = ("topk_sample.cu", "step_controller.cu")
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]  # no FMA contraction: the twins' floats match the
# kernels'; OpenMP: at::parallel_for in the C++ decoder body runs serially without it
NVCC_FLAGS = ["-O3", "-lineinfo"]  # torch picks the -std

_UNSET = object()
_cached = _UNSET
last_build_seconds: float | None = None


def cuda_buildable() -> bool:
    import torch

    return torch.cuda.is_available() and shutil.which("nvcc") is not None and torch.version.cuda is not None


def build_extension(cpu_only: bool | None = None, build_directory: str | os.PathLike | None = None,
                    extra_cflags: list[str] | None = None, verbose: bool = False):
    """JIT-compile csrc/ with ninja and return the module (raises on a build error)."""
    global last_build_seconds
    from torch.utils.cpp_extension import load

    if cpu_only is None:
        cpu_only = not cuda_buildable()
    cflags = list(extra_cflags) if extra_cflags else list(CXX_FLAGS)
    if "-ffp-contract=off" not in cflags:
        cflags.append("-ffp-contract=off")
    sources = [str(CSRC / s) for s in CPU_SOURCES]
    name = "hrpo_kernels_ext_cpu" if cpu_only else "hrpo_kernels_ext_cuda"
    kwargs = {}
    if cpu_only:
        cflags.append("-DHRPO_CPU_ONLY")
    else:
        sources += [str(CSRC / s) for s in CUDA_SOURCES]
        kwargs["extra_cuda_cflags"] = list(NVCC_FLAGS)
    build_directory = build_directory or os.environ.get("HRPO_EXT_BUILD_DIR")
    if build_directory:
        Path(build_directory).mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = str(build_directory)
    if not _built_before(name, build_directory):  # a first build takes ~30-60 s: say why nothing happens
        print(f"hrpo_kernels: compiling the C++ extension ({name}) with ninja, once; it takes about a minute",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    mod = load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
               extra_include_paths=[str(CSRC)], with_cuda=not cpu_only, verbose=verbose, **kwargs)
    last_build_seconds = time.perf_counter() - start
    return mod


def _built_before(name: str, build_directory) -> bool:
    """Whether torch's JIT build folder for `name` already holds a built module."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(build_directory) if build_directory else Path(_get_build_directory(name, False))
    except Exception:  # a private torch helper: if it moves, just say nothing
        return True
    return any(folder.glob(f"{name}*.so"))


def load_extension(**build_kwargs):
    """The extension module, or None (one warning) when neither the prebuilt module nor a JIT
    build is available. Cached: later calls return the first result."""
    global _cached
    if _cached is not _UNSET:
        return _cached
    mod = None
    try:
        mod = importlib.import_module("hrpo_kernels._C")
    except ImportError:
        mod = None
    if mod is None and os.environ.get("HRPO_EXT_NO_JIT", "") not in ("1", "true"):
        try:
            mod = build_extension(**build_kwargs)
        except Exception as exc:  # no compiler, no ninja, a build error: fall back
            reason = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            warnings.warn(f"hrpo_kernels: C++/CUDA extension unavailable ({reason[0][:200]}); using the pure-torch fallback",
                          RuntimeWarning, stacklevel=2)
            mod = None
    elif mod is None:
        warnings.warn("hrpo_kernels: C++/CUDA extension unavailable (HRPO_EXT_NO_JIT set); using the pure-torch fallback",
                      RuntimeWarning, stacklevel=2)
    _cached = mod
    return mod


def set_extension(mod) -> None:
    """Install a module (e.g. one a test built) as the cached extension; None clears the cache."""
    global _cached
    _cached = _UNSET if mod is None else mod


def ext_for(t, impl: str | None):
    """The module to run an op on tensor t with, or None for the reference.
    impl: None (CUDA tensors -> extension, CPU -> reference), "ext" (the extension on either
    device, an error if it is unavailable), "reference"."""
    if impl not in (None, "ext", "reference"):
        raise ValueError(f"impl must be None, 'ext' or 'reference', got {impl!r}")
    if impl == "reference" or (impl is None and forced_reference()):
        return None
    if impl is None and not t.is_cuda:
        return None
    mod = load_extension()
    if mod is None and impl == "ext":
        raise RuntimeError("hrpo_kernels: impl='ext' requested but the extension is unavailable")
    if mod is not None and t.is_cuda and not mod.has_cuda():
        if impl == "ext":
            raise RuntimeError("hrpo_kernels: the loaded extension is CPU-only")
        return None
    return mod
