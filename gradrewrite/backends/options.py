"""Typed backend options: one frozen dataclass per backend, validated here.

``make_options("tvm", {"tune_trials": 64})`` -> ``TvmOptions(tune_trials=64, ...)``. An
unknown name fails listing the valid ones; a value of the wrong type fails naming the
option and the type it takes. The CLI builds these from its flags, the Python API from
keyword arguments, and each backend reads attributes, so an option can be followed from
the flag to the code that uses it. ``describe()`` lists them for ``compile --help``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..errors import ConfigError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TorchOptions:
    """The torch backend takes no options."""


@dataclass(frozen=True)
class OrtOptions:
    opset: int = _opt(18, "ONNX opset (--opset)")
    external_data: Optional[bool] = _opt(None, "weights in model.onnx.data (default: only above 1 GiB)")
    nbits_accuracy_level: int = _opt(0, "MatMulNBits accuracy_level for weight-only layers: 0 = fp32 math, "
                                        "equal to the torch graph; 4 = int8 activations (faster, not exact)")
    qdq_form: str = _opt("ort", "static int8 Q/DQ in model.onnx: ort (uint8 activations, linear weights "
                                "stored for MatMul, int32 biases: the form ORT fuses into QLinearConv/QGemm/"
                                "QLinearAdd, see backends/ort_int8.py) | as-is (as the exporter writes "
                                "the quantize pass's graph)", choices=("ort", "as-is"))

    def __post_init__(self) -> None:
        if self.nbits_accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"nbits_accuracy_level={self.nbits_accuracy_level} is not an ORT accuracy level",
                              "use 0 (exact fp32, the default) or 4 (int8 activations)")


@dataclass(frozen=True)
class TvmOptions:
    target: str = _opt("auto", "auto | llvm | cuda (--target)", choices=("auto", "llvm", "cuda"))
    mcpu: Optional[str] = _opt(None, "LLVM -mcpu (default: the host's)")
    num_cores: Optional[int] = _opt(None, "threads the schedules use (default: all cores)")
    tune_trials: int = _opt(0, "MetaSchedule trials, 0 = untuned (--tune-trials; the CLI's default is 64)")
    tune_cache: Optional[str] = _opt(None, "tuning database directory (--tune-cache)")
    tune_strategy: str = _opt("auto", "auto | replay | evolutionary")
    progress: Optional[Callable[[dict], None]] = _opt(None, "callable receiving tuning progress events",
                                                       config=False)
    fold_batchnorm: bool = _opt(True, "fold batch norm in Relax")
    fast_math: bool = _opt(True, "LLVM fast-math")
    seed: int = _opt(0, "tuning seed")

    def __post_init__(self) -> None:
        if self.tune_trials < 0:
            raise ConfigError(f"tune_trials must be >= 0, got {self.tune_trials}", "0 means untuned")


@dataclass(frozen=True)
class McuOptions:
    target: str = _opt("host", "host | cortex-m4 | cortex-m7 (--target)",
                       choices=("cortex-m4", "cortex-m7", "host"))
    ram_kb: int = _opt(320, "SRAM budget in KB the firmware must link within (--ram-kb)")
    flash_kb: int = _opt(1024, "flash budget in KB (--flash-kb)")
    measure: bool = _opt(True, "measure stack and instructions under QEMU")
    sparse: bool = _opt(True, "compressed N:M kernels for N:M-masked layers")
    stream: bool = _opt(True, "stream activations through the planned arena")
    patches: str = _opt("auto", "patch-based execution of the first CNN stage: auto (on when it lowers "
                                "the peak SRAM) | on | off | N or RxC (that grid of patches)")
    patch_overhead: int = _opt(20, "patches: the most recompute allowed, in % of the model's MACs")

    def __post_init__(self) -> None:
        if self.ram_kb <= 0 or self.flash_kb <= 0:
            raise ConfigError(f"ram_kb={self.ram_kb}, flash_kb={self.flash_kb}", "budgets are positive KB")
        import re
        if self.patches not in ("auto", "on", "off") and not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)?", self.patches):
            raise ConfigError(f"unknown mcu patches {self.patches!r}", "valid patches: auto, on, off, N, RxC (e.g. 4x4)")
        if self.patch_overhead < 0:
            raise ConfigError(f"patch_overhead={self.patch_overhead}", "a percentage >= 0")


@dataclass(frozen=True)
class OpenvinoOptions:
    target: str = _opt("auto", "auto (GPU when OpenVINO sees one, else CPU) | cpu | gpu (--target)",
                       choices=("auto", "cpu", "gpu"))
    precision: str = _opt("f32", "f32 (exact, the default) | bf16 (lossy: checked within 2^-5 relative) | auto "
                                 "(OpenVINO's choice for the device: bf16 on CPUs with bf16 units, f16 on GPU) "
                                 "(--precision)", choices=("f32", "bf16", "auto"))


OPTIONS: dict[str, type] = {"torch": TorchOptions, "ort": OrtOptions, "tvm": TvmOptions, "mcu": McuOptions,
                          "openvino": OpenvinoOptions}


def _check_type(backend: str, name: str, value: Any, hint: Any, choices=None) -> Any:
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    want = getattr(base, "__name__", str(base))
    if typing.get_origin(base) is not None and callable(value):  # Callable[...]
        return value
    if base is int and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return int(value)
        except ValueError:
            pass
    elif base is bool and isinstance(value, bool):
        return value
    elif base is str and isinstance(value, str):
        if choices and value not in choices:
            raise ConfigError(f"unknown {backend} {name} {value!r}", f"valid {name}s: {', '.join(choices)}")
        return value
    want = {"int": "an integer", "bool": "true or false", "str": "a string"}.get(want, want)
    raise ConfigError(f"backend {backend!r}: {name} must be {want}, got {value!r}",
                      f"e.g. {name}={field_default(backend, name)!r}")


def field_default(backend: str, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(OPTIONS[backend])}[name]


def make_options(backend: str, given: Mapping[str, Any] | Any = None) -> Any:
    """``given`` (a dict, or already the backend's dataclass) -> the backend's dataclass."""
    cls = OPTIONS.get(backend)
    if cls is None:  # a third-party backend registered without typed options: keep its dict
        return dict(given or {})
    if isinstance(given, cls):
        return given
    given = {k: v for k, v in dict(given or {}).items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(f"backend {backend!r} has no option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}", f"valid options: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    options = cls(**{k: _check_type(backend, k, v, hints[k], fields[k].metadata.get("choices"))
                     for k, v in given.items()})
    object.__setattr__(options, "_given", tuple(given))  # what the user set: the manifest records it
    return options


def as_config(options: Any, *, keep_callables: bool = False) -> dict[str, Any]:
    """The options as plain data for manifest.json (callables are not configuration)."""
    if dataclasses.is_dataclass(options):
        if keep_callables:  # every option, for the backend itself
            return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        given = getattr(options, "_given", [f.name for f in dataclasses.fields(options)])
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                if f.name in given and f.metadata.get("config", True)}
    return {k: as_config(v) if isinstance(v, dict) or dataclasses.is_dataclass(v) else v
            for k, v in dict(options).items() if not callable(v)}


def describe() -> str:
    """Every backend's options, one line each, for ``compile --help``."""
    lines = []
    for backend, cls in OPTIONS.items():
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]
        lines += [f"  {backend}.{f.name}={f.default!r}: {f.metadata['help']}" for f in fields]
    return "\n".join(lines)
