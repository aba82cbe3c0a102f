"""Peak resident memory of this process, for ``report.json``.

Linux keeps the high-water mark of the resident set (``VmHWM`` in /proc/self/status),
elsewhere ``getrusage`` does: the peak since the process started, which for the CLI is
the whole compile (loading the model included) and what ``/usr/bin/time -v`` reports.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRss:
    """The process's peak resident memory, recorded after named stages."""

    def __init__(self) -> None:
        self.since = "process start"
        self.stages: dict[str, int] = {"start": self.peak_bytes()}

    @staticmethod
    def peak_bytes() -> int:
        kib = _status_kib("VmHWM")
        if kib is None:  # ru_maxrss: KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss if sys.platform == "darwin" else rss * 1024
        return kib * 1024

    def mark(self, stage: str) -> None:
        """The peak so far, once the stage ``stage`` is done."""
        self.stages[stage] = self.peak_bytes()

    def report(self, weight_bytes: int) -> dict:
        peak = self.peak_bytes()
        return {"peak_rss_bytes": peak, "since": self.since,
                "weight_bytes_fp32": weight_bytes,
                "peak_rss_over_fp32_weights": round(peak / weight_bytes, 3) if weight_bytes else None,
                "peak_after_stage": self.stages,
                "note": "VmHWM of the compiling process (all its resident pages, memory-mapped "
                        "weights and the imported libraries included)"}


def fp32_weight_bytes(gm) -> int:
    """Bytes of the module's floating-point weights at fp32 (each shared tensor once)."""
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total
