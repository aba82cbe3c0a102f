"""The QEMU TB-log reader behind instruction counts (``firmware/qemu._count_window``),
on hand-written logs whose counts are known: executions inside the marker window
only, calls out of the step split where execution returns to it, chunk boundaries
anywhere in a line, and a block executed without being shown refused."""
from __future__ import annotations

import io

import pytest

from gradrewrite.backends.mcu.firmware import qemu
from gradrewrite.errors import BackendError


def block(sym: str, pc: int, n: int) -> str:
    return f"IN: {sym}\n" + "".join(f"0x{pc + 2 * i:08x}:  nop\n" for i in range(n)) + "\n"


def trace(sym: str, pc: int) -> str:
    return f"Trace 0: 0x7f00{pc:04x} [00000000/{pc:08x}/00000000/ff020000] {sym}\n"


def step_log() -> str:
    """main (4 instructions) runs before the window; inside it the step (2 per TB) calls
    kern (3 per TB) five times, then twice more; main after the window is not counted."""
    return (block("main", 0x100, 4) + trace("main", 0x100) + block("gr_mark_begin", 0x200, 1)
            + trace("gr_mark_begin", 0x200) + block("model_train_step", 0x300, 2) + trace("model_train_step", 0x300)
            + block("kern", 0x400, 3) + trace("kern", 0x400) * 5 + trace("model_train_step", 0x300)
            + trace("kern", 0x400) * 2 + trace("model_train_step", 0x300) + block("gr_mark_end", 0x500, 1)
            + trace("gr_mark_end", 0x500) + trace("main", 0x100) * 3)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 24])
def test_counts_and_calls(monkeypatch, chunk):
    monkeypatch.setattr(qemu, "_CHUNK", chunk)
    counts, calls = qemu._count_window(io.BytesIO(step_log().encode()))
    assert dict(counts) == {b"00000300": 3 * 2, b"00000400": 7 * 3}
    assert calls == [["kern", 15], ["kern", 6]]


def test_log_without_its_last_newline(monkeypatch):
    monkeypatch.setattr(qemu, "_CHUNK", 5)
    counts, _ = qemu._count_window(io.BytesIO(step_log().rstrip("\n").encode()))
    assert counts[b"00000400"] == 21


def test_block_never_shown_is_refused():
    log = step_log().replace(block("kern", 0x400, 3), "")
    with pytest.raises(BackendError, match="never showed"):
        qemu._count_window(io.BytesIO(log.encode()))


def test_window_never_closed_is_refused():
    log = step_log().split("IN: gr_mark_end")[0]
    with pytest.raises(BackendError, match="never showed model_run finishing"):
        qemu._count_window(io.BytesIO(log.encode()))
