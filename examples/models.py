"""Example models for gradrewrite demos and tests.

Every factory returns ``(model.eval(), example_inputs)`` where ``example_inputs`` is a
tuple of tensors suitable for ``torch.export.export(model, example_inputs)`` with
static shapes. Factories are deterministic for a given ``seed`` and leave the global
RNG state untouched (they run under ``torch.random.fork_rng``). Importing this module
has no side effects.

Factories:

* :func:`small_cnn` -- conv-bn-relu blocks, an identity residual add, max/avg pooling
  and a linear head; input ``1x3x32x32``.
* :func:`mobilenet_v2` -- MobileNetV2 (Sandler et al., 2018) in plain PyTorch with
  inverted residual blocks, ReLU6, BatchNorm and channel rounding to multiples of 8.
* :func:`tiny_gpt` -- a GPT-2 style causal LM (pre-LN blocks, causal
  ``F.scaled_dot_product_attention``, GELU MLP, tied or untied LM head); input int64
  token ids of shape ``1 x seq``.

:func:`count_macs` is a small forward-hook MAC counter (Conv2d, Linear and the
attention matmuls of :class:`CausalSelfAttention`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SmallCNN",
    "MobileNetV2",
    "TinyGPT",
    "CausalSelfAttention",
    "small_cnn",
    "mobilenet_v2",
    "tiny_gpt",
    "count_macs",
    "count_params",
    "FACTORIES",
]


# --------------------------------------------------------------------------- helpers


def _randomize_bn_affine(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters (weight != 1, bias != 0)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@torch.no_grad()
def _calibrate_bn(model: nn.Module, make_batch: Callable[[], torch.Tensor], steps: int,
                  var_floor: float = 1e-2) -> None:
    """Run a few batches in train mode so BN running stats are non-trivial.

    Uses a cumulative average (``momentum=None``) so the running stats are the real
    batch statistics rather than mostly the (0, 1) defaults. ``running_var`` is then
    floored at ``var_floor``: with random weights some channels are nearly dead (var
    ~1e-4), and dividing by their tiny std amplifies fp32 rounding ~30x (MobileNetV2
    fp32-vs-fp64 error 3e-6 instead of 1e-7), which would make exact-ish numeric
    comparisons in tests flaky.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(steps):
        model(make_batch())
    model.eval()
    for m, mom in zip(bns, saved):
        m.momentum = mom
        m.running_var.clamp_(min=var_floor)


def count_params(model: nn.Module) -> int:
    """Number of unique parameters (tied weights are counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def count_macs(model: nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward pass, counted with forward hooks.

    Counts ``nn.Conv2d`` (``out.numel() * in_ch/groups * kh * kw``), ``nn.Linear``
    (``out.numel() * in_features``) and the two attention matmuls of
    :class:`CausalSelfAttention` (``2 * B * H * T * T * head_dim``, full -- not
    causally halved -- as a dense SDPA kernel computes it). Elementwise ops, norms
    and pooling are ignored.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def attn_hook(m: "CausalSelfAttention", inp, out):
        nonlocal total
        b, t, c = inp[0].shape
        total += 2 * b * t * t * c

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, CausalSelfAttention):
            handles.append(m.register_forward_hook(attn_hook))
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


# --------------------------------------------------------------------------- small CNN


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """conv-bn-relu -> conv-bn, identity shortcut, add, relu."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = ConvBNReLU(ch, ch)
        self.conv2 = ConvBNReLU(ch, ch, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + x)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNReLU(3, 16)                 # 32x32
        self.down = ConvBNReLU(16, 32, stride=2)      # 16x16
        self.res = ResidualBlock(32)                  # 16x16
        self.pool = nn.MaxPool2d(2)                   # 8x8
        self.conv = ConvBNReLU(32, 64)                # 8x8
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(self.res(self.down(self.stem(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))


def small_cnn(num_classes: int = 10, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Small conv net; input ``1x3x32x32`` float32, output ``1 x num_classes``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        model = SmallCNN(num_classes)
        _randomize_bn_affine(model, gen)
        _calibrate_bn(model, lambda: torch.randn(8, 3, 32, 32, generator=gen), steps=4)
        x = torch.randn(1, 3, 32, 32, generator=gen)
    return model.eval(), (x,)


# --------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, k=1, act=nn.ReLU6))          # expand
        layers += [
            ConvBNReLU(hidden, hidden, k=3, stride=stride, groups=hidden, act=nn.ReLU6),  # dw
            ConvBNReLU(hidden, cout, k=1, act=None),                          # linear project
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (first stride)
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, round_nearest: int = 8,
                 dropout: float = 0.2):
        super().__init__()
        cin = _make_divisible(32 * width_mult, round_nearest)
        # As in the paper / reference implementations, the last conv is not thinned for
        # width multipliers < 1.
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, cin, stride=2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU(cin, self.last_channel, k=1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width_mult: float = 0.35, resolution: int = 128, num_classes: int = 1000,
                 seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """MobileNetV2; input ``1x3xRxR`` float32, output ``1 x num_classes``.

    BatchNorm layers get random affine parameters and running statistics from a few
    train-mode batches, so BN folding changes real numbers.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        model = MobileNetV2(width_mult, num_classes)
        _randomize_bn_affine(model, gen)
        _calibrate_bn(model, lambda: torch.randn(4, 3, resolution, resolution, generator=gen), steps=3)
        x = torch.randn(1, 3, resolution, resolution, generator=gen)
    return model.eval(), (x,)


# --------------------------------------------------------------------------- tiny GPT


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        assert d_model % n_head == 0
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, d_model: int = 128, n_layer: int = 2, n_head: int = 4,
                 max_seq: int = 64, tie_weights: bool = True):
        super().__init__()
        self.max_seq = max_seq
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_gpt(vocab: int = 512, d_model: int = 128, n_layer: int = 2, n_head: int = 4,
             seq: int = 64, tie_weights: bool = True,
             seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """GPT-style causal LM; input int64 ids ``1 x seq``, output logits ``1 x seq x vocab``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        model = TinyGPT(vocab, d_model, n_layer, n_head, max_seq=seq, tie_weights=tie_weights)
        # Non-trivial LayerNorm affine parameters, so norm-related rewrites see real numbers.
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        idx = torch.randint(0, vocab, (1, seq), generator=gen, dtype=torch.int64)
    return model.eval(), (idx,)


FACTORIES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "small_cnn": small_cnn,
    "mobilenet_v2": mobilenet_v2,
    "tiny_gpt": tiny_gpt,
}
