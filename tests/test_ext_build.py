"""The extension's keyed, atomically published JIT build (hrpo_kernels/_ext.py): the key
follows every input of the build, racing builders publish one complete build, a corrupt or
stale build is never loaded, and a published build imports without a compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hrpo_kernels import _ext

REPO = Path(__file__).resolve().parent.parent
CPU_FLAGS = ["-O2", "-ffp-contract=off", "-DHRPO_CPU_ONLY"]
DEFAULT_CPU_FLAGS = _ext.CXX_FLAGS + ["-DHRPO_CPU_ONLY"]  # what build_extension(cpu_only=True) compiles with
CHUNKS = 8


def _payload(name: str) -> bytes:
    return f"fake module {name};".encode() * 64


class FakeBuild:
    """Stands in for the compiler and the importer. The fake compile writes its module file in
    chunks with pauses, so a folder read mid-build holds a partial file; the fake import accepts
    only a complete fake module and hands anything else to the real importer, which rejects it
    as it would a corrupt .so."""

    def __init__(self, monkeypatch, pause_s: float = 0.0):
        self.pause_s = pause_s
        self.compiled: list[Path] = []  # the build folders the compile step wrote into
        self._lock = threading.Lock()
        self._real_import = _ext._import_so
        monkeypatch.setattr(_ext, "_compile", self.compile)
        monkeypatch.setattr(_ext, "_import_so", self.import_so)

    def compile(self, name, build_dir, cflags, cuda_cflags, cpu_only, verbose):
        with self._lock:
            self.compiled.append(Path(build_dir))
        data = _payload(name)
        step = len(data) // CHUNKS + 1
        with open(Path(build_dir) / f"{name}.so", "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i : i + step])
                f.flush()
                time.sleep(self.pause_s)

    def import_so(self, path):
        if path.read_bytes() == _payload(path.stem):
            return SimpleNamespace(file=path, name=path.stem)
        return self._real_import(path)


def _published(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------------- the key


def test_key_follows_sources_headers_flags_and_versions(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(_ext.CSRC, csrc)

    def key(cpu_only=True, cflags=CPU_FLAGS):
        return _ext.build_key(cpu_only, cflags, [] if cpu_only else ["-O3"], _ext.LD_FLAGS, csrc=csrc)

    base = key()
    assert len(base) == 64 and key() == base  # nothing changed: same key
    # another checkout with the same sources shares the build: the path is not in the key
    assert _ext.build_key(True, CPU_FLAGS, [], _ext.LD_FLAGS) == base

    for name in ("philox.h", "decode_body_cpu.cpp", "topk_sample.cu"):  # a header, a source, a CUDA file
        original = (csrc / name).read_bytes()
        (csrc / name).write_bytes(original + b"\n// edited\n")
        assert key() != base, f"editing {name} kept the key"
        (csrc / name).write_bytes(original)
        assert key() == base, "the key follows content, not timestamps"

    (csrc / "new_helper.cuh").write_text("#pragma once\n")
    assert key() != base
    (csrc / "new_helper.cuh").unlink()

    assert key(cflags=["-O3", "-ffp-contract=off", "-DHRPO_CPU_ONLY"]) != base
    assert key(cpu_only=False) != base
    monkeypatch.setattr(torch, "__version__", "9.9.9+cpu")
    assert key() != base
    monkeypatch.undo()
    monkeypatch.setattr(torch.version, "cuda", "99.9")
    assert key() != base
    monkeypatch.undo()
    monkeypatch.setattr(sys, "abiflags", "t")  # a free-threaded CPython's ABI
    assert key() != base
    monkeypatch.undo()
    assert key() == base


def test_edited_source_gets_its_own_build_and_stale_one_is_not_loaded(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(_ext.CSRC, csrc)
    monkeypatch.setattr(_ext, "CSRC", csrc)
    fake = FakeBuild(monkeypatch)
    root = tmp_path / "root"

    first = _ext.build_extension(cpu_only=True, build_directory=root)
    key = _ext.build_key(True, DEFAULT_CPU_FLAGS, [], _ext.LD_FLAGS)
    assert first.file.parent == root / f"hrpo_kernels_ext_cpu_{key[:12]}"
    assert first.name == first.file.parent.name  # the module is named after its folder

    header = csrc / "step_row.h"
    original = header.read_bytes()
    header.write_bytes(original + b"\n// edited\n")
    second = _ext.build_extension(cpu_only=True, build_directory=root)
    assert len(fake.compiled) == 2 and second.file.parent != first.file.parent

    header.write_bytes(original)  # back to the first sources: their published build, no compile
    assert _ext.build_extension(cpu_only=True, build_directory=root).file == first.file
    assert len(fake.compiled) == 2 and len(_published(root)) == 2


# ---------------------------------------------------------------------------------- publish


def test_racing_builders_publish_one_complete_build(tmp_path, monkeypatch):
    """Builders racing on one root all end up with the one published build; the published
    folder never holds a partial module; the losers' temporary folders are gone."""
    fake = FakeBuild(monkeypatch, pause_s=0.02)
    n = 6
    start = threading.Barrier(n + 1)
    results, errors, partial = [], [], []
    done = threading.Event()

    def builder():
        start.wait()
        try:
            results.append(_ext.build_extension(cpu_only=True, build_directory=tmp_path))
        except Exception as exc:  # surfaces in the asserts below
            errors.append(exc)

    def watcher():  # every module file a reader could see in a published folder is complete
        start.wait()
        while not done.is_set():
            for folder in _published(tmp_path):
                for so in folder.glob("*.so"):
                    try:
                        data = so.read_bytes()
                    except FileNotFoundError:
                        continue
                    if data != _payload(so.stem):
                        partial.append(len(data))
            time.sleep(0.001)

    threads = [threading.Thread(target=builder) for _ in range(n)]
    watch = threading.Thread(target=watcher)
    for t in threads:
        t.start()
    watch.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()

    assert not errors, errors
    assert not partial, f"a published folder held a partial module ({partial[:3]} bytes)"
    assert len(fake.compiled) >= 2, "the builders did not race"
    (final,) = _published(tmp_path)
    assert {r.file for r in results} == {final / f"{final.name}.so"}  # all load the published file
    assert sorted(os.listdir(tmp_path)) == [final.name]  # the losers' temporary folders are removed
    assert all(not d.exists() for d in fake.compiled)


