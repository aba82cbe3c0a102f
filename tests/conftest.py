"""Shared fixtures: small models with real (non-trivial) batch-norm statistics."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # `examples` and `tests.model_zoo` importable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _warm_bn(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """Give batch norms non-trivial running stats, so folding is really tested."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape, generator=g) * 2 + 0.5)
    return model.eval()


class ConvBnNet(nn.Module):
    """conv(no bias)-bn-relu, conv-bn, linear-bn1d, and a conv whose output is reused."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8),
        )
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.features(x)
        y = self.shared(x)
        x = self.shared_bn(y) + y          # y has two users: must not be folded
        x = x.mean((2, 3))
        return self.head_bn(self.head(x))


@pytest.fixture
def convbn_model():
    torch.manual_seed(0)
    return _warm_bn(ConvBnNet(), (4, 3, 12, 12))


@pytest.fixture
def convbn_graph(convbn_model):
    from gradrewrite.rewrite.capture import capture

    return capture(convbn_model, (torch.randn(2, 3, 12, 12),), source="ConvBnNet")


@pytest.fixture
def convbn_pt2(tmp_path, convbn_model):
    path = tmp_path / "convbn.pt2"
    torch.export.save(torch.export.export(convbn_model, (torch.randn(2, 3, 12, 12),)), str(path))
    return path
