"""Loader of the C++/CUDA extension (its sources: csrc/ beside this file, package data).

load_extension() returns the module, trying in order: the prebuilt `hrpo_kernels._C`
(setup.py with CUDA), a JIT build of csrc/ (the CUDA kernels when torch sees CUDA and nvcc
exists, else the C++ twins only, built with -DHRPO_CPU_ONLY), else None after one warning: the
ops then use their pure-torch references. The result is cached. HRPO_EXT_NO_JIT=1 skips the JIT
build; HRPO_EXT_BUILD_DIR sets its root folder.

A JIT build is keyed by everything its output depends on (build_key: the sources' and headers'
content, the flags, torch/CUDA/Python versions), so checkouts and venvs sharing one root never
load each other's stale builds. It compiles into a private temporary folder and is published by
one rename to <root>/hrpo_kernels_ext_{cpu,cuda}_<key[:12]>; a published build is imported
straight from its file, without a compiler.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

from ._common import forced_reference, on_gpu_path

CSRC = Path(__file__).resolve().parent / "csrc"  # inside the package: wheels and sdists carry it
CPU_SOURCES = (
    "bindings.cpp",
    "topk_sample_cpu.cpp",
    "step_controller_cpu.cpp",
    "gated_blend_cpu.cpp",
    "decode_body_cpu.cpp",
)
# A CPU-only build's own: the bf16 CPU lm-head (ATen's brgemm API moves between torch releases,
# and a GPU machine's model never needs it: a build there does not depend on it).
CPU_ONLY_SOURCES = ("lm_head_cpu.cpp",)
CUDA_SOURCES = ("topk_sample.cu", "step_controller.cu")


def build_sources(cpu_only: bool) -> tuple[str, ...]:
    """The csrc/ files a build compiles."""
    return CPU_SOURCES + (CPU_ONLY_SOURCES if cpu_only else CUDA_SOURCES)


KEYED_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")  # every file of csrc/ a build can read
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]  # no FMA contraction: the twins' floats match the
# kernels'; OpenMP: at::parallel_for in the C++ decoder body runs serially without it
NVCC_FLAGS = ["-O3", "-lineinfo"]  # torch picks the -std
LD_FLAGS = ["-fopenmp"]
STALE_AFTER_S = 24 * 3600.0  # a temporary or set-aside folder this old was left by a killed process

_UNSET = object()
_cached = _UNSET
last_build_seconds: float | None = None  # the last build_extension call: compile + import, or import alone


def cuda_buildable() -> bool:
    return torch.cuda.is_available() and shutil.which("nvcc") is not None and torch.version.cuda is not None


def build_key(
    cpu_only: bool, cflags: list[str], cuda_cflags: list[str], ldflags: list[str], csrc: str | os.PathLike | None = None
) -> str:
    """sha256 (hex) of what a build's output depends on: the content of every source and header
    in csrc/ (an edited header must rebuild too), which sources are compiled, the flags, and the
    torch, CUDA and Python versions/ABI the module binds to. The checkout's path is not in it."""
    csrc = Path(csrc) if csrc is not None else CSRC
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in KEYED_SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    compiled = build_sources(cpu_only)
    digest.update(
        repr(
            (
                compiled,
                cpu_only,
                cflags,
                cuda_cflags,
                ldflags,
                torch.__version__,
                torch.version.cuda,
                sys.implementation.cache_tag,
                getattr(sys, "abiflags", ""),
                sysconfig.get_config_var("EXT_SUFFIX"),
            )
        ).encode()
    )
    return digest.hexdigest()


def build_root(build_directory: str | os.PathLike | None = None) -> Path:
    """The folder holding published builds: build_directory, else HRPO_EXT_BUILD_DIR, else our
    subfolder of torch's extension root (TORCH_EXTENSIONS_DIR or its default under ~/.cache)."""
    chosen = build_directory or os.environ.get("HRPO_EXT_BUILD_DIR")
    if chosen:
        return Path(chosen)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "hrpo_kernels"


def build_extension(
    cpu_only: bool | None = None,
    build_directory: str | os.PathLike | None = None,
    extra_cflags: list[str] | None = None,
    verbose: bool = False,
):
    """The module of csrc/ built with these settings: imported from its published build when the
    root holds one, else compiled, published and imported (raises on a build error)."""
    global last_build_seconds
    start = time.perf_counter()
    if cpu_only is None:
        cpu_only = not cuda_buildable()
    cflags = list(extra_cflags) if extra_cflags else list(CXX_FLAGS)
    if "-ffp-contract=off" not in cflags:
        cflags.append("-ffp-contract=off")
    if cpu_only:
        cflags.append("-DHRPO_CPU_ONLY")
    cuda_cflags = [] if cpu_only else list(NVCC_FLAGS)
    key = build_key(cpu_only, cflags, cuda_cflags, LD_FLAGS)
    final = build_root(build_directory) / f"hrpo_kernels_ext_{'cpu' if cpu_only else 'cuda'}_{key[:12]}"
    mod = _load_published(final)
    if mod is None:
        _compile_and_publish(final, cflags, cuda_cflags, cpu_only, verbose)
        mod = _import_so(_module_file(final))
    last_build_seconds = time.perf_counter() - start
    return mod


