"""Reading torch.export archives without running code from them.

``torch.export.load`` unpickles parts of a ``.pt2`` (sample inputs, pickled weights and
constants) and falls back to unrestricted unpickling when the restricted one refuses, so
a crafted archive runs code while it is loaded. Unless the user trusts the file, every
``torch.load`` inside is forced to weights-only unpickling (tensors and plain
containers), and archives holding objects that are always unpickled without restriction
(custom and opaque constants) are refused before anything is read.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_HINT = "pass --trust-pickle if you trust its author (unpickling runs code from the file)"


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Every ``torch.load`` in this block unpickles tensors and plain containers only."""
    old = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = old


def _unrestricted_members(path: Path) -> list[str]:
    """Archive members torch unpickles with plain ``pickle`` whatever the settings."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    with zipfile.ZipFile(path) as zf:
        return [n for n in zf.namelist()
                if Path(n).name.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX))]


_TRANSFORMERS_TYPE = re.compile(rb'\\"type\\": \\"(transformers(?:\.\w+)+)\.\w+\\"')


def _register_transformers_outputs(path: Path) -> None:
    """A program returning a ``transformers`` ModelOutput names its class in the pytree
    spec; deserializing needs the class registered, so import the installed module that
    defines it (from the installed library, never from the file)."""
    import importlib

    with zipfile.ZipFile(path) as zf:
        specs = [zf.read(n) for n in zf.namelist() if n.endswith(".json") and "/models/" in f"/{n}"]
    for module in sorted({m.decode() for data in specs for m in _TRANSFORMERS_TYPE.findall(data)}):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def load_exported_program(path: str | Path, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.load`` that runs no code from the file unless ``trust_pickle``."""
    path = Path(path)
    _register_transformers_outputs(path)
    if trust_pickle:
        return torch.export.load(str(path))
    unsafe = _unrestricted_members(path)
    if unsafe:
        raise InputError(f"{str(path)!r} holds pickled objects ({unsafe[0]}) that load only by running "
                         "code from the file", _HINT)
    try:
        with weights_only_unpickling():
            return torch.export.load(str(path))
    except pickle.UnpicklingError as exc:
        what = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in what if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise InputError(f"{str(path)!r} needs unrestricted unpickling to load"
                         + (f" ({detail})" if detail else ""), _HINT) from exc
