"""N:M sparse training rewrites: SR-STE and Progressive Gradient Flow (PGF).

``insert_training_rewrites`` reroutes the weight argument of each selected layer
through a ``call_module`` node ``nm_trainer.layers.<key>`` (an ``NMWeight``) that
returns the *effective* weight; ``finalize`` bakes the final N:M mask into the
weights and removes the rewrites again. Biases and every other argument of a layer
are never touched.

Spec
----
Clock. ``t`` (an int) counts completed optimizer steps: 0 before the first step;
``NMTrainer.step()`` adds one (``attach(optimizer)`` calls it after every
``optimizer.step()``). A forward at clock ``t`` uses the phase of ``t``:

- ``t < warmup_steps``: **dense**. Effective weight ``W``, gradient ``g``. No mask.
- ``warmup_steps <= t < warmup_steps + decay_steps``: **decay**, with decay time
  ``tau = t - warmup_steps`` (``tau = 0`` on the first decay step, so beta(0) = 1).
- ``t >= warmup_steps + decay_steps``: **fixed-mask**. Masks are frozen at their last
  value (a final ``n:m`` mask; if the layer has none yet, or its last mask has
  another structure, one is computed from ``|W|`` on entry). Forward ``W*M``,
  gradient ``g*M``.

Below ``M`` is a hard boolean N:M mask, ``g`` the gradient w.r.t. the effective
weight, and gradients are w.r.t. ``W``. In the decay phase, per method:

- ``srste``: forward ``W*M``; backward ``g + lambda*(1-M)*W`` (``SRSTEFunction``).
- ``pgf-mask``: forward ``W*(M + beta(tau)*(1-M))`` (``MaskDecayFunction``); backward
  ``g`` (``gradient="pass-through"``) or ``g*(M + beta*(1-M))`` (``"chain-rule"``).

  - exp (``decay="exp"``, the default): ``beta(tau) = exp(-a*tau)``, ``a = decay_rate``
    or, if 0, ``ln(1000)/decay_steps``: beta(0) = 1, beta(D/3) = 0.1, beta(D/2) =
    1000**-0.5, beta(D) = 1e-3 (extrapolated: the fixed phase, which starts at tau = D,
    uses beta = 0).
  - linear: ``beta(tau) = max(0, 1 - a*tau)``, ``a = decay_rate`` or, if 0,
    ``1/decay_steps``: beta(0) = 1, beta(D/2) = 0.5, beta(D-1) = 1/D (the last decay
    step), and the fixed phase then uses beta = 0.
  - ``beta()`` reads 1.0 in the dense phase and 0.0 in the fixed phase.

  Why exp is the default. Both decays reach the exact n:m forward when the fixed phase
  starts; they differ in how the window is spent. Linear beta tied to the whole decay
  window averages 0.5 over it: the pruned weights keep half their strength on average,
  and the forward the network adapts to is close to the sparse one only in the last
  steps of the window. Exp beta is down to 0.1 a third of the way in, so most of the
  window trains a nearly sparse forward while the (pass-through) gradient still reaches
  the pruned weights and lets the mask change. It is the variant the PGF paper favours
  (its MDGF-Exponential), and it is the one that measured better in
  ``benchmarks/nm_sparsity.py``, which trains both decays side by side with SR-STE on
  the same seeds (BENCHMARKS.md, "PGF mask decay against SR-STE").
- ``pgf-structure``: the ``S = len(schedule)`` stages split the decay phase evenly:
  stage ``i = min(floor(tau*S/decay_steps), S-1)``, i.e. stage i is active for
  ``tau`` in ``[i*L, (i+1)*L)`` with ``L = decay_steps/S``. Forward ``W*M`` with the
  hard ``n_i:m_i`` mask of the current stage; backward ``g`` (straight through,
  ``StraightThroughMask``). The schedule must end at ``(n, m)``; the default is
  ``m-1:m``, then ``m/2, m/4, ...`` while above ``n``, then ``n:m`` (1:8 ->
  7:8, 4:8, 2:8, 1:8; 2:4 -> 3:4, 2:4). A stage's ``m_i`` may differ from ``m``
  (8:64 -> 4:32 -> 2:16 -> 1:8): every layer's reduction dimension must then be a
  multiple of every ``m_i`` unless the layer pads (``LayerRef.pad``).

Masks. ``nm_mask(W, n_t, m_t, kind, pad=layer.pad)`` of ``|W|``. In the decay phase
they are recomputed (by ``NMTrainer.update_masks``, which ``step()`` calls after the
clock moved, i.e. from the weights the optimizer just wrote) when ``tau`` enters a new
window ``[k*mask_interval, (k+1)*mask_interval)`` and whenever the structure changes
(a new pgf-structure stage, the fixed phase). ``insert_training_rewrites`` computes
the masks due at the current clock. Every recompute appends to
``NMTrainer.history``: ``{step, phase, structure, beta (pgf-mask only),
mask_change_rate, per_layer}``, where a layer's rate is the fraction of mask bits
that flipped (a layer's first mask is compared with the dense all-ones mask) and
``mask_change_rate`` is the mean over the layers recomputed.

State. The clock saves with ``state_dict`` under ``nm_trainer.step``; each layer's
mask is a buffer (``nm_trainer.layers.<key>.mask``) and the step/structure it was
computed at is the layer's extra state, so a checkpoint resumes exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ...rewrite.graph import copy_meta
from ...rewrite.nm_masks import KINDS, check_ratio, nm_mask, reduction_size

log = logging.getLogger(__name__)

METHODS = ("srste", "pgf-mask", "pgf-structure")
DECAYS = ("linear", "exp")
GRADIENTS = ("pass-through", "chain-rule")
PHASES = ("dense", "decay", "fixed-mask")
TRAINER_NAME = "nm_trainer"
PENDING = "nm-sparsity"


# --------------------------------------------------------------------------- config
def default_schedule(n: int, m: int) -> tuple[tuple[int, int], ...]:
    """``m-1:m``, then ``m/2, m/4, ...`` while above ``n``, then ``n:m``."""
    check_ratio(n, m)
    ns = [m - 1]
    k = m // 2
    while k > n:
        if k < ns[-1]:
            ns.append(k)
        k //= 2
    if n < ns[-1]:
        ns.append(n)
    return tuple((k, m) for k in ns)


@dataclass(frozen=True)
class NMTrainConfig:
    """How to train N:M sparse weights (see the module docstring for the semantics)."""

    method: str            # "srste" | "pgf-mask" | "pgf-structure"
    n: int
    m: int
    srste_lambda: float = 2e-4
    decay: str = "exp"     # pgf-mask beta(t): "exp" (default) | "linear"
    decay_rate: float = 0.0   # a; 0 -> linear 1/decay_steps, exp ln(1000)/decay_steps
    schedule: tuple[tuple[int, int], ...] = ()   # pgf-structure stages; () -> default
    warmup_steps: int = 0  # dense phase
    decay_steps: int = 1000
    gradient: str = "pass-through"   # pgf-mask: "pass-through" | "chain-rule"
    mask_interval: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown N:M training method {self.method!r}; use one of {METHODS}")
        check_ratio(self.n, self.m)
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; use one of {DECAYS}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {self.gradient!r}; use one of {GRADIENTS}")
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.mask_interval, int) or self.mask_interval < 1:
            raise ValueError(f"mask_interval must be an int >= 1, got {self.mask_interval!r}")
        if self.decay_rate < 0 or not math.isfinite(self.decay_rate):
            raise ValueError(f"decay_rate must be finite and >= 0, got {self.decay_rate!r}")
        if self.srste_lambda < 0:
            raise ValueError(f"srste_lambda must be >= 0, got {self.srste_lambda!r}")
        schedule = tuple((int(a), int(b)) for a, b in self.schedule)
        object.__setattr__(self, "schedule", schedule)
        if self.method == "pgf-structure":
            for a, b in self.stages():
                check_ratio(a, b)
            if self.stages()[-1] != (self.n, self.m):
                raise ValueError(f"pgf-structure schedule {self.stages()} must end at the "
                                 f"target {self.n}:{self.m}")
            if 0 < self.decay_steps < len(self.stages()):
                raise ValueError(f"decay_steps={self.decay_steps} is shorter than the "
                                 f"{len(self.stages())} schedule stages")

    # ------------------------------------------------------------------ derived
    def stages(self) -> tuple[tuple[int, int], ...]:
        """The pgf-structure schedule, the default one when none was given."""
        return self.schedule or default_schedule(self.n, self.m)

    def rate(self) -> float:
        """The decay rate ``a`` of beta (derived when ``decay_rate`` is 0)."""
        if self.decay_rate:
            return float(self.decay_rate)
        if self.decay_steps == 0:
            return math.inf
        if self.decay == "linear":
            return 1.0 / self.decay_steps
        return math.log(1000.0) / self.decay_steps

    def phase(self, t: int) -> str:
        if t < self.warmup_steps:
            return "dense"
        if t < self.warmup_steps + self.decay_steps:
            return "decay"
        return "fixed-mask"

    def beta(self, t: int) -> float:
        """pgf-mask beta at clock ``t``: 1 when dense, 0 when the mask is fixed."""
        phase = self.phase(t)
        if phase == "dense":
            return 1.0
        if phase == "fixed-mask":
            return 0.0
        tau = t - self.warmup_steps
        a = self.rate()
        if self.decay == "linear":
            return max(0.0, 1.0 - a * tau)
        return math.exp(-a * tau)

    def structure(self, t: int) -> tuple[int, int] | None:
        """The n:m mask applied at clock ``t`` (``None`` in the dense phase)."""
        phase = self.phase(t)
        if phase == "dense":
            return None
        if phase == "fixed-mask" or self.method != "pgf-structure":
            return (self.n, self.m)
        stages = self.stages()
        tau = t - self.warmup_steps
        return stages[min(tau * len(stages) // self.decay_steps, len(stages) - 1)]

    def window(self, t: int) -> tuple[Any, ...]:
        """Masks are recomputed when this key changes (see the module docstring)."""
        phase = self.phase(t)
        if phase == "decay":
            return (phase, (t - self.warmup_steps) // self.mask_interval, self.structure(t))
        return (phase, self.structure(t))


# --------------------------------------------------------------------------- autograd
def _keep(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(dtype=like.dtype, device=like.device)


class SRSTEFunction(torch.autograd.Function):
    """Forward ``W*M``; backward ``g + lambda*(1-M)*W`` (sparse-refined STE)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
        keep = _keep(mask, w)
        ctx.save_for_backward(w, keep)
        ctx.lam = float(lam)
        return w * keep

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, keep = ctx.saved_tensors
        return g + ctx.lam * (1 - keep) * w, None, None