def test_corrupt_published_build_is_set_aside_and_rebuilt(tmp_path, monkeypatch):
    fake = FakeBuild(monkeypatch)
    so = _ext.build_extension(cpu_only=True, build_directory=tmp_path).file
    so.write_bytes(b"\x7fELF truncated")  # the real importer rejects it, as it would a broken build

    with pytest.warns(RuntimeWarning, match="failed to load.*moving it aside.*rebuilding"):
        rebuilt = _ext.build_extension(cpu_only=True, build_directory=tmp_path)
    assert rebuilt.file == so and so.read_bytes() == _payload(so.stem) and len(fake.compiled) == 2
    (aside,) = tmp_path.glob(".bad-*")
    assert (aside / so.name).read_bytes() == b"\x7fELF truncated"

    with warnings.catch_warnings():  # from now on the rebuilt module loads: no lasting fallback
        warnings.simplefilter("error")
        assert _ext.build_extension(cpu_only=True, build_directory=tmp_path).file == so
    assert len(fake.compiled) == 2


def test_stale_temporary_folders_are_ignored_and_old_ones_removed(tmp_path, monkeypatch):
    FakeBuild(monkeypatch)
    name = f"hrpo_kernels_ext_cpu_{_ext.build_key(True, DEFAULT_CPU_FLAGS, [], _ext.LD_FLAGS)[:12]}"
    old_tmp, fresh_tmp, old_bad = (
        tmp_path / f".tmp-{name}-old",
        tmp_path / f".tmp-{name}-live",
        tmp_path / f".bad-{name}-old",
    )
    for folder in (old_tmp, fresh_tmp, old_bad):  # half-written modules of killed (or live) builds
        folder.mkdir()
        (folder / f"{name}.so").write_bytes(_payload(name)[:10])
    two_days_ago = time.time() - 2 * 86400
    for folder in (old_tmp, old_bad):
        os.utime(folder, (two_days_ago, two_days_ago))

    mod = _ext.build_extension(cpu_only=True, build_directory=tmp_path)
    assert mod.file == tmp_path / name / f"{name}.so"
    assert not old_tmp.exists() and not old_bad.exists()
    assert fresh_tmp.exists()  # it may belong to a build still running


