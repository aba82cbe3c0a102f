"""Tiny models shared by several test files (not a test module)."""
from __future__ import annotations

import torch
import torch.nn as nn


class Mlp(nn.Module):
    """linear -> batch norm -> relu -> linear: fold-bn has one fold to do."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class Eig(nn.Module):
    """Uses eigvals, which has no ONNX lowering: the ort exporter fails on it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.linalg.eigvals(x).real)
