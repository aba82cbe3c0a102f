"""Build a generated mcu project for the host or for Cortex-M firmware.

The project directory (written by the code generator) holds ``model.h``, ``model.c``,
``weights.c`` and ``kernels/``. This module adds the build files from ``templates/`` —
a standalone ``Makefile`` and ``harness/`` (``main.c``, the MPS2 startup code and a
linker script template whose RAM/flash lengths are the budget) — and runs ``make``:

- ``build_host(project_dir)`` -> ``project_dir/model_host``, run with ``run_host``;
- ``build_firmware(project_dir, target)`` -> ``firmware.elf`` / ``firmware.bin`` in the
  project dir and their section sizes; a model over budget fails at link time and
  the linker's "region overflowed" becomes one line saying by how much;
- ``build_train_firmware(project_dir, target, harness)`` -> the same inference image
  and a second one, ``train.elf`` / ``train.bin``, linked from the same objects with
  the training harness (``templates/train_main.c``) in place of ``main.c``: two
  images because both harnesses define ``main``. Both must fit the budget.

Objects are built in a temporary directory, so the project dir only gains the build
files and the products. Running the firmware under QEMU is ``qemu.run_firmware``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ....errors import BackendError
from ..c_files import template_dir
from ..targets import DEFAULT_FLASH_KB, DEFAULT_RAM_KB, TARGETS, check_budget, get_target

STACK_BYTES = 8192   # reserved inside the SRAM budget; the harness reports the high-water mark
HEAP_BYTES = 4096    # newlib stdio buffers of the harness (it measures ~2.5 KB)
HOST_EXE = "model_host"
ELF, BIN = "firmware.elf", "firmware.bin"
TRAIN_ELF, TRAIN_BIN = "train.elf", "train.bin"
# No FMA contraction: the int8 training reference rounds every multiply and add on its own
# (-std=c99 already implies it for gcc; spelled out so a flag change cannot undo it).
NO_CONTRACT = "-ffp-contract=off"
BUILD_TIMEOUT_S = 600
TEMPLATES = template_dir()
HARNESS_FILES = ("main.c", "startup_mps2.c", "gr_stack.h", "mps2.ld.in")


@dataclass
class FirmwareInfo:
    """A linked firmware image and what it takes of the budget (bytes)."""

    target: str
    elf: Path
    bin: Path
    sections: dict[str, int]
    flash_bytes: int           # .text + .rodata + .ARM.exidx + .data (its initial image)
    sram_bytes: int            # .data + .bss (arena included) + heap and stack reserves
    ram_budget_bytes: int
    flash_budget_bytes: int
    stack_reserve_bytes: int
    heap_reserve_bytes: int
    arena_bytes: int | None    # MODEL_ARENA_BYTES from model.h
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["elf"], d["bin"] = self.elf.name, self.bin.name
        return d


# ------------------------------------------------------------------ tools
def toolchain_missing(target: str) -> str | None:
    """None when ``target`` can be built (and run) here, else what to install."""
    tgt = get_target(target)
    need = ["make", "cc"] if tgt.is_host else ["make", "arm-none-eabi-gcc", "arm-none-eabi-objcopy",
                                               "arm-none-eabi-size", "arm-none-eabi-nm", "qemu-system-arm"]
    missing = [t for t in need if shutil.which(t) is None]
    if not missing:
        return None
    pkgs = "make gcc" if tgt.is_host else "make gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
    return f"{', '.join(missing)} not found (apt-get install {pkgs})"


def _require_tools(target: str) -> None:
    reason = toolchain_missing(target)
    if reason:
        raise BackendError(f"cannot build for {target}: {reason}")


# ------------------------------------------------------------------ build files
def _template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def _target_rules() -> str:
    """The Makefile's per-target block, generated from TARGETS (one source of truth)."""
    lines = []
    for i, tgt in enumerate(t for t in TARGETS.values() if not t.is_host):
        lines += [f"{'ifeq' if i == 0 else 'else ifeq'} ($(TARGET),{tgt.name})",
                  f"CPU := {' '.join(tgt.cpu_flags)}",
                  f"QEMU_MACHINE := {tgt.qemu_machine}"]
    names = ", ".join(TARGETS)
    lines += ["else ifneq ($(TARGET),host)", f"$(error unknown TARGET=$(TARGET); use one of: {names})", "endif"]
    return "\n".join(lines)