# ---------------------------------------------------------------------------------- packaging


def _copy_project(dest: Path) -> Path:
    """What setuptools packages, copied from the checkout (builds never write into it)."""
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so")
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("hrpo", "hrpo_kernels"):
        shutil.copytree(REPO / name, dest / name, ignore=junk)
    return dest


def test_wheel_and_sdist_carry_the_extension_sources(tmp_path):
    """A regular install keeps the C++ extension: the wheel and the sdist hold every file of the
    checkout's hrpo_kernels/csrc/, and the loader of an unpacked wheel finds its sources there
    (a wheel without them left the first use with "No such file ... site-packages/csrc/...")."""
    src = _copy_project(tmp_path / "src")
    sources = sorted(p.name for p in (REPO / "hrpo_kernels" / "csrc").iterdir())
    assert {"bindings.cpp", "philox.h", "topk_sample.cu"} <= set(sources)
    env = dict(os.environ, HRPO_BUILD_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path / 'dist')!r})",
        ],
        cwd=src,
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("hrpo-*.whl")
    (sdist,) = (tmp_path / "dist").glob("hrpo-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        in_wheel = sorted(n.split("/")[-1] for n in z.namelist() if n.startswith("hrpo_kernels/csrc/"))
        z.extractall(tmp_path / "site")
    with tarfile.open(sdist) as t:
        in_sdist = sorted(n.split("/")[-1] for n in t.getnames() if "/hrpo_kernels/csrc/" in n)
    assert in_wheel == sources and in_sdist == sources
    script = (
        "from hrpo_kernels import _ext\n"
        "files = _ext.build_sources(True) + _ext.build_sources(False)\n"
        "print(_ext.CSRC, *[s for s in files if not (_ext.CSRC / s).is_file()])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "site" / "hrpo_kernels" / "csrc")]


# ---------------------------------------------------------------------------------- real build


def test_published_build_loads_without_a_compiler(tmp_path_factory):
    """The session's real build (the `ext` fixture's root in tests/test_ext_cpu.py; built here
    if this file runs first) loads in a fresh process with the compile step disabled, quietly
    and quickly."""
    root = tmp_path_factory.getbasetemp() / "hrpo_ext_root"
    mod = _ext.build_extension(cpu_only=True, build_directory=root, extra_cflags=["-O2"])
    script = (
        "import sys, time\n"
        "import torch.utils.cpp_extension as cpp\n"
        "from hrpo_kernels import _ext\n"
        "def no_compiler(*a, **k):\n"
        "    raise AssertionError('the compiler was invoked')\n"
        "cpp.load = _ext._compile = no_compiler\n"
        "t = time.perf_counter()\n"
        "mod = _ext.build_extension(cpu_only=True, build_directory=sys.argv[1], extra_cflags=['-O2'])\n"
        "dt = time.perf_counter() - t\n"
        "print(dt, mod.__file__, *mod.philox4x32_10([0, 0, 0, 0], [0, 0]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), CXX="/bin/false", CC="/bin/false")
    out = subprocess.run(
        [sys.executable, "-c", script, str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiling" not in out.stderr
    seconds, file, *words = out.stdout.split()
    assert file == mod.__file__ and Path(file).parent.parent == root
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert float(seconds) < 2.0, f"a warm load took {float(seconds):.1f} s"
