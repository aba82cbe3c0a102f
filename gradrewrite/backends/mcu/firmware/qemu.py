"""Run Cortex-M firmware under qemu-system-arm and measure one inference.

The harness (templates/main.c) reads ``input.bin`` and writes ``output.bin`` through
semihosting, relative to the directory QEMU runs in (a temporary one), and prints
``gr: key=value`` lines: model_run's status, the stack high-water mark found by stack
painting, the heap the harness's stdio took.

Instruction counts. QEMU models no cycle counter and Debian's QEMU ships no TCG
plugins, so counts come from QEMU's own logs: ``-d in_asm`` prints every translated
block (TB) with its instructions, ``-d exec`` (with ``nochain``) one line per executed
TB. Summing the length of each executed TB gives the exact number of instructions
executed; only those between the harness's ``gr_mark_begin`` and ``gr_mark_end`` calls
and outside ``main`` are counted, i.e. model_run and everything it calls. The log is
streamed through a pipe and never hits the disk. These are instruction counts, not
cycles: QEMU does not model pipelines, wait states or caches.
"""
from __future__ import annotations

import bisect
import fcntl
import itertools
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ....errors import BackendError
from .build import ELF, check_harness_exit, toolchain_missing
from ..targets import get_target

RUN_TIMEOUT_S = 120
COUNT_TIMEOUT_S = 600
MARK_BEGIN, MARK_END = "gr_mark_begin", "gr_mark_end"
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GLUE = {"main", MARK_BEGIN, MARK_END}   # harness code inside the window, not the model's


