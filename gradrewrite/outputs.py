"""Where results go: output paths checked before the slow work, written atomically.

An artifact directory is built in a temporary sibling and renamed into place; a single
output file is written to a hidden sibling and renamed. Both are checked up front (the
parent is a writable directory, OUT is absent, empty, or an artifact ``--force`` may
replace) so a bad ``-o`` fails in one line before minutes of capture and tuning.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError

# Files every artifact directory holds: what --force is allowed to replace.
ARTIFACT_MARKERS = ("report.json", "manifest.json")


def _writable_dir(directory: Path, what: str) -> None:
    """``directory`` (created later if absent) can hold new entries."""
    probe = directory
    while not probe.exists():  # the nearest existing ancestor decides
        if probe.parent == probe:
            break
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{what}: {str(probe)!r} is a broken link", "choose another path")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}: {str(probe)!r} is a file, not a directory",
                          "choose an output path inside a directory")
    try:  # a real probe: permissions, read-only mounts, immutable dirs and sysfs all show here
        os.rmdir(tempfile.mkdtemp(prefix=".gradrewrite-probe-", dir=probe))
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {str(probe)!r} ({exc.strerror or exc})",
                          "choose a writable output path") from exc


def is_artifact_dir(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in ARTIFACT_MARKERS)


def check_out_free(out: str | Path, force: bool) -> None:
    """OUT must be absent or empty, or (with ``force``) an artifact directory to replace."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"output {str(out)!r} is a file, not an artifact directory",
                              "choose another -o (--force replaces only artifact directories)")
        if any(out.iterdir()):
            if not force:
                raise ConfigError(f"output {str(out)!r} already exists",
                                  "pass --force to replace it, or choose another -o")
            if not is_artifact_dir(out):
                raise ConfigError(f"output {str(out)!r} is a directory that gradrewrite did not write "
                                  f"(no {' / '.join(ARTIFACT_MARKERS)})",
                                  "choose another -o, or remove it yourself (--force replaces only "
                                  "artifact directories)")
    _writable_dir(out.parent, f"output {str(out)!r}")


def check_out_file(path: str | Path, what: str = "output") -> None:
    """A single output file: its directory is writable and the path is not a directory."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory", "give a file name")
    _writable_dir(path.parent, f"{what} {str(path)!r}")


def make_build_dir(out: Path) -> Path:
    """The temporary sibling OUT is built in (renamed into place by ``replace_dir``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an old OUT (with --force) goes only after."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)