def write_build_files(project_dir: str | Path, *, target: str = "host", ram_kb: int = DEFAULT_RAM_KB,
                      flash_kb: int = DEFAULT_FLASH_KB, stack_bytes: int = STACK_BYTES,
                      heap_bytes: int = HEAP_BYTES) -> None:
    """Write ``Makefile`` and ``harness/`` into the project; their defaults (plain
    ``make``) are this target and budget."""
    project = Path(project_dir)
    get_target(target)
    check_budget(ram_kb, flash_kb)
    values = {"TARGET": target, "RAM_KB": ram_kb, "FLASH_KB": flash_kb, "STACK_BYTES": stack_bytes,
              "HEAP_BYTES": heap_bytes, "TARGET_RULES": _target_rules()}
    text = _template("Makefile")
    for key, value in values.items():
        text = text.replace("{{%s}}" % key, str(value))
    (project / "Makefile").write_text(text)
    (project / "harness").mkdir(exist_ok=True)
    for name in HARNESS_FILES:
        (project / "harness" / name).write_text(_template(name))


def _check_project(project: Path) -> None:
    missing = [f for f in ("model.h", "model.c") if not (project / f).is_file()]
    if missing:
        raise BackendError(f"{str(project)!r} is not a generated mcu project (missing {', '.join(missing)})",
                           "generate it with `gradrewrite compile MODEL --backend mcu`")


def _make(project: Path, build: Path, target: str, extra: dict[str, Any]) -> subprocess.CompletedProcess:
    args = ["make", "-C", str(project), "-j2", f"TARGET={target}", f"BUILD={build}",
            *(f"{k}={v}" for k, v in extra.items())]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
                              env=dict(os.environ, LC_ALL="C"))  # a stable locale: we parse ld's messages
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"building the mcu project for {target} took over {BUILD_TIMEOUT_S} s",
                           "the generated C is unusually large; check weights.c") from exc


def _compile_error(proc: subprocess.CompletedProcess, target: str) -> BackendError:
    lines = (proc.stderr + proc.stdout).strip().splitlines() or ["(no compiler output)"]
    useful = [l for l in lines if ("error" in l or "undefined reference" in l)
              and not l.startswith(("collect2", "make"))]
    first = useful[0] if useful else lines[-1]
    return BackendError(f"the generated C does not build for {target}: {first.strip()}",
                        "this is a code generator bug; rerun with --debug and report it")


# ------------------------------------------------------------------ host
def build_host(project_dir: str | Path) -> Path:
    """Compile the project with the system C compiler; returns the executable."""
    project = Path(project_dir)
    _check_project(project)
    _require_tools("host")
    if not (project / "Makefile").is_file():
        write_build_files(project)
    (project / HOST_EXE).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="gr-mcu-host-") as build:
        proc = _make(project, Path(build), "host", {})
        if proc.returncode != 0:
            raise _compile_error(proc, "host")
        exe = project / HOST_EXE
        shutil.copy2(Path(build) / "model", exe)
    return exe


def build_host_pair(project_dir: str | Path, harness: str, exe: str) -> tuple[Path, Path]:
    """The host executables of a training project from one set of objects (``make -j2``):
    ``model_host`` (main.c around model_run) and ``exe`` (``harness``, a path relative to
    the project, around model_train_step), built with -Werror and without FMA contraction
    (the integer reference rounds every multiply and add on its own)."""
    project = Path(project_dir)
    _check_project(project)
    _require_tools("host")
    if not (project / "Makefile").is_file():
        write_build_files(project)
    srcs = [*sorted(p.name for p in project.glob("*.c")),
            *sorted(f"kernels/{p.name}" for p in (project / "kernels").glob("*.c")), harness]
    products = []
    with tempfile.TemporaryDirectory(prefix="gr-mcu-host-") as build:
        build = Path(build)
        for name, extra in ((HOST_EXE, {}), (exe, {"SRCS": " ".join(srcs)})):
            (project / name).unlink(missing_ok=True)
            proc = _make(project, build, "host", {"EXTRA_CFLAGS": f"{NO_CONTRACT} -Werror", **extra})
            if proc.returncode != 0:
                raise _compile_error(proc, "host")
            shutil.copy2(build / "model", project / name)
            (build / "model").unlink()  # the next executable links afresh
            products.append(project / name)
    return products[0], products[1]


def run_host(exe: str | Path, input_bytes: bytes, *, timeout_s: float = 120) -> bytes:
    """Run the host executable on one input; returns the output bytes."""
    exe = Path(exe).resolve()
    if not exe.is_file():
        raise BackendError(f"host executable {str(exe)!r} does not exist",
                           "compile the model with --backend mcu again")
    with tempfile.TemporaryDirectory(prefix="gr-mcu-run-") as tmp:
        (Path(tmp) / "input.bin").write_bytes(input_bytes)
        try:
            proc = subprocess.run([str(exe), "input.bin", "output.bin"], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"the host build of the model did not finish within {timeout_s:g} s",
                               "the generated code may loop forever; report it") from exc
        check_harness_exit(proc.returncode, proc.stdout + proc.stderr, "host build")
        return (Path(tmp) / "output.bin").read_bytes()


