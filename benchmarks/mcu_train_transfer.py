"""Transfer learning on real data under QEMU: fp32 vs int8 + QAS vs int8 without QAS (issue 19).

The question of TTE (On-Device Training Under 256KB Memory): does int8 sparse-update
training with Quantization-Aware Scaling reach fp32's accuracy, and does int8 without
QAS fall short? Here on a real, offline data set:

- data: scikit-learn's digits (8x8, 16 grey levels), upsampled bilinearly to RESxRES,
  grey repeated on 3 channels, normalised to zero mean / unit variance;
- pretraining (host, fp32 torch, Adam, batch norm in train mode): a MobileNetV2-w0.35
  and an MCUNet-style backbone (kernel sizes 3/5/7, expand 3/6) on digits 0-5; the
  weights are cached under results/tmp/ by a hash of the model definition, data and seed
  (a third, MobileNetV3-small-like with squeeze-excitation, is registered in EXTRA_MODELS
  for benchmarks/mcu_train_search_accuracy.py; this script fine-tunes the first two);
- fine-tuning on the held-out classes 6-9 (a fresh 4-class head, seeded), batch 1 SGD,
  the same pretrained start, the same ORDERS seeded image orders and number of steps
  for every variant:
  1. head only and fp32 full update, plain torch on the host (batch norm frozen: eval
     mode, its affine parameters trained in the full update; the device variants fold it);
  2. fp32 sparse update: `-p "fold-bn,sparse-update(S)"`, compiled with
     `--train -b mcu --target cortex-m7`, `train.elf` run under QEMU;
  3. int8 sparse update + QAS: `fold-bn,quantize(mode=static),sparse-update(S),qas(...)`
     (calibrated on 16 pretraining images), stochastic rounding, and again with nearest
     rounding (what the int8 step without qas does), under QEMU;
  4. int8 sparse update without QAS: the same without `qas`, under QEMU.
- accuracy on the test images of classes 6-9 (never trained on): fp32 variants on the
  BN-folded fp32 model with the saved weights; int8 variants on the static int8 graph
  in its trainable form (``trainable_int8``: integer weights times their scales,
  fake-quantized activations with the calibrated ranges = the integer forward in
  float arithmetic), with the saved trained integers (``--save-weights`` writes an int8
  weight as its integers, an int32 bias times its scale; checked to be integers here).
  Also the share of test images whose top logit sits at the int8 output range's top.
- per variant: SRAM linked and measured (report.json mcu.firmware / memory_plan.device),
  instructions per step (QEMU count of one step at compile time), wall seconds.

    python benchmarks/mcu_train_transfer.py [--quick]   (--quick: one 40-step run per variant, results/tmp)
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report  # noqa: E402
from benchmarks.mcu_train_budget import _MBConv  # noqa: E402
from examples.models import MobileNetV2  # noqa: E402

RES = 32
PRETRAIN_CLASSES, FINETUNE_CLASSES = (0, 1, 2, 3, 4, 5), (6, 7, 8, 9)
SEED = 0
PRETRAIN_EPOCHS = 20
LR_PRE = 1e-3
EPOCHS = 2                  # fine-tuning passes over the 6-9 training images
QUICK_STEPS = 40
ORDERS = 3                  # fine-tuning runs per variant: the same images in ORDERS seeded orders
LR_SPARSE = 0.01            # head only, fp32 sparse, int8 +/- QAS (QAS makes int8 follow fp32 at the same lr)
LR_FULL = 0.001             # fp32 full update: at 0.01 it diverged (chance accuracy) in the --quick smoke run
QAS = "qas(rounding=stochastic,seed=1)"   # at this lr most int8 updates are below half a step
QAS_NEAREST = "qas"         # nearest rounding, as the int8 step without qas rounds
TARGET = "cortex-m7"
HEADROOM = 8.0              # Train.logit_headroom (the default): the int8 step's logit range = calibrated x this
RAM_KB, FLASH_KB = 4096, 4096   # the emulated board: every variant links and is measured
SCHEMES = {
    "MobileNetV2-w0.35": "sparse-update(bias_last=22,weights='-1:1,-3:1/4,-5:1/8,-8:1/8')",
    "MCUNet-like": "sparse-update(bias_last=12,weights='-1:1,-2:1/2,-4:1/4')",
}
VARIANTS = ["head only (fp32, host)", "fp32 full update (host)", "fp32 sparse (QEMU)",
            "int8 sparse + QAS (QEMU)", "int8 sparse + QAS, nearest rounding (QEMU)", "int8 sparse, no QAS (QEMU)",
            "int8 sparse + QAS, float head (QEMU)"]
# variant -> (int8, qas pass, float head: the classifier left out of quantize and trained in fp32)
DEVICE = {VARIANTS[2]: (False, None, False), VARIANTS[3]: (True, QAS, False), VARIANTS[4]: (True, QAS_NEAREST, False),
          VARIANTS[5]: (True, None, False), VARIANTS[6]: (True, QAS, True)}


# ------------------------------------------------------------------ models
class MCUNetLike(nn.Module):
    """MCUNet's search space (kernel sizes 3/5/7, expand ratios 3/6), the block table of
    benchmarks/mcu_train_budget.py's ``mcunet_like``, for RESxRES inputs."""

    CFG = [(16, 8, 3, 1, 1), (8, 16, 5, 6, 2), (16, 16, 7, 3, 1), (16, 24, 5, 6, 2), (24, 24, 3, 3, 1),
           (24, 40, 7, 6, 2), (40, 40, 5, 3, 1), (40, 48, 3, 6, 1), (48, 96, 7, 6, 2), (96, 96, 5, 3, 1)]

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                                      *[_MBConv(*c) for c in self.CFG], nn.Conv2d(96, 160, 1, bias=False),
                                      nn.BatchNorm2d(160), nn.ReLU6())
        self.classifier = nn.Linear(160, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def make_model(name: str, num_classes: int) -> nn.Module:
    if name == "MobileNetV2-w0.35":   # stem stride 1 (as CIFAR-size MobileNetV2s): 2x2 before the pool
        model = MobileNetV2(0.35, num_classes, dropout=0.0)
        model.features[0][0].stride = (1, 1)
        return model
    return MCUNetLike(num_classes)


class _SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excitation: global mean, 1x1 reduce (ReLU), 1x1 expand, hardsigmoid gate."""

    def __init__(self, c: int):
        super().__init__()
        mid = _divisible(c / 4)
        self.fc1, self.fc2 = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class _V3Block(nn.Module):
    """MobileNetV3's bottleneck: [1x1 expand], k x k depthwise, [SE], 1x1 project (BN after
    each conv, adjacent to it), ReLU or hardswish, residual when the shape allows."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers = [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act()] if mid != cin else []
        layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), act()]
        layers += [_SqueezeExcite(mid)] if se else []
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def _divisible(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


class MobileNetV3SmallLike(nn.Module):
    """MobileNetV3-Small (Howard et al., 2019) at width 0.5 (channels rounded to multiples of
    8): squeeze-excitation with a hardsigmoid gate in 9 of its 11 bottlenecks, hardswish in
    the later ones; stem stride 1 for RESxRES inputs (as MobileNetV2-w0.35 here: 2x2 before
    the pool); a 256-wide hardswish hidden layer before the classifier (MobileNetV3's 1024
    scaled with the width, halved again to keep the flash small)."""

    WIDTH = 0.5
    # k, expanded, out, SE, hardswish, stride (MobileNetV3-Small's table)
    CFG = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
           (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
           (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
           (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]

    def __init__(self, num_classes: int):
        super().__init__()
        c = _divisible(16 * self.WIDTH)
        blocks = []
        for k, mid, out, se, hs, stride in self.CFG:
            mid, out = _divisible(mid * self.WIDTH), _divisible(out * self.WIDTH)
            blocks.append(_V3Block(c, mid, out, k, stride, se, hs))
            c = out
        last = _divisible(576 * self.WIDTH)
        self.features = nn.Sequential(nn.Conv2d(3, _divisible(16 * self.WIDTH), 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(_divisible(16 * self.WIDTH)), nn.Hardswish(), *blocks,
                                      nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(last, 256), nn.Hardswish(), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# Models added after the first two: make_model and pretrain_fresh stay as they were, since
# their source keys the cached pretraining of MobileNetV2-w0.35 and MCUNet-like (_cache_key).
EXTRA_MODELS = {"MobileNetV3-small-like": MobileNetV3SmallLike}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Any registered model: make_model's two, or one of EXTRA_MODELS."""
    return EXTRA_MODELS[name](num_classes) if name in EXTRA_MODELS else make_model(name, num_classes)


def head(model: nn.Module) -> nn.Linear:
    return model.classifier[-1] if isinstance(model.classifier, nn.Sequential) else model.classifier


def new_head(model: nn.Module, classes: int, seed: int = SEED) -> nn.Module:
    """The backbone with a fresh ``classes``-way head (seeded)."""
    old = head(model)
    torch.manual_seed(seed + 100)
    fresh = nn.Linear(old.in_features, classes)
    if isinstance(model.classifier, nn.Sequential):
        model.classifier[-1] = fresh
    else:
        model.classifier = fresh
    return model


# ------------------------------------------------------------------ data
def digits(res: int = RES) -> dict[str, np.ndarray]:
    """sklearn's digits upsampled (bilinear) to 3 x res x res, normalised; the pretraining
    split (classes 0-5: 80 % train / 20 % test) and the fine-tuning split (classes 6-9,
    relabelled 0-3: half train, half test), both shuffled with SEED."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, 3, 1, 1).numpy()
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    out = {}
    for split, classes, frac in (("pre", PRETRAIN_CLASSES, 0.8), ("ft", FINETUNE_CLASSES, 0.5)):
        idx = rng.permutation(np.flatnonzero(np.isin(y, classes)))
        cut = int(round(frac * len(idx)))
        labels = np.searchsorted(np.array(classes), y[idx]).astype(np.int64)
        out[f"{split}_x_train"], out[f"{split}_y_train"] = x[idx[:cut]], labels[:cut]
        out[f"{split}_x_test"], out[f"{split}_y_test"] = x[idx[cut:]], labels[cut:]
    return out


def accuracy(fn, x: np.ndarray, y: np.ndarray, batch: int = 1) -> float:
    """Top-1 accuracy (%) of ``fn`` (a batch of inputs -> logits) on (x, y)."""
    right = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = fn(torch.from_numpy(x[i:i + batch]))
            right += int((torch.as_tensor(logits).argmax(-1).numpy() == y[i:i + batch]).sum())
    return 100.0 * right / len(x)


def _cache_key(name: str, data: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for src in (inspect.getsource(MCUNetLike), inspect.getsource(_MBConv), inspect.getsource(MobileNetV2),
                inspect.getsource(pretrain_fresh), inspect.getsource(make_model)):
        h.update(src.encode())
    if name in EXTRA_MODELS:   # (only these: the first two models' keys stay as they were)
        for obj in (EXTRA_MODELS[name], _V3Block, _SqueezeExcite, _divisible, build_model):
            h.update(inspect.getsource(obj).encode())
    h.update(f"{name}|{RES}|{SEED}|{PRETRAIN_EPOCHS}|{LR_PRE}|{torch.__version__}".encode())
    for k in ("pre_x_train", "pre_y_train"):
        h.update(np.ascontiguousarray(data[k]).tobytes())
    return h.hexdigest()[:16]


def pretrain_fresh(name: str, data: dict[str, np.ndarray], epochs: int = PRETRAIN_EPOCHS) -> nn.Module:
    """fp32 pretraining on classes 0-5: Adam (lr LR_PRE, cosine decay), batch 32, batch norm
    in train mode, then its statistics recomputed over the training images."""
    torch.manual_seed(SEED)
    model = make_model(name, len(PRETRAIN_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=LR_PRE)
    x, y = torch.from_numpy(data["pre_x_train"]), torch.from_numpy(data["pre_y_train"])
    gen = torch.Generator().manual_seed(SEED)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 31) // 32))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            b = perm[i:i + 32]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    # batch norm statistics of the final weights (a running average lags the last steps)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model(x[i:i + 64])
    return model.eval()


def _pretrain(name: str, data: dict[str, np.ndarray]) -> nn.Module:
    """pretrain_fresh for any registered model: an EXTRA_MODELS one is built by build_model
    (pretrain_fresh's make_model lookup pointed at it for the call; pretrain_fresh's
    source keys the first two models' caches and is left as it was)."""
    if name not in EXTRA_MODELS:
        return pretrain_fresh(name, data)
    module = sys.modules[pretrain_fresh.__module__]
    saved = module.make_model
    module.make_model = build_model
    try:
        return pretrain_fresh(name, data)
    finally:
        module.make_model = saved


def pretrained(name: str, data: dict[str, np.ndarray], cache: Path | None = None) -> tuple[nn.Module, bool]:
    """The pretrained backbone (6-way head), from results/tmp/ when cached; (model, from cache)."""
    cache = cache or _report.QUICK
    path = cache / f"mcu_train_transfer_{name}_{_cache_key(name, data)}.pt"
    if path.is_file():
        model = build_model(name, len(PRETRAIN_CLASSES))
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), True
    model = _pretrain(name, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, False


# ------------------------------------------------------------------ fine-tuning
def order(data: dict[str, np.ndarray], steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuning stream every variant sees in run ``seed``: EPOCHS seeded shuffles of
    the 6-9 training images, cut to ``steps`` (batch 1; the device reads them in order)."""
    rng = np.random.default_rng(SEED + 1 + seed)
    n = len(data["ft_y_train"])
    idx = np.concatenate([rng.permutation(n) for _ in range(-(-steps // n))])[:steps]
    return data["ft_x_train"][idx], data["ft_y_train"][idx]


def start_model(name: str, data: dict[str, np.ndarray]) -> nn.Module:
    """The fine-tuning start: the pretrained backbone with a fresh 4-way head (eval mode)."""
    model, _ = pretrained(name, data)
    return new_head(copy.deepcopy(model), len(FINETUNE_CLASSES)).eval()


def torch_finetune(model: nn.Module, x: np.ndarray, y: np.ndarray, lr: float, head_only: bool) -> nn.Module:
    """Batch-1 SGD in plain torch (batch norm frozen in eval mode, its affine parameters
    trained with the rest in a full update)."""
    model = copy.deepcopy(model).eval()
    params = list(head(model).parameters()) if head_only else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr)
    for i in range(len(x)):
        loss = F.cross_entropy(model(torch.from_numpy(x[i:i + 1])), torch.from_numpy(y[i:i + 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy with every Conv2d -> BatchNorm2d pair (adjacent in a Sequential) folded into
    the conv's weight and bias, the batch norm replaced by Identity: the fp32 model the
    device's `fold-bn` trains, parameters by the same module paths."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq.named_children())
        for (_, conv), (bn_name, bn) in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                with torch.no_grad():
                    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    bias = (conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean))
                    conv.weight.mul_(k.reshape(-1, 1, 1, 1))
                    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * k)
                setattr(seq, bn_name, nn.Identity())
    return model


def load_trained(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    state = model.state_dict()
    missing = sorted(set(weights) - set(state))
    if missing:
        raise KeyError(f"saved parameters not in the folded model: {missing[:5]}")
    state.update({k: v.reshape(state[k].shape) for k, v in weights.items()})
    model.load_state_dict(state)
    return model


def calibration(data: dict[str, np.ndarray]) -> np.ndarray:
    """16 pretraining images (classes 0-5) for the activation ranges of the int8 graph."""
    return data["pre_x_train"][:16]


def head_path(model: nn.Module) -> str:
    """The classifier's module path (what quantize's ``exclude`` takes)."""
    return next(n for n, m in model.named_modules() if m is head(model))


def quantize_pass(start: nn.Module, float_head: bool) -> str:
    return f"quantize(mode=static,exclude={head_path(start)})" if float_head else "quantize(mode=static)"


def int8_model(start: nn.Module, calib: np.ndarray, float_head: bool = False):
    """The static int8 graph the compile trains (fold-bn, quantize(mode=static) on the same
    calibration images) in its trainable form: a callable Graph whose parameters are the
    integer weights (``<w>_q``) and fp32 biases, as ``--save-weights`` names them (with a
    float head: its float weight and bias too)."""
    from gradrewrite.compiler import run_pipeline
    from gradrewrite.passes.qas import logit_headroom, trainable_int8
    from gradrewrite.rewrite.capture import capture
    from gradrewrite.rewrite.registry import PassContext

    g = capture(copy.deepcopy(start), (torch.from_numpy(calib[:1]),))
    run_pipeline(g, "fold-bn", verify=False)
    run_pipeline(g, quantize_pass(start, float_head), verify=False,
                 ctx=PassContext(calibration=[(torch.from_numpy(calib[i:i + 1]),) for i in range(len(calib))]))
    g = trainable_int8(g)
    logit_headroom(g, HEADROOM)   # the logits' range as the int8 training step widens it
    return g


def output_range(g) -> tuple[float, float, float]:
    """(lowest, highest, step) of the int8 graph's logits: its output quantizer's range,
    calibrated on the start model (a fresh head's small logits), times the int8 step's
    logit headroom."""
    out = next(n for n in g.graph.nodes if n.op == "output").args[0][0]
    if "fake_quantize" not in str(out.target):
        raise ValueError(f"the int8 graph's output is {out.target}, not a quantizer")
    scale, zero, qmin, qmax = (float(v) for v in out.args[1:5])
    return (qmin - zero) * scale, (qmax - zero) * scale, scale


def top_logit_share(fn, x: np.ndarray, top: float) -> tuple[float, float]:
    """Shares (%) of the images whose largest logit reaches ``top`` and whose largest
    logit is shared by two or more classes (a tie argmax breaks by class order)."""
    with torch.no_grad():
        logits = torch.cat([torch.as_tensor(fn(torch.from_numpy(x[i:i + 64]))) for i in range(0, len(x), 64)])
    best = logits.max(-1).values
    return (100.0 * float((best >= top).float().mean()),
            100.0 * float(((logits == best[:, None]).sum(-1) > 1).float().mean()))


def int8_accuracy(start: nn.Module, calib: np.ndarray, weights: dict[str, torch.Tensor],
                  x: np.ndarray, y: np.ndarray, float_head: bool = False) -> tuple[float, float, object]:
    """Accuracy of the int8 graph with the trained weights loaded; also the largest
    distance of a loaded ``_q`` weight from an integer (0 when the graphs agree), and the
    graph."""
    g = int8_model(start, calib, float_head)
    attrs = {str(n.target): n for n in g.graph.nodes if n.op == "get_attr"}
    off = 0.0
    for name, value in weights.items():
        target = name.replace(".", "_") if name not in attrs else name
        node = attrs.get(name) or attrs.get(target)
        if node is None:
            raise KeyError(f"saved parameter {name!r} is not in the int8 graph")
        old = g.attr(node)
        value = value.reshape(old.shape).to(old.dtype)
        if name.endswith("_q"):
            off = max(off, float((value - value.round()).abs().max()))
        g.set_attr(node, value)
    g.commit()
    return accuracy(lambda t: g(t)[0], x, y), off, g


def device_variant(name: str, start: nn.Module, int8: bool, qas: str | None, orders: list,
                   data: dict[str, np.ndarray], tmp: Path, float_head: bool = False) -> dict:
    """Compile the sparse-update step for Cortex-M7 (one step measured under QEMU at
    compile time), train it under QEMU over each order of the fine-tuning images, save the
    weights, evaluate each on the test images."""
    import gradrewrite as gr
    from safetensors.torch import load_file

    passes = (f"fold-bn,{quantize_pass(start, float_head)}," if int8 else "fold-bn,") + SCHEMES[name] \
        + (f",{qas}" if qas else "")
    calib = calibration(data)
    t0 = time.time()
    art = gr.compile(copy.deepcopy(start), tmp / "art", example_inputs=(torch.from_numpy(calib[:1]),),
                     passes=passes, backend="mcu", train=gr.Train(lr=LR_SPARSE, logit_headroom=HEADROOM),
                     calibration=[(torch.from_numpy(calib[i:i + 1]),) for i in range(len(calib))] if int8 else None,
                     target=TARGET, ram_kb=RAM_KB, flash_kb=FLASH_KB, verify_inputs=1)
    compile_s = time.time() - t0
    rep, mcu = art.report, art.report["mcu"]
    dev = rep.get("memory_plan", {}).get("device", {})
    x_te, y_te = data["ft_x_test"], data["ft_y_test"]
    # the int8 logits' range (a float head has none: its logits are float)
    lo, hi, step = output_range(int8_model(start, calib)) if int8 and not float_head else (None, None, None)
    out = {"passes": passes, "runs": [], "int8_logit_range": [lo, hi] if lo is not None else None, "trained_bytes": mcu["trained_bytes"],
           "arena_bytes": mcu["arena_bytes"],
           "sram_linked_bytes": mcu["firmware"]["sram_bytes"], "flash_bytes": mcu["firmware"]["flash_bytes"],
           "sram_measured_bytes": dev.get("sram_measured_bytes"),
           "planned_sram_bytes": rep["memory_plan"].get("sram_bytes"),
           "instructions_per_step": mcu.get("runtime", {}).get("instructions_per_step"),
           "bit_exact": (mcu.get("int8_check") or {}).get("bit_exact"), "steps": len(orders[0][0]),
           "lr": LR_SPARSE, "compile_s": round(compile_s, 1)}
    for i, (xs, ys) in enumerate(orders):
        np.savez(tmp / "ft.npz", x=xs, y=ys)
        t0 = time.time()
        run = art.train(tmp / "ft.npz", steps=len(xs), lr=LR_SPARSE, save_weights=tmp / "w.safetensors")
        train_s = time.time() - t0
        weights = load_file(str(tmp / "w.safetensors"))
        if int8:
            acc, off, g = int8_accuracy(start, calib, weights, x_te, y_te, float_head)
            if off > 1e-3:
                raise RuntimeError(f"saved int8 weights are {off} off the integers: the int8 graphs differ")
            at_top, ties = top_logit_share(lambda t: g(t)[0], x_te, hi - step / 2 if hi is not None else np.inf)
        else:
            model = load_trained(fold_bn(start), weights)
            acc, off = accuracy(model, x_te, y_te), None
            at_top, ties = top_logit_share(model, x_te, hi)   # fp32 logits past the int8 range's top
        losses = np.asarray(run.losses, np.float64)
        k = max(1, len(losses) // 10)
        out["runs"].append({"order": i, "accuracy": acc, "loss_first_tenth": float(losses[:k].mean()),
                            "loss_last_tenth": float(losses[-k:].mean()), "train_s": round(train_s, 1),
                            "max_off_integer": off, "top_logit_at_int8_max_pct": at_top, "tied_top_pct": ties})
        out.setdefault("trained_params", sorted(weights))
    return summarize(out)


def summarize(r: dict) -> dict:
    """Mean, min and max accuracy and mean losses over a variant's runs."""
    accs = [u["accuracy"] for u in r["runs"]]
    r.update(accuracy=float(np.mean(accs)), accuracy_min=min(accs), accuracy_max=max(accs),
             train_s=round(sum(u["train_s"] for u in r["runs"]), 1))
    for k in ("loss_first_tenth", "loss_last_tenth", "top_logit_at_int8_max_pct", "tied_top_pct"):
        if all(k in u for u in r["runs"]):
            r[k] = float(np.mean([u[k] for u in r["runs"]]))
    return r


def run_model(name: str, data: dict[str, np.ndarray], steps: int, n_orders: int, tmp: Path,
              only: list[str] | None = None, previous: dict | None = None) -> dict:
    """Every variant of ``name``; with ``only``, those device variants, the others taken
    from ``previous`` (the published results of the same steps and orders)."""
    t0 = time.time()
    pre, cached = pretrained(name, data)
    res = {"pretrain_s": round(time.time() - t0, 1), "pretrain_cached": cached,
           "pretrain_accuracy_0_5": accuracy(pre, data["pre_x_test"], data["pre_y_test"], 64),
           "scheme": SCHEMES[name], "variants": {}}
    start = start_model(name, data)
    orders = [order(data, steps, i) for i in range(n_orders)]
    x_te, y_te = data["ft_x_test"], data["ft_y_test"]
    res["start_accuracy_6_9"] = accuracy(start, x_te, y_te, 64)   # a fresh head: chance level
    for variant, head_only, lr in ((VARIANTS[0], True, LR_SPARSE), (VARIANTS[1], False, LR_FULL)):
        if only:
            res["variants"][variant] = previous["variants"][variant]
            continue
        runs = []
        for i, (xs, ys) in enumerate(orders):
            t0 = time.time()
            m = torch_finetune(start, xs, ys, lr, head_only)
            runs.append({"order": i, "accuracy": accuracy(m, x_te, y_te, 64), "train_s": round(time.time() - t0, 1)})
        res["variants"][variant] = summarize({"runs": runs, "steps": steps, "lr": lr})
        print(f"  {name} {variant}: {res['variants'][variant]['accuracy']:.1f} %", flush=True)
    for variant, (int8, qas, float_head) in DEVICE.items():
        if only and variant not in only:
            res["variants"][variant] = previous["variants"][variant]
            continue
        sub = tmp / str(VARIANTS.index(variant))
        sub.mkdir()
        try:
            r = device_variant(name, start, int8, qas, orders, data, sub, float_head)
        except Exception as exc:  # a refusal is a finding: record it, keep measuring the others
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        res["variants"][variant] = r
        print(f"  {name} {variant}: " + (f"{r['accuracy']:.1f} % ({r['accuracy_min']:.1f}-{r['accuracy_max']:.1f}), "
                                         f"SRAM {r['sram_linked_bytes'] / 1024:.1f} KB, "
                                         f"{(r['instructions_per_step'] or 0) / 1e6:.1f} M instr/step, "
                                         f"compile {r['compile_s']} s, train {r['train_s']} s"
                                         if "error" not in r else r["error"]), flush=True)
    acc = {k: res["variants"][k].get("accuracy") for k in VARIANTS}
    fp32, qas_sr, qas_near, no_qas, fhead = (acc[v] for v in VARIANTS[2:7])
    if None not in (fp32, fhead):
        res["int8_qas_float_head_within_2_points_of_fp32_sparse"] = fhead >= fp32 - 2.0
    if None not in (fp32, qas_sr, no_qas):
        res["int8_qas_within_2_points_of_fp32_sparse"] = qas_sr >= fp32 - 2.0
        res["int8_no_qas_short_of_int8_qas"] = no_qas < qas_sr
    if None not in (qas_near, no_qas):
        res["int8_no_qas_short_of_int8_qas_nearest"] = no_qas < qas_near
    return res


def estimate_s(steps: int, n_orders: int) -> float:
    """A rough wall-time estimate on this 2-core machine: pretraining (when not cached),
    four compiles with a QEMU step measurement per model, the QEMU fine-tuning (~0.5 s per
    step over both models' four device variants, measured in a --quick run)."""
    return 2 * 90 + 2 * 4 * 30 + n_orders * steps * 0.5


def main(quick: bool, missing_only: bool = False) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = digits()
    steps = QUICK_STEPS if quick else EPOCHS * len(data["ft_y_train"])
    n_orders = 1 if quick else ORDERS
    print(f"digits {RES}x{RES}: pretrain {len(data['pre_y_train'])} train / {len(data['pre_y_test'])} test images "
          f"(classes 0-5), fine-tune {len(data['ft_y_train'])} train / {len(data['ft_y_test'])} test (6-9); "
          f"{steps} fine-tuning steps per variant and run, {n_orders} run(s); torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} cores; "
          f"estimated ~{estimate_s(steps, n_orders) / 60:.0f} min", flush=True)
    t0 = time.time()
    results = {}
    published = {}
    if missing_only:   # run the device variants the published results lack, keep the rest
        old = json.loads((_report.RESULTS / "mcu_train_transfer.json").read_text())
        if (old["steps"], old["orders"], old["resolution"]) != (steps, n_orders, RES):
            raise SystemExit(f"--missing-only: the published run has {old['steps']} steps x {old['orders']} orders "
                             f"at {old['resolution']}, this one {steps} x {n_orders} at {RES}: run it whole")
        published = old["results"]
    with tempfile.TemporaryDirectory(prefix="gr-transfer-") as tmp:
        for name in SCHEMES:
            print(name, flush=True)
            (Path(tmp) / name).mkdir()
            prev = published.get(name)
            only = [v for v in DEVICE if v not in prev["variants"]] if prev else None
            results[name] = run_model(name, data, steps, n_orders, Path(tmp) / name, only=only, previous=prev)
    publish(results, data, steps, n_orders, quick, time.time() - t0)


def _kb(v) -> object:
    return round(v / 1024, 1) if isinstance(v, (int, float)) else "-"


def publish(results: dict, data: dict, steps: int, n_orders: int, quick: bool, seconds: float) -> None:
    rows = []
    for name, res in results.items():
        for variant in VARIANTS:
            r = res["variants"][variant]
            acc = (f"{r['accuracy']:.1f} ({r['accuracy_min']:.1f}-{r['accuracy_max']:.1f})" if "accuracy" in r
                   else "error: " + r["error"][:80])
            loss = f"{r['loss_first_tenth']:.3f} > {r['loss_last_tenth']:.3f}" if "loss_first_tenth" in r else "-"
            top = (f"{r['top_logit_at_int8_max_pct']:.0f} ({r['tied_top_pct']:.0f})"
                   if "top_logit_at_int8_max_pct" in r else "-")
            instr = round(r["instructions_per_step"] / 1e6, 2) if r.get("instructions_per_step") else "-"
            rows.append([name, variant, acc, _kb(r.get("sram_linked_bytes")), _kb(r.get("sram_measured_bytes")),
                         _kb(r.get("trained_bytes")), instr, r.get("steps", "-"), r.get("lr", "-"), loss, top,
                         r.get("compile_s", "-"), r.get("train_s", "-")])
    verdicts = []
    word = lambda ok: "holds" if ok else "does not hold"  # noqa: E731
    for name, res in results.items():
        if "int8_qas_within_2_points_of_fp32_sparse" in res:
            fh = res.get("int8_qas_float_head_within_2_points_of_fp32_sparse")
            verdicts.append(f"{name}: int8 + QAS (mean accuracy) within 2 points of fp32 sparse: "
                            f"{word(res['int8_qas_within_2_points_of_fp32_sparse'])}; int8 without QAS short of "
                            f"int8 + QAS: {word(res['int8_no_qas_short_of_int8_qas'])}"
                            + (f" (and of int8 + QAS with the same nearest rounding: "
                               f"{word(res['int8_no_qas_short_of_int8_qas_nearest'])})"
                               if "int8_no_qas_short_of_int8_qas_nearest" in res else "")
                            + (f"; int8 + QAS with a float head within 2 points of fp32 sparse: {word(fh)}"
                               if fh is not None else ""))
    pre = "; ".join(f"{n} {r['pretrain_accuracy_0_5']:.1f} % on digits 0-5 (fresh 4-way head on 6-9: "
                    f"{r['start_accuracy_6_9']:.1f} %)" for n, r in results.items())
    ranges = "; ".join(f"{n} [{lo:.2f}, {hi:.2f}]" for n, res in results.items()
                       for lo, hi in [res["variants"][VARIANTS[3]].get("int8_logit_range") or [np.nan, np.nan]])
    stream = "--quick" if quick else f"{EPOCHS} epochs of {len(data['ft_y_train'])} images"
    text = (f"scikit-learn digits (8x8) upsampled bilinearly to {RES}x{RES}, grey on 3 channels, normalised. "
            f"Pretrained in fp32 torch on digits 0-5 ({len(data['pre_y_train'])} images, Adam, {PRETRAIN_EPOCHS} "
            f"epochs; accuracy on {len(data['pre_y_test'])} held-out images: {pre}). Fine-tuned on digits 6-9 with a "
            f"fresh 4-way head (seeded) from the same pretrained start, batch 1 SGD, {steps} steps ({stream}); "
            f"each variant runs on the same {n_orders} seeded order(s) of the training images; accuracy on the "
            f"{len(data['ft_y_test'])} test images of 6-9 (never trained on): mean (min-max) over the orders. "
            f"lr {LR_SPARSE} for head only, fp32 sparse and every int8 row (QAS exists so that int8 trains at "
            f"fp32's lr); {LR_FULL} for the full update (at {LR_SPARSE} it diverged to chance accuracy in a "
            "40-step smoke run). Host rows: plain torch (batch norm frozen, eval mode). QEMU rows: "
            f"`gradrewrite.compile(..., backend='mcu', train=Train(lr), target='{TARGET}')` of "
            "`fold-bn[,quantize(mode=static)],<scheme>[,qas]` (int8 calibrated on 16 images of 0-5; "
            f"`{QAS}` stochastic rounding, or `{QAS_NEAREST}` nearest; without qas the int8 step rounds its "
            "updates to nearest too), compiled once per variant (one step measured under QEMU), then "
            "`Artifact.train(data.npz, save_weights=...)` (= `gradrewrite run --train`) of train.elf under "
            "qemu-system-arm. Schemes: " + "; ".join(f"{n} `{s}`" for n, s in SCHEMES.items())
            + ". fp32 accuracy: the batch-norm-folded torch model with the saved weights; int8 accuracy: the static "
            "int8 graph (same fold-bn and calibration) in its trainable form (integer weights times their scales, "
            "fake-quantized activations: the integer forward in float arithmetic) with the saved trained integers "
            "(checked to be integers, so the graphs' scales agree). SRAM linked = train.elf .data + .bss + heap "
            "and stack reserves (linked against the emulated board's 4 MB, so every scheme runs); measured = "
            "linked minus the unused reserves (QEMU stack painting); instructions per step: QEMU's count of one "
            "step at compile time (a proxy for time, not cycles). 'Top logit at int8 max': the share of test "
            "images whose largest logit sits at the top of the int8 step's output range (int8 rows; fp32 rows: "
            "reaches past it), in brackets the share whose largest logit is tied between classes. That range is "
            "calibrated on the start model, whose fresh head gives small logits, then widened by the int8 "
            f"step's logit headroom (`Train(logit_headroom={HEADROOM:g})`, the default: the logits' quantizer "
            f"scale times {HEADROOM:g}): {ranges}. The int8 step trains through int8 logits clamped to it (the "
            "quantizer's gradient is zero past it); with the calibrated range alone (the run of 7d5e3ab, "
            "MobileNetV2-w0.35 [-0.98, 0.55]) fine-tuned logits saturated: 80 % of the test images had their "
            "top logit at the int8 maximum, 37 % tied, int8 + QAS 52.3 %. 'float head': the classifier left "
            "out of quantize (`quantize(mode=static,exclude=<classifier>)`), trained in fp32 inside the int8 "
            "step (float logits, no clamp), the rest as int8 + QAS. " + " ".join(v + "." for v in verdicts))
    if quick:
        text += " `--quick`: a smoke run."
    columns = ["model", "variant", "test accuracy 6-9 %, mean (min-max)", "SRAM linked KB", "SRAM measured KB",
               "trained params KB", "M instr / step", "steps", "lr", "loss first > last tenth",
               "top logit at int8 max % (tied %)", "compile s", "train s (all runs)"]
    out = {"title": "Transfer learning on real data under QEMU: fp32 vs int8 + QAS (mcu, digits)", "quick": quick,
           "resolution": RES, "steps": steps, "orders": n_orders, "seconds": round(seconds, 1),
           "torch_threads": torch.get_num_threads(), "results": results, "verdicts": verdicts,
           "sections": [{"heading": "Fine-tuning on held-out classes: accuracy, SRAM, instructions per step",
                         "text": text, "columns": columns, "rows": rows}]}
    print(_report.md_table(columns, rows))
    for v in verdicts:
        print(v)
    print(f"{seconds:.0f} s, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    if not quick:
        out["sections"][0]["image"] = plot(results)
    _report.publish("mcu_train_transfer", out, quick=quick)


def plot(results: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        rs = [results[n]["variants"][variant] for n in results]
        vals = np.array([r.get("accuracy", np.nan) for r in rs])
        err = np.array([[v - r.get("accuracy_min", v), r.get("accuracy_max", v) - v] for v, r in zip(vals, rs)]).T
        ax.bar(np.arange(len(results)) + (i - (len(VARIANTS) - 1) / 2) * width, vals, width, yerr=err, capsize=2,
               label=variant)
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel("test accuracy on digits 6-9 (%), min-max bars")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("fine-tuning a digits-0-5 backbone on 6-9 (batch 1 SGD)")
    return _report.save_png(fig, "mcu_train_transfer")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, results under results/tmp")
    ap.add_argument("--missing-only", action="store_true",
                    help="measure only the device variants the published results lack (same steps and orders)")
    a = ap.parse_args()
    main(a.quick, a.missing_only)
