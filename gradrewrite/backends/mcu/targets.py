"""Targets of the mcu backend: how to compile for them and where their firmware runs.

Cortex-M targets run under qemu-system-arm on an Arm MPS2 board model: 4 MiB at 0x0
serves as flash and 4 MiB at 0x20000000 as SRAM; the linker script shrinks both to
the target's budget so a model that does not fit fails at link time. The default
budget is an STM32F746's (320 KB SRAM, 1 MB flash).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ..options import field_default

DEFAULT_RAM_KB = field_default("mcu", "ram_kb")
DEFAULT_FLASH_KB = field_default("mcu", "flash_kb")
BOARD_RAM_KB = 4096     # what the MPS2 boards model at 0x20000000
BOARD_FLASH_KB = 4096   # ... and at 0x0


@dataclass(frozen=True)
class Target:
    name: str
    cpu_flags: tuple[str, ...] = ()   # arm-none-eabi-gcc flags; empty for the host
    qemu_machine: str | None = None   # qemu-system-arm -M; None: runs natively

    @property
    def is_host(self) -> bool:
        return self.qemu_machine is None


TARGETS: dict[str, Target] = {
    "cortex-m4": Target("cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
                        "mps2-an386"),
    "cortex-m7": Target("cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
                        "mps2-an500"),
    "host": Target("host"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"unknown mcu target {name!r}", f"valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def check_budget(ram_kb: int, flash_kb: int) -> None:
    """The budgets must be positive and fit the emulated board."""
    for label, value, limit in (("--ram-kb", ram_kb, BOARD_RAM_KB), ("--flash-kb", flash_kb, BOARD_FLASH_KB)):
        if not isinstance(value, int) or not 0 < value <= limit:
            raise ConfigError(f"{label} {value} is outside 1..{limit}",
                              f"the emulated MPS2 board has {limit} KB; pick a budget within it")
