"""Where the C sources shipped with the backend live: ``kernels/`` (the kernel library a
generated project copies what it calls from) and ``templates/`` (harnesses, startup
code, linker script and Makefile). Both are package data (pyproject.toml)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def kernel_dir() -> Path:
    return Path(str(resources.files(__package__) / "kernels"))


def template_dir() -> Path:
    return Path(str(resources.files(__package__) / "templates"))