def qemu_command(elf: Path, target: str) -> list[str]:
    tgt = get_target(target)
    if tgt.is_host:
        raise BackendError("the host target runs natively, not under QEMU", "use firmware.run_host")
    return ["qemu-system-arm", "-M", tgt.qemu_machine, "-nographic", "-monitor", "none", "-serial", "none",
            "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]


def run_firmware(elf: str | Path, input_bytes: bytes, target: str, *, count_instructions: bool = False,
                 per_symbol: bool = False, timeout_s: float | None = None) -> tuple[bytes, dict[str, Any]]:
    """Run ``elf`` on one input under QEMU; returns (output bytes, stats).

    stats: ``exit_code``, ``stack_model_bytes`` (model_run's own stack high-water mark),
    ``stack_peak_bytes`` (the whole run's), ``stack_reserve_bytes``, ``heap_used_bytes``,
    and with ``count_instructions`` ``instructions`` (per inference, model_run only);
    ``per_symbol`` adds ``instructions_per_symbol`` {function: instructions} and
    ``instructions_per_call``: model_run's calls in order (one per kernel call, so per
    layer), each {"function", "instructions"} including what the callee calls.
    """
    elf = Path(elf).resolve()
    reason = toolchain_missing(target)
    if reason:
        raise BackendError(f"cannot run firmware for {target}: {reason}")
    if not elf.is_file():
        raise BackendError(f"firmware {str(elf)!r} does not exist", "compile the model with --backend mcu first")
    count = count_instructions or per_symbol
    timeout = timeout_s or (COUNT_TIMEOUT_S if count else RUN_TIMEOUT_S)
    cmd = qemu_command(elf, target)
    with tempfile.TemporaryDirectory(prefix="gr-qemu-") as tmp:
        (Path(tmp) / "input.bin").write_bytes(input_bytes)
        t0 = time.perf_counter()
        if count:
            code, text, counter = run_counting(cmd, tmp, timeout)
        else:
            (code, text), counter = _run_plain(cmd, tmp, timeout), None
        seconds = time.perf_counter() - t0
        check_harness_exit(code, text, f"{target} firmware (QEMU)")
        out_path = Path(tmp) / "output.bin"
        if not out_path.is_file():
            raise BackendError("the firmware exited without writing its output",
                               "semihosting file I/O failed; check the QEMU version (7.2 is known to work)")
        output = out_path.read_bytes()
    stats: dict[str, Any] = {"exit_code": code, "qemu_seconds": round(seconds, 3), **_harness_values(text)}
    reserve = stats.get("stack_reserve_bytes")
    if reserve and stats.get("stack_peak_bytes", 0) >= reserve:  # painting found no untouched word
        raise BackendError(f"the firmware used its whole {reserve}-byte stack reserve: the stack overflowed "
                           "into the heap", "the generated code needs far less stack; report it")
    if counter is not None:
        per_pc, calls = counter
        per_fn = by_symbol(per_pc, elf)
        stats["instructions"] = sum(per_fn.values())
        stats["instructions_note"] = "instructions executed by model_run (QEMU TB log), not cycles"
        if per_symbol:
            stats["instructions_per_symbol"] = dict(sorted(per_fn.items(), key=lambda kv: -kv[1]))
            stats["instructions_per_call"] = [{"function": f, "instructions": n} for f, n in calls]
    return output, stats


def _timeout_error(timeout: float) -> BackendError:
    return BackendError(f"QEMU did not finish within {timeout:g} s",
                        "the firmware may hang (or the model is too big to emulate in time); "
                        "rerun with a longer timeout, or check it on the host target first")


def _run_plain(cmd: list[str], cwd: str, timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise _timeout_error(timeout) from exc
    return proc.returncode, proc.stdout + proc.stderr


def run_counting(cmd: list[str], cwd: str, timeout: float) -> tuple[int, str, tuple[Counter, list]]:
    """Run with the TB log on a pipe; returns (exit code, console text, _count_window's result)."""
    read_fd, write_fd = os.pipe()
    try:  # a 1 MB pipe: fewer switches between QEMU writing the log and this process reading it
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    cmd = cmd + ["-d", "nochain,in_asm,exec", "-D", f"/dev/fd/{write_fd}"]
    with tempfile.TemporaryFile("w+") as console:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, pass_fds=(write_fd,))
        os.close(write_fd)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as log:
                counter = _count_window(_PipeReader(log))
            code = proc.wait()
        except BackendError:
            if timed_out.is_set():  # the log ended because QEMU was killed
                raise _timeout_error(timeout) from None
            code = proc.wait()
            console.seek(0)  # a fault or bad input explains an unfinished log best
            check_harness_exit(code, console.read(), "firmware (QEMU)")
            raise
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if timed_out.is_set():
            raise _timeout_error(timeout)
        console.seek(0)
        return code, console.read(), counter


class _PipeReader:
    """``read(n)`` on the log pipe that waits for the pipe to fill: QEMU writes its log a
    line at a time (line-buffered), and a reader blocked on the pipe is woken for every
    line (tens of millions of switches; a 1 GB step log took 29 s to count, 23 s this way)."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.raw.read(min(n - got, 1 << 20))
            if not b:
                break
            parts.append(b)
            got += len(b)
            if len(b) < 1 << 19:   # the pipe was not half full: let QEMU write a while
                time.sleep(0.004)
        return b"".join(parts)


_BEGIN, _END, _OWN, _CALLEE = range(4)
_CHUNK = 1 << 24   # bytes of log read at a time


class _LogLines:
    """What each distinct log line of QEMU's TB log means, numbered: an ``exec`` line
    (``Trace 0: 0x<host> [<cs_base>/<pc>/<flags>/<cflags>] <symbol>``, the same text for
    every execution of one TB) gets an id the first time it is seen, with its TB's
    instruction count (from the ``in_asm`` block, "IN: sym", one "0x...:" line per
    instruction, a blank line, that precedes the TB's first execution), its kind and
    symbol. Other lines are read in order, as they come, to learn the blocks' lengths."""

    def __init__(self):
        self.ids: dict[bytes, int] = {}
        self.n: list[int] = []        # instructions per id, -1 where the block was never shown
        self.kind: list[int] = []
        self.sym: list[str] = []
        self.tb_len: dict[bytes, int] = {}
        self.block_pc: bytes | None = None
        self.block_n = 0

    def resolve(self, line: bytes) -> int:
        """The id of an unseen line (-1: not an exec line, read for block lengths)."""
        known = self.ids.get(line)
        if known is not None:
            return known
        if not line.startswith(b"Trace"):
            if line.startswith(b"0x"):
                if self.block_pc is None:
                    self.block_pc = b"%08x" % int(line[2:line.index(b":")], 16)
                self.block_n += 1
            elif line.startswith(b"IN:"):
                self.block_pc, self.block_n = None, 0
            elif self.block_pc is not None and not line.strip():
                self.tb_len[self.block_pc] = self.block_n
                self.block_pc, self.block_n = None, 0
            return -1
        sym = line[line.rindex(b"] ") + 2:].strip().decode(errors="replace")
        self.ids[line] = len(self.n)
        self.n.append(self.tb_len.get(line.split(b"/", 2)[1], -1))
        self.kind.append({MARK_BEGIN: _BEGIN, MARK_END: _END, "model_run": _OWN, "model_train_step": _OWN,
                          "main": _OWN}.get(sym, _CALLEE))
        self.sym.append(sym)
        return self.ids[line]


def _count_window(log) -> tuple[Counter, list[list]]:
    """Instructions per TB start address executed between the two marker calls, and
    the calls model_run makes, in order: [[callee, instructions], ...].

    The log (tens of millions of lines) is read in chunks: each line is looked up as a
    whole in the table of distinct lines (``_LogLines``); only lines not seen before
    are parsed, in order; the window, the executions per TB and the calls are then
    counted with numpy. A call starts when execution leaves model_run (or main)."""
    table = _LogLines()
    executed = np.zeros(0, np.int64)            # executions inside the window, per id
    calls: list[list] = []
    state, in_call, rest = 0, False, b""         # state 0: before the window, 1: inside, 2: after
    while rest is not None:
        chunk = log.read(_CHUNK)
        if state == 2:
            rest = b"" if chunk else None        # drain the pipe: QEMU writes until it exits
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop() if chunk else None    # at the end, the last line even without its newline
        ids = np.fromiter(map(table.ids.get, lines, itertools.repeat(-1)), np.int64, len(lines))
        for i in np.flatnonzero(ids < 0).tolist():  # first sightings and in_asm lines, in order
            ids[i] = table.resolve(lines[i])
        ids = ids[ids >= 0]
        kind = np.asarray(table.kind, np.int8)[ids]
        if state == 0:
            begin = np.flatnonzero(kind == _BEGIN)
            if not begin.size:
                continue
            state, ids, kind = 1, ids[begin[0] + 1:], kind[begin[0] + 1:]
        end = np.flatnonzero(kind == _END)
        if end.size:
            state, ids, kind = 2, ids[:end[0]], kind[:end[0]]
        if not ids.size:
            continue
        n = np.asarray(table.n, np.int64)[ids]
        if (n < 0).any():
            raise BackendError("QEMU's log executed a block it never showed",
                               "the instruction count needs QEMU's in_asm/exec log format (7.2)")
        executed = np.pad(executed, (0, len(table.n) - executed.size))
        executed += np.bincount(ids, minlength=len(table.n))
        own = kind == _OWN
        callee_n = np.where(own, 0, n)
        starts = np.flatnonzero(~own & np.concatenate(([not in_call], own[:-1])))
        head = int(callee_n[:starts[0]].sum()) if starts.size else int(callee_n.sum())
        if calls and head:
            calls[-1][1] += head
        if starts.size:
            sums = np.add.reduceat(callee_n, starts).tolist()
            calls += [[table.sym[i], s] for i, s in zip(ids[starts].tolist(), sums)]
        in_call = not bool(own[-1])
    if state != 2:
        raise BackendError("the instruction log never showed model_run finishing",
                           "the firmware faulted or was stopped early; run it without counting first")
    counts: Counter = Counter()
    pcs = {i: line.split(b"/", 2)[1] for line, i in table.ids.items()}
    for i in np.flatnonzero(executed).tolist():
        counts[pcs[i]] += int(executed[i]) * table.n[i]
    return counts, calls


def _symbols(elf: Path) -> tuple[list[int], list[str]]:
    """Function start addresses (Thumb bit cleared) and names, sorted."""
    proc = subprocess.run(["arm-none-eabi-nm", "-n", "--defined-only", str(elf)], capture_output=True,
                          text=True, check=True)
    table = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW" and not parts[2].startswith("$"):
            table.append((int(parts[0], 16) & ~1, parts[2]))
    table.sort()
    return [a for a, _ in table], [n for _, n in table]


def by_symbol(counter: Counter, elf: Path) -> dict[str, int]:
    addrs, names = _symbols(elf)
    per_fn: Counter = Counter()
    for pc, n in counter.items():
        i = bisect.bisect_right(addrs, int(pc, 16)) - 1
        name = names[i] if i >= 0 else "?"
        if name not in _GLUE:
            per_fn[name] += n
    return dict(per_fn)


def _harness_values(text: str) -> dict[str, int]:
    """The harness's 'gr: key=value' numbers, as stats (bytes keys get a _bytes suffix)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("gr: ") or line.startswith("gr: error"):
            continue
        for item in line[4:].split():
            key, _, value = item.partition("=")
            if value.lstrip("-").isdigit():
                name = key if key == "model_run" else f"{key}_bytes"
                values[name] = int(value)
    return values


def per_layer(ops: list[dict[str, Any]], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Attribute model_run's calls to the code generator's ops (in order, by kernel name).

    A call whose function is not the next op's kernel (a copy making a view contiguous,
    a helper) is counted with the op it precedes; calls after the last op (copying the
    outputs out) are reported apart.
    """
    layers = [{"path": op.get("path", ""), "op": op.get("op", ""), "kernel": op.get("kernel", ""),
               "instructions": 0} for op in ops]
    j, pending, unmatched = 0, 0, 0
    for call in calls:
        if j < len(layers) and call["function"] == layers[j]["kernel"]:
            layers[j]["instructions"] += pending + call["instructions"]
            pending, j = 0, j + 1
        else:
            pending += call["instructions"]
            unmatched += 1
    return {"layers": layers, "after_last_layer": pending, "calls_not_named_by_an_op": unmatched,
            "matched_all": j == len(layers)}


def measure(project_dir: str | Path, target: str, input_bytes: bytes, *, ops: list[dict[str, Any]] | None = None,
            count_instructions: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
    """One inference of the project's firmware.elf, measured for report.json: stack
    high-water mark, harness heap, and (when asked) instructions per inference, per
    function and per layer (``ops``: the code generator's op list, in call order)."""
    _, stats = run_firmware(Path(project_dir) / ELF, input_bytes, target, per_symbol=count_instructions,
                            timeout_s=timeout_s)
    result = {k: stats[k] for k in ("stack_model_bytes", "stack_peak_bytes", "stack_reserve_bytes",
                                    "heap_used_bytes") if k in stats}
    if count_instructions:
        result.update(instructions=stats["instructions"], instructions_note=stats["instructions_note"],
                      instructions_per_symbol=stats["instructions_per_symbol"])
        if ops is not None:
            result["instructions_per_layer"] = per_layer(ops, stats["instructions_per_call"])
        else:
            result["instructions_per_call"] = stats["instructions_per_call"]
    return result