def check_harness_exit(code: int, output: str, where: str) -> None:
    """Turn the harness's exit code and its 'gr: error:' lines into one clear error."""
    if code == 0:
        return
    said = [l.removeprefix("gr: error:").strip() for l in output.splitlines() if l.startswith("gr: error:")]
    if code == 70 or "gr: fault" in output:
        raise BackendError(f"the {where} hit a CPU fault while running the model",
                           "this is a code generator or kernel bug (bad memory access); report it")
    if code == 4:
        raise BackendError(f"model_run returned an error in the {where}", "report it with the model")
    if code < 0:
        raise BackendError(f"the {where} was killed by signal {-code}",
                           "this is a code generator or kernel bug (bad memory access); report it")
    detail = said[0] if said else (output.strip().splitlines() or [""])[-1]
    raise BackendError(f"the {where} exited with code {code}: {detail}",
                       "check that the input matches the compiled shape and dtype")


# ------------------------------------------------------------------ firmware
def _prepare_firmware(project_dir: str | Path, target: str, what: str, products: tuple[str, ...],
                      **budget: int) -> Path:
    """Checks before a Cortex-M build, the build files, and no stale ``products`` (a
    failed build must not leave an older image behind)."""
    project = Path(project_dir)
    if get_target(target).is_host:
        raise BackendError(f"{what} needs a Cortex-M target; the host target uses build_host",
                           f"pick one of: {', '.join(t for t in TARGETS if not TARGETS[t].is_host)}")
    check_budget(budget["ram_kb"], budget["flash_kb"])
    _check_project(project)
    _require_tools(target)
    write_build_files(project, target=target, **budget)
    for name in products:
        (project / name).unlink(missing_ok=True)
    return project


def build_firmware(project_dir: str | Path, target: str, *, ram_kb: int = DEFAULT_RAM_KB,
                   flash_kb: int = DEFAULT_FLASH_KB, stack_bytes: int = STACK_BYTES,
                   heap_bytes: int = HEAP_BYTES) -> FirmwareInfo:
    """Cross-compile and link for ``target`` within the budget; writes firmware.elf/.bin."""
    project = _prepare_firmware(project_dir, target, "build_firmware", (ELF, BIN), ram_kb=ram_kb,
                                flash_kb=flash_kb, stack_bytes=stack_bytes, heap_bytes=heap_bytes)
    with tempfile.TemporaryDirectory(prefix="gr-mcu-fw-") as build:
        build = Path(build)
        proc = _make(project, build, target, {})
        if proc.returncode != 0:
            over = _overflows(proc.stderr + proc.stdout)
            if over:
                raise _budget_error(over, project, target, ram_kb, flash_kb)
            raise _compile_error(proc, target)
        for name in (ELF, BIN):
            shutil.copy2(build / name, project / name)
    return _firmware_info(project, target, ram_kb, flash_kb, stack_bytes, heap_bytes)


_OVERFLOW = re.compile(r"region `(\w+)' overflowed by (\d+) bytes")


def _overflows(text: str) -> dict[str, int]:
    """{'RAM': bytes over, 'FLASH': bytes over} from the linker's messages."""
    over: dict[str, int] = {}
    for region, n in _OVERFLOW.findall(text):
        over[region] = max(over.get(region, 0), int(n))
    return over


def _budget_error(over: dict[str, int], project: Path, target: str, ram_kb: int, flash_kb: int, *,
                  what: str = "the model", hint: str | None = None) -> BackendError:
    parts = []
    if "RAM" in over:
        arena = model_macro(project, "MODEL_ARENA_BYTES")
        arena_txt = f"; the activation arena alone is {_kb(arena)}" if arena is not None else ""
        parts.append(f"SRAM by {_kb(over['RAM'])} (budget {ram_kb} KB, stack {_kb(STACK_BYTES)} "
                     f"and harness heap {_kb(HEAP_BYTES)} included{arena_txt})")
    if "FLASH" in over:
        parts.append(f"flash by {_kb(over['FLASH'])} (budget {flash_kb} KB)")
    return BackendError(f"{what} does not fit {target}: it exceeds " + " and ".join(parts),
                        hint or "raise --ram-kb / --flash-kb if the device has more, or shrink the model "
                        "(int8 quantization, N:M sparsity, a smaller input or width)")


