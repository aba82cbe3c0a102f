"""torch backend: the rewritten program saved as a torch.export archive (the reference)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..rewrite.graph import Graph
from ..rewrite.safe_load import load_exported_program
from ..rewrite import quant_ops  # noqa: F401  (quantized ops a saved graph may hold)
from .options import TorchOptions, make_options
from .base import Backend, BackendArtifact, as_numpy, register_backend, reexport


@register_backend("torch")
class TorchBackend(Backend):
    def compile(self, graph: Graph, out_dir: Path, *, options: TorchOptions) -> BackendArtifact:
        make_options("torch", options)  # takes none: anything given is refused by name
        ep = reexport(graph)
        torch.export.save(ep, str(out_dir / "model.pt2"))
        return BackendArtifact(["model.pt2"], "torch-eager-cpu", {"format": "torch.export"})

    def load(self, out_dir: Path, artifact: dict[str, Any]):
        module = load_exported_program(out_dir / "model.pt2",
                                       trust_pickle=artifact.get("trust_pickle", False)).module()

        def run(*inputs: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                out = module(*(torch.as_tensor(np.asarray(x)) for x in inputs))
            return as_numpy(pytree.tree_leaves(out))

        return run