class MaskDecayFunction(torch.autograd.Function):
    """Forward ``W*(M + beta*(1-M))``; backward ``g`` (pass-through) or
    ``g*(M + beta*(1-M))`` (chain-rule, the true derivative)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, mask: torch.Tensor, beta: float,
                pass_through: bool = True) -> torch.Tensor:
        keep = _keep(mask, w)
        scale = keep + float(beta) * (1 - keep)
        ctx.pass_through = bool(pass_through)
        if not ctx.pass_through:
            ctx.save_for_backward(scale)
        return w * scale

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.pass_through:
            return g, None, None, None
        scale, = ctx.saved_tensors
        return g * scale, None, None, None


class StraightThroughMask(torch.autograd.Function):
    """Forward ``W*M``; backward ``g`` (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return w * _keep(mask, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


# --------------------------------------------------------------------------- modules
class StepClock:
    """The trainer's step counter, shared by reference with every ``NMWeight``
    (a plain object, not a submodule, so the module tree has no cycles)."""

    def __init__(self, t: int = 0):
        self.t = int(t)

    def __repr__(self) -> str:
        return f"StepClock(t={self.t})"


class NMWeight(nn.Module):
    """Maps a layer's weight ``W`` to its effective weight at the current clock."""

    def __init__(self, path: str, kind: str, weight_shape: tuple[int, ...],
                 cfg: NMTrainConfig, clock: StepClock, pad: bool = False):
        super().__init__()
        self.path, self.kind, self.pad = path, kind, bool(pad)
        self.cfg = cfg
        self.clock = clock
        self.register_buffer("mask", torch.ones(weight_shape, dtype=torch.bool))
        self._sync_shadow()
        self.mask_step: int = -1                       # clock of the last recompute
        self.mask_nm: tuple[int, int] | None = None    # structure of ``mask``
        self.mask_window: tuple[Any, ...] | None = None
        self._weight: list[torch.Tensor] = []   # the live W (a list: not registered here)

    @property
    def bound_weight(self) -> torch.Tensor:
        """The weight this layer reroutes (bound at insertion, refreshed by forward)."""
        if not self._weight:
            raise RuntimeError(f"NMWeight {self.path!r} has no weight bound")
        return self._weight[0]

    def bind(self, weight: torch.Tensor) -> None:
        self._weight = [weight]

    def extra_repr(self) -> str:
        return f"path={self.path!r}, kind={self.kind!r}, method={self.cfg.method!r}"

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"mask_step": self.mask_step, "mask_nm": self.mask_nm,
                "mask_window": self.mask_window}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mask_step = int(state["mask_step"])
        self.mask_nm = tuple(state["mask_nm"]) if state["mask_nm"] is not None else None
        window = state.get("mask_window")
        self.mask_window = tuple(window) if window is not None else None

    # Graph.commit drops every buffer no get_attr node reads, this one included; a
    # shadow reference lets the mask (a frozen one too) come back instead of being lost.
    def _sync_shadow(self) -> None:
        mask = self._buffers.get("mask")
        self._mask_shadow = [mask] if mask is not None else []

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._sync_shadow()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_shadow()

    def has_mask(self) -> bool:
        if self._buffers.get("mask") is None and self._mask_shadow:
            self.register_buffer("mask", self._mask_shadow[0])
        return self.mask_nm is not None and self._buffers.get("mask") is not None

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def recompute(self, w: torch.Tensor, n: int, m: int, t: int | None = None) -> float:
        """Set ``mask`` to the n:m mask of ``|w|``; returns the fraction of flipped bits."""
        new = nm_mask(w, n, m, self.kind, pad=self.pad).to(w.device)
        old = self.mask if self.has_mask() else None
        if old is None or old.shape != new.shape:
            old = torch.ones_like(new)           # a first mask is compared with dense
        rate = float((new != old.to(new.device)).float().mean()) if new.numel() else 0.0
        self.register_buffer("mask", new)
        self._sync_shadow()
        t = self.clock.t if t is None else t
        self.mask_step, self.mask_nm, self.mask_window = t, (n, m), self.cfg.window(t)
        return rate

    def due(self, t: int) -> bool:
        """Whether the mask must be recomputed at clock ``t``."""
        phase = self.cfg.phase(t)
        if phase == "dense":
            return False
        if not self.has_mask() or self.mask_nm != self.cfg.structure(t):
            return True
        return phase == "decay" and self.mask_window != self.cfg.window(t)

    @torch.no_grad()
    def final_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The mask ``finalize`` bakes: the frozen one in the fixed phase, else the
        final n:m mask of ``|w|``."""
        cfg = self.cfg
        if cfg.phase(self.clock.t) == "fixed-mask" and self.has_mask() \
                and self.mask_nm == (cfg.n, cfg.m):
            return self.mask.clone()
        return nm_mask(w, cfg.n, cfg.m, self.kind, pad=self.pad).to(w.device)

    # ------------------------------------------------------------------ forward
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        cfg, t = self.cfg, self.clock.t
        if isinstance(w, nn.Parameter) and (not self._weight or self._weight[0] is not w):
            self.bind(w)
        phase = cfg.phase(t)
        if phase == "dense":
            return w
        nm = cfg.structure(t)
        if not self.has_mask() or self.mask_nm != nm:   # clock moved without update_masks
            self.recompute(w, *nm, t=t)
        mask = self.mask
        if phase == "fixed-mask":
            return w * _keep(mask, w)
        if cfg.method == "srste":
            return SRSTEFunction.apply(w, mask, cfg.srste_lambda)
        if cfg.method == "pgf-mask":
            return MaskDecayFunction.apply(w, mask, cfg.beta(t), cfg.gradient == "pass-through")
        return StraightThroughMask.apply(w, mask)


def _layer_key(path: str, taken: set[str]) -> str:
    base = path.replace(".", "__") or "_root"
    key, i = base, 0
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


class NMTrainer(nn.Module):
    """Owns the clock and every layer's ``NMWeight``; installed as ``gm.nm_trainer``."""

    def __init__(self, cfg: NMTrainConfig, log_every: int = 0):
        super().__init__()
        self.cfg = cfg
        self.clock = StepClock()
        self.layers = nn.ModuleDict()
        self.history: list[dict[str, Any]] = []
        self.log_every = int(log_every)   # >0: log (never print) every log_every steps

    # ------------------------------------------------------------------ state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "step"] = torch.tensor(self.clock.t, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        key = prefix + "step"
        if key in state_dict:
            self.clock.t = int(state_dict[key])
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"method={self.cfg.method!r}, n={self.cfg.n}, m={self.cfg.m}, t={self.clock.t}"

    # ------------------------------------------------------------------ layers
    def add_layer(self, path: str, kind: str, weight: torch.Tensor, pad: bool = False) -> str:
        key = _layer_key(path, set(self.layers.keys()))
        layer = NMWeight(path, kind, tuple(weight.shape), self.cfg, self.clock, pad)
        layer.bind(weight)
        self.layers[key] = layer
        return key

    # ------------------------------------------------------------------ clock
    @property
    def t(self) -> int:
        return self.clock.t

    def step(self) -> int:
        """Advance the clock by one optimizer step, then update the masks due."""
        self.clock.t += 1
        self.update_masks()
        if self.log_every > 0 and self.clock.t % self.log_every == 0:
            last = self.history[-1] if self.history else None
            log.info("nm-sparsity step %d phase %s structure %s beta %s last mask change %s",
                     self.clock.t, self.phase(), self.structure(), self.beta(),
                     None if last is None else last["mask_change_rate"])
        return self.clock.t

    def set_step(self, t: int) -> None:
        """Move the clock to ``t`` (e.g. to resume) and update the masks due."""
        self.clock.t = int(t)
        self.update_masks()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Advance the clock after every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def phase(self, t: int | None = None) -> str:
        return self.cfg.phase(self.clock.t if t is None else t)

    def beta(self, t: int | None = None) -> float | None:
        """pgf-mask's beta at the current (or given) step; ``None`` for other methods."""
        if self.cfg.method != "pgf-mask":
            return None
        return self.cfg.beta(self.clock.t if t is None else t)

    def structure(self, t: int | None = None) -> tuple[int, int] | None:
        return self.cfg.structure(self.clock.t if t is None else t)

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def update_masks(self, force: bool = False) -> dict[str, Any] | None:
        """Recompute the masks due at the current step (all with ``force``); returns
        the history entry appended, or ``None`` when nothing was due."""
        t = self.clock.t
        nm = self.cfg.structure(t)
        if nm is None:
            return None
        rates: dict[str, float] = {}
        for layer in self.layers.values():
            if force or layer.due(t):
                rates[layer.path] = layer.recompute(layer.bound_weight, *nm, t=t)
        if not rates:
            return None
        entry: dict[str, Any] = {"step": t, "phase": self.cfg.phase(t), "structure": nm}
        if self.cfg.method == "pgf-mask":
            entry["beta"] = self.cfg.beta(t)
        entry["mask_change_rate"] = sum(rates.values()) / len(rates)
        entry["per_layer"] = rates
        self.history.append(entry)
        return entry

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The final n:m mask of every layer at the current weights."""
        return {layer.path: nm_mask(layer.bound_weight, self.cfg.n, self.cfg.m, layer.kind,
                                    pad=layer.pad)
                for layer in self.layers.values()}

    @torch.no_grad()
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """What each layer computes with at the current step."""
        return {layer.path: layer(layer.bound_weight).detach().clone()
                for layer in self.layers.values()}


# --------------------------------------------------------------------------- graph
@dataclass
class LayerRef:
    """One layer to train sparse: its node, its weight's ``get_attr`` node, its kind."""

    path: str
    layer_node: fx.Node
    weight_node: fx.Node
    kind: str
    pad: bool = False


def _weight_slot(layer: fx.Node, weight: fx.Node) -> tuple[str, Any]:
    slots = [("arg", i) for i, a in enumerate(layer.args) if a is weight]
    slots += [("kwarg", k) for k, v in layer.kwargs.items() if v is weight]
    if len(slots) != 1:
        raise ValueError(f"layer {layer.name}: weight {weight.name} must be exactly one direct "
                         f"argument of the layer node (found {len(slots)})")
    return slots[0]


def insert_training_rewrites(graph, layers: list[LayerRef], cfg: NMTrainConfig,
                             *, log_every: int = 0) -> NMTrainer:
    """Reroute each layer's weight through ``nm_trainer.layers.<key>``; see the module
    docstring for what those compute. Returns the installed ``NMTrainer``."""
    gm = graph.gm
    if hasattr(gm, TRAINER_NAME) or graph.meta.get("pending_training"):
        raise ValueError(f"the graph already holds {graph.meta.get('pending_training') or 'N:M'} "
                         f"training rewrites; finalize them first")
    if not layers:
        raise ValueError("no layers to train sparse")
    seen: dict[fx.Node, str] = {}
    for ref in layers:   # validate everything before touching the graph
        if ref.kind not in KINDS:
            raise ValueError(f"layer {ref.path!r}: kind must be one of {KINDS}, got {ref.kind!r}")
        if ref.weight_node.op != "get_attr":
            raise ValueError(f"layer {ref.path!r}: weight node {ref.weight_node.name} is not a "
                             f"get_attr node")
        if ref.weight_node in seen:
            raise ValueError(f"layer {ref.path!r} shares its weight with {seen[ref.weight_node]!r}")
        seen[ref.weight_node] = ref.path
        _weight_slot(ref.layer_node, ref.weight_node)
        w = graph.attr(ref.weight_node)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(f"layer {ref.path!r}: weight is not a floating-point tensor")
        if (ref.kind == "linear" and w.dim() != 2) or (ref.kind == "conv" and w.dim() < 3):
            raise ValueError(f"layer {ref.path!r}: a {ref.kind} weight cannot have shape "
                             f"{tuple(w.shape)}")
        k = reduction_size(tuple(w.shape), ref.kind)
        stages = cfg.stages() if cfg.method == "pgf-structure" else ((cfg.n, cfg.m),)
        for i, (n_i, m_i) in enumerate(stages):
            if k % m_i and not ref.pad:
                raise ValueError(f"layer {ref.path!r}: reduction dimension {k} is not a "
                                 f"multiple of m={m_i} of stage {i} ({n_i}:{m_i}); pad the "
                                 f"layer or choose another schedule")

    trainer = NMTrainer(cfg, log_every=log_every)
    gm.add_module(TRAINER_NAME, trainer)
    for ref in layers:
        w = graph.attr(ref.weight_node)
        w.requires_grad_(True)
        key = trainer.add_layer(ref.path, ref.kind, w, ref.pad)
        with graph.graph.inserting_before(ref.layer_node):
            node = graph.graph.call_module(f"{TRAINER_NAME}.layers.{key}", (ref.weight_node,))
        copy_meta(ref.layer_node, node)
        if "val" in ref.weight_node.meta:
            node.meta["val"] = ref.weight_node.meta["val"]
        if "tensor_meta" in ref.weight_node.meta:
            node.meta["tensor_meta"] = ref.weight_node.meta["tensor_meta"]
        where, slot = _weight_slot(ref.layer_node, ref.weight_node)
        if where == "arg":
            args = list(ref.layer_node.args)
            args[slot] = node
            ref.layer_node.args = tuple(args)
        else:
            ref.layer_node.update_kwarg(slot, node)
    trainer.update_masks()
    graph.meta["pending_training"] = PENDING
    graph.graph.lint()
    gm.recompile()
    return trainer


def trainer_of(graph) -> NMTrainer:
    trainer = getattr(graph.gm, TRAINER_NAME, None)
    if not isinstance(trainer, NMTrainer):
        raise ValueError("the graph holds no N:M training rewrites (no nm_trainer)")
    return trainer


@torch.no_grad()
def finalize(graph) -> dict[str, torch.Tensor]:
    """Bake the final masks into the weights (``W*mask``), remove the rewrites and
    the trainer; returns ``{path: bool mask}``."""
    trainer = trainer_of(graph)
    prefix = f"{TRAINER_NAME}.layers."
    result: dict[str, torch.Tensor] = {}
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(prefix):
            continue
        key = str(node.target)[len(prefix):]
        layer = trainer.layers[key]
        weight_node = node.args[0]
        w = graph.attr(weight_node)
        mask = layer.final_mask(w)
        graph.set_attr(weight_node, w.detach() * mask.to(w.dtype))
        node.replace_all_uses_with(weight_node)
        graph.graph.erase_node(node)
        result[layer.path] = mask
    delattr(graph.gm, TRAINER_NAME)
    graph.meta.pop("pending_training", None)
    graph.commit()
    return result


__all__ = ["LayerRef", "MaskDecayFunction", "NMTrainConfig", "NMTrainer", "NMWeight",
           "SRSTEFunction", "StepClock", "StraightThroughMask", "default_schedule", "finalize",
           "insert_training_rewrites", "trainer_of"]