def _kb(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.1f} KB"


def model_macro(project: Path, name: str) -> int | None:
    """An integer #define from the generated model.h (None when absent)."""
    try:
        text = (Path(project) / "model.h").read_text()
    except OSError:
        return None
    m = re.search(rf"#define\s+{name}\s+\(?\s*(\d+)u?l?\s*\)?", text, re.IGNORECASE)
    return int(m.group(1)) if m else None


def section_sizes(elf: Path) -> dict[str, int]:
    """Allocated section sizes of an ELF (arm-none-eabi-size -A)."""
    proc = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=True)
    sizes = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and not parts[0].startswith((".debug", ".comment",
                                                                                      ".ARM.attributes")):
            sizes[parts[0]] = int(parts[1])
    return sizes


def _firmware_info(project: Path, target: str, ram_kb: int, flash_kb: int, stack_bytes: int,
                   heap_bytes: int, *, elf: str = ELF, bin_name: str = BIN) -> FirmwareInfo:
    s = section_sizes(project / elf)
    get = s.get
    flash = get(".text", 0) + get(".rodata", 0) + get(".ARM.exidx", 0) + get(".data", 0)
    sram = get(".data", 0) + get(".bss", 0) + get(".heap", 0) + get(".stack", 0)
    return FirmwareInfo(target=target, elf=project / elf, bin=project / bin_name, sections=s,
                        flash_bytes=flash, sram_bytes=sram, ram_budget_bytes=ram_kb * 1024,
                        flash_budget_bytes=flash_kb * 1024, stack_reserve_bytes=get(".stack", stack_bytes),
                        heap_reserve_bytes=heap_bytes,
                        arena_bytes=model_macro(project, "MODEL_ARENA_BYTES"),
                        notes={"flash": ".text + .rodata + .ARM.exidx + .data",
                               "sram": ".data + .bss (arena, harness input/output buffers) + heap + stack reserve"})


# ------------------------------------------------------------------ training firmware
TRAIN_BUDGET_HINT = ("raise --ram-kb / --flash-kb if the device has more, or train fewer parameters "
                     "(a sparser sparse-update scheme keeps more weights in flash and needs less SRAM)")


def build_train_firmware(project_dir: str | Path, target: str, harness: str, *, ram_kb: int = DEFAULT_RAM_KB,
                         flash_kb: int = DEFAULT_FLASH_KB, stack_bytes: int = STACK_BYTES,
                         heap_bytes: int = HEAP_BYTES) -> tuple[FirmwareInfo, FirmwareInfo]:
    """Link a training project twice within the budget: ``firmware.elf`` (main.c around
    model_run) and ``train.elf`` (``harness``, a path relative to the project, around
    model_train_step); the objects are compiled once. Returns (inference, training) info."""
    project = _prepare_firmware(project_dir, target, "build_train_firmware", (ELF, BIN, TRAIN_ELF, TRAIN_BIN),
                                ram_kb=ram_kb, flash_kb=flash_kb, stack_bytes=stack_bytes, heap_bytes=heap_bytes)
    # The Makefile's SRCS with the training harness for main.c (a command-line SRCS
    # replaces the Makefile's, so the startup code is listed too).
    train_srcs = [*sorted(p.name for p in project.glob("*.c")),
                  *sorted(f"kernels/{p.name}" for p in (project / "kernels").glob("*.c")),
                  harness, "harness/startup_mps2.c"]
    images = ((ELF, BIN, {}), (TRAIN_ELF, TRAIN_BIN, {"SRCS": " ".join(train_srcs)}))
    with tempfile.TemporaryDirectory(prefix="gr-mcu-fw-") as build:
        build = Path(build)
        for elf, bin_name, extra in images:
            proc = _make(project, build, target, {"EXTRA_CFLAGS": NO_CONTRACT, **extra})
            if proc.returncode != 0:
                over = _overflows(proc.stderr + proc.stdout)
                if over:
                    # both images hold the trained parameters and the step's one arena
                    raise _budget_error(over, project, target, ram_kb, flash_kb, what="the training step",
                                        hint=TRAIN_BUDGET_HINT)
                raise _compile_error(proc, target)
            shutil.copy2(build / ELF, project / elf)
            shutil.copy2(build / BIN, project / bin_name)
            (build / ELF).unlink()  # the next image links afresh
    return tuple(_firmware_info(project, target, ram_kb, flash_kb, stack_bytes, heap_bytes, elf=elf,
                                bin_name=bin_name) for elf, bin_name, _ in images)