def _load_published(final: Path):
    """The module of a published build, or None when there is none. One that fails to load (a
    corrupt file) is renamed aside, with a warning, so that the caller rebuilds it."""
    if not final.is_dir():
        return None
    try:
        return _import_so(_module_file(final))
    except Exception as exc:  # ImportError/OSError from a truncated or foreign file
        aside = final.with_name(f".bad-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(
            f"hrpo_kernels: the extension build {final} failed to load ({reason}); "
            f"moving it aside to {aside.name} and rebuilding",
            RuntimeWarning,
            stacklevel=3,
        )
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another process moved it aside first
            pass
        return None


def _compile_and_publish(final: Path, cflags, cuda_cflags, cpu_only: bool, verbose: bool) -> None:
    """Compile into a private temporary folder beside `final` (same file system: the rename is
    atomic), then rename it to `final`, so a reader never sees a half-written module. When
    another process published first, the rename fails: keep theirs and delete ours."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    # a first build takes ~30-60 s: say why nothing happens
    print(
        f"hrpo_kernels: compiling the C++ extension ({final.name}) with ninja, once; it takes about a minute",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the published build from others sharing the root
    try:
        _compile(final.name, tmp, cflags, cuda_cflags, cpu_only, verbose)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left once published


def _compile(name: str, build_dir: Path, cflags, cuda_cflags, cpu_only: bool, verbose: bool) -> None:
    """torch's ninja JIT build of csrc/ into build_dir: <name>.so, whose init is PyInit_<name>
    (torch passes -DTORCH_EXTENSION_NAME=<name>; <name>_v<N> when this process already built
    <name> in another folder)."""
    from torch.utils.cpp_extension import load

    sources = [str(CSRC / s) for s in build_sources(cpu_only)]
    kwargs = {} if cpu_only else {"extra_cuda_cflags": list(cuda_cflags)}
    # is_python_module=False: build only (torch dlopens the file but imports nothing); the
    # module is imported from the published folder
    load(
        name=name,
        sources=sources,
        extra_cflags=list(cflags),
        extra_ldflags=list(LD_FLAGS),
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        with_cuda=not cpu_only,
        verbose=verbose,
        is_python_module=False,
        **kwargs,
    )


def _module_file(folder: Path) -> Path:
    """The module file in a build folder (see _compile for its name)."""
    suffix = ".pyd" if os.name == "nt" else ".so"
    found = sorted(folder.glob(f"{folder.name}*{suffix}"))
    if not found:
        raise ImportError(f"no {folder.name}{suffix} in {folder}")
    return found[0]


def _import_so(path: Path):
    """Import an extension module straight from its file (no torch, no compiler): its init
    function is PyInit_<file stem>."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _remove_stale(root: Path) -> None:
    """Delete temporary folders of killed builds and set-aside corrupt ones (readers never look
    at either; STALE_AFTER_S is far longer than any live build)."""
    cutoff = time.time() - STALE_AFTER_S
    for path in [*root.glob(".tmp-*"), *root.glob(".bad-*")]:
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


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
            warnings.warn(
                f"hrpo_kernels: C++/CUDA extension unavailable ({reason[0][:200]}); using the pure-torch fallback",
                RuntimeWarning,
                stacklevel=2,
            )
            mod = None
    elif mod is None:
        warnings.warn(
            "hrpo_kernels: C++/CUDA extension unavailable (HRPO_EXT_NO_JIT set); using the pure-torch fallback",
            RuntimeWarning,
            stacklevel=2,
        )
    _cached = mod
    return mod


def set_extension(mod) -> None:
    """Install a module (e.g. one a test built) as the cached extension; None clears the cache."""
    global _cached
    _cached = _UNSET if mod is None else mod


def ext_for(t, impl: str | None):
    """The module to run an op on tensor t with, or None for the reference.
    impl: None (CUDA tensors -> extension, CPU -> reference; CPU under HRPO_GPU_PATH=cpu -> the
    extension's C++ twins), "ext" (the extension on either device, an error if it is
    unavailable), "reference"."""
    if impl not in (None, "ext", "reference"):
        raise ValueError(f"impl must be None, 'ext' or 'reference', got {impl!r}")
    if impl == "reference" or (impl is None and forced_reference()):
        return None
    if impl is None and not on_gpu_path(t):
        return None
    mod = load_extension()
    if mod is None and impl == "ext":
        raise RuntimeError("hrpo_kernels: impl='ext' requested but the extension is unavailable")
    if mod is not None and t.is_cuda and not mod.has_cuda():
        if impl == "ext":
            raise RuntimeError("hrpo_kernels: the loaded extension is CPU-only")
        return None
    return mod
