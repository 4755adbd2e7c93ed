"""Run folders that never lose or wipe work.

A run folder holds a manifest (`hrpo-run.json`) naming every file and folder an hrpo run
wrote there; a path is entered in it before it is written. `--overwrite` removes only those,
never anything else, and only once every input has been validated; a folder that is not
empty and has no manifest is refused. A run that fails before its first step puts the
folder back as it found it (the replaced run's files are moved aside, not deleted, until
then). Files are replaced atomically: written beside their target, synced, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hrpo.core.errors import ConfigError

MANIFEST = "hrpo-run.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (os.write in a loop: a short write is not an error)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str | Path, data: bytes | str) -> None:
    """Atomically replace `path` with `data`: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_durably(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | Path, obj) -> None:
    replace_file(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """A single result file: refused if it exists (unless overwrite) or cannot be created."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    _probe_writable(path.parent, "--output")
    return path


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str) -> None:
    """Whether files can be created in `folder` (or the nearest folder above it that exists):
    create and delete one temporary file, so read-only and pseudo filesystems are found now."""
    anchor = _nearest_existing(folder)
    if not anchor.is_dir():
        raise ConfigError(f"{what} {folder}: {anchor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=anchor, prefix=".hrpo-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{what} {folder}: cannot create files in {anchor} ({err.strerror})") from None


class RunDir:
    """The output folder of one training run, with its manifest.

    RunDir(path, overwrite, resume) validates only (nothing is written); open() takes the
    folder; path(name) registers a file in the manifest and returns where to write it;
    started() commits the replacement of an old run; rollback() undoes open()."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False, kind: str = "train"):
        self.root, self.kind = Path(path), kind
        self.overwrite, self.resume = overwrite, resume
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--output-dir {self.root} is a file, not a folder")
        entries = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        self.holds_run = MANIFEST in entries
        if resume and not self.holds_run:
            raise ConfigError(f"--resume: {self.root} holds no hrpo run (no {MANIFEST})")
        if entries and not self.holds_run:
            raise ConfigError(
                f"--output-dir {self.root} is not empty and holds no hrpo run (no {MANIFEST}); "
                "choose a new or empty folder"
            )
        self.files: list[str] = self._read_manifest() if self.holds_run else []
        if self.holds_run and not overwrite and self._kind_found != kind:
            raise ConfigError(
                f"--output-dir {self.root} holds an hrpo {self._kind_found} run, not an {kind} one; "
                "choose another folder"
            )
        if self.holds_run and not (overwrite or resume):
            raise ConfigError(
                f"--output-dir {self.root} holds an hrpo run; pass --resume to continue it or --overwrite to replace it"
            )
        _probe_writable(self.root, "--output-dir")
        self._old_files = list(self.files)
        self._created: list[Path] = []  # the folders open() created, the run folder first
        self._stash: Path | None = None  # where the replaced run's files wait until started()
        self._stashed: list[str] = []
        self._new: list[str] = []  # entered by this process (rollback removes them)

    def _read_manifest(self) -> list[str]:
        try:
            self._manifest_bytes = (self.root / MANIFEST).read_bytes()  # rollback restores it as it was
            manifest = json.loads(self._manifest_bytes)
            files, self._kind_found = manifest["files"], manifest.get("kind", "train")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{self.root / MANIFEST}: unreadable run manifest ({err})") from None
        if not all(isinstance(f, str) and f and not Path(f).is_absolute() and ".." not in Path(f).parts for f in files):
            raise ConfigError(f"{self.root / MANIFEST}: a listed path leaves the run folder")
        return files

    def open(self) -> RunDir:
        folder = self.root.absolute()
        while not folder.exists():
            self._created.append(folder)
            folder = folder.parent
        self.root.mkdir(parents=True, exist_ok=True)
        if self.holds_run and self.overwrite:
            # Moved aside, not deleted, until the new run makes progress; the stash itself is
            # in the manifest, so a later --overwrite clears it if this process dies first.
            self._stash = Path(tempfile.mkdtemp(dir=self.root, prefix=".hrpo-replaced-"))
            self.files = [self._stash.name]
            self._save_manifest()
            for name in self._old_files:
                if (self.root / name).exists() or (self.root / name).is_symlink():
                    (self._stash / name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.root / name, self._stash / name)
                    self._stashed.append(name)
        self._save_manifest()
        return self

    def _save_manifest(self) -> None:
        write_json(self.root / MANIFEST, {"written_by": "hrpo", "kind": self.kind, "files": self.files})

    def path(self, name: str) -> Path:
        """root/name, entered in the manifest first (a file or a folder an hrpo run owns)."""
        if name not in self.files:
            self.files.append(name)
            self._new.append(name)
            self._save_manifest()
        return self.root / name

    def started(self) -> None:
        """The run made progress: the replaced run's files are now deleted for good."""
        if self._stash is not None:
            shutil.rmtree(self._stash, ignore_errors=True)
            self.files.remove(self._stash.name)
            self._save_manifest()
            self._stash = None
        self._new, self._created = [], []

    def rollback(self) -> None:
        """Put the folder back as open() found it (a run that failed before its first step)."""
        for name in reversed(self._new):
            _remove(self.root / name)
        if self._created:
            (self.root / MANIFEST).unlink(missing_ok=True)
            _remove_empty(self._created)
            return
        self.files = [f for f in self.files if f not in self._new]
        if self._stash is not None:
            for name in self._stashed:
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._stash / name, self.root / name)
            shutil.rmtree(self._stash, ignore_errors=True)
            self.files, self._stash = list(self._old_files), None
        if self.holds_run:
            replace_file(self.root / MANIFEST, self._manifest_bytes)
        else:
            (self.root / MANIFEST).unlink(missing_ok=True)
        self._new = []


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders open() created, deepest first, each only while it is empty: another
    process may have written beside the run meanwhile, and its files stay."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
