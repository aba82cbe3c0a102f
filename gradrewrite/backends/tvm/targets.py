"""Pick the TVM target: the host CPU (LLVM, with its detected ``mcpu``) or a CUDA GPU.

TVM 0.27 rejects the old string form (``"llvm -mcpu=..."``); targets are built from
config dicts. MetaSchedule needs ``num-cores`` on CPU targets, so it is always set.
An LLVM artifact built for the detected CPU uses its vector extensions (AVX-512 on a
recent x86) and may not run on an older CPU: pass ``mcpu="generic"`` (or an
architecture name such as ``x86-64-v3``) for a portable library.
"""
from __future__ import annotations

import os
from typing import Any

from ...errors import BackendError, ConfigError

TARGET_KINDS = ("auto", "llvm", "cuda")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def host_cpu() -> str:
    """The LLVM name of this machine's CPU (``rocketlake``, ``znver3`` …), else ``generic``."""
    import tvm

    codegen = tvm.target.codegen
    try:
        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # an LLVM-less build or an unknown API: stay portable
        return "generic"
    if not cpu or cpu == "generic":
        return "generic"
    try:
        if not codegen.llvm_is_valid_cpu(cpu, str(codegen.llvm_get_system_triple())):
            return "generic"
    except Exception:
        pass
    return cpu


def cuda_available() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def resolve_kind(kind: str) -> str:
    if kind not in TARGET_KINDS:
        raise ConfigError(f"unknown TVM target {kind!r}", f"valid targets: {', '.join(TARGET_KINDS)}")
    if kind == "auto":
        return "cuda" if cuda_available() else "llvm"
    if kind == "cuda" and not cuda_available():
        raise BackendError("TVM target 'cuda' was requested but TVM sees no CUDA device",
                           "use target=llvm (or auto), or install a CUDA-enabled TVM build on a GPU machine")
    return kind


def llvm_target(mcpu: str | None = None, num_cores: int | None = None):
    from tvm.target import Target

    config: dict[str, Any] = {"kind": "llvm", "num-cores": int(num_cores or cpu_count())}
    cpu = mcpu or host_cpu()
    if cpu:
        config["mcpu"] = cpu
    try:
        return Target(config)
    except Exception as exc:
        raise ConfigError(f"TVM rejects the LLVM target {config}: {str(exc).strip().splitlines()[-1]}",
                          "pass mcpu='generic' or a CPU name LLVM knows (e.g. x86-64-v3, skylake-avx512)") from exc


def make_target(kind: str = "auto", *, mcpu: str | None = None, num_cores: int | None = None):
    """The ``tvm.target.Target`` for ``kind`` (``auto`` | ``llvm`` | ``cuda``)."""
    kind = resolve_kind(kind)
    host = llvm_target(mcpu, num_cores)
    if kind == "llvm":
        return host
    import tvm
    from tvm.target import Target

    try:
        gpu = Target.from_device(tvm.cuda(0))
    except Exception:
        gpu = Target({"kind": "cuda"})
    return Target(gpu, host=host)


def is_gpu(target) -> bool:
    return "gpu" in [str(k) for k in target.keys]
