"""Configuration: config/default.toml holds every default; a user file may override any subset.

Validation happens here, once, before anything is created: an unknown section or
key, a wrong type, or a value out of range raises ``ConfigError`` naming the file,
the key, what was given and what is accepted.
"""

from __future__ import annotations

import copy
import math
import re
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from smpd.host import names
from smpd.errors import BadInput, ConfigError
from smpd.host import files
from smpd.kernel.memmap import TEXT_NAMED, Boot, Sizes
from smpd.kernel.scenario import BOOT_FORM, KERNELS, flavour, parse_boot
from smpd.machine import layout as L

MAX_CPUS = 4096
WATCH_STRATEGIES = ("auto", "spin", "adaptive")
HOT_PATHS = ("auto", "c", "python")  # smpd.hotpath
PIN_POLICIES = ("none", "compact", "spread", "one")
INTERRUPT_KINDS = tuple(i.kind for i in L.Irq)  # nmi, smi, mce: the [signals] keys


def _int_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"an integer in {lo}..{hi}"
        return None if lo <= v <= hi else f"an integer in {lo}..{hi}"

    return check


def _float_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        return None if ok and lo <= v <= hi else f"a number in {lo}..{hi}"

    return check


def _choice(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


def _name(v: Any) -> str | None:
    return None if names.valid_machine_name(v) else names.NAME_ACCEPTED


def _auto_or(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def auto(v: Any) -> str | None:
        return None if v == "auto" else check(v) and f"\"auto\" or {check(v)}"

    return auto


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _boot(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"a string of boot parameters: {BOOT_FORM}"
    try:
        parse_boot(v, MAX_CPUS)
    except BadInput:
        return f"boot parameters: {BOOT_FORM}"
    return None


def _seed(v: Any) -> str | None:
    if v == "random":
        return None
    return _int_range(0, 2**63 - 1)(v) and "an integer in 0..2**63-1 or \"random\""


def parse_signal(v: Any) -> int:
    """'SIGUSR1', 'SIGUSR2' or 'SIGRTMIN+k' (0 <= k <= 15) -> signal number."""
    if v in ("SIGUSR1", "SIGUSR2"):
        return int(getattr(signal, v))
    m = re.fullmatch(r"SIGRTMIN\+([0-9]{1,2})", v) if isinstance(v, str) else None
    if m and int(m.group(1)) <= 15:
        return int(signal.SIGRTMIN) + int(m.group(1))
    raise ValueError(v)


def _signame(v: Any) -> str | None:
    try:
        parse_signal(v)
    except ValueError:
        return "\"SIGUSR1\", \"SIGUSR2\" or \"SIGRTMIN+k\" with 0 <= k <= 15"
    return None


# section -> key -> check(value) returning None when valid, else what is accepted.
SCHEMA: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "machine": {"cpus": _int_range(1, MAX_CPUS), "name": _name, "seed": _seed},
    "memory": {
        "text_pages": _int_range(TEXT_NAMED, 4096),
        "data_pages": _int_range(1, 1 << 16),
        "page_table_pages": _int_range(1, 4096),
        "stack_pages_per_cpu": _int_range(1, 16),
        "crashkernel_pages": _auto_or(_int_range(0, 1 << 20)),
        "ram_pages": _auto_or(_int_range(1, 1 << 24)),
    },
    "kernel": {"flavour": _choice(*KERNELS), "boot": _boot, "init_only_from_boot_cpu": _bool},
    "firmware": {"smi_auto_halt_restart": _bool, "smm_hangs_with_cpus_in_init": _bool},
    "watch": {
        "strategy": _choice(*WATCH_STRATEGIES),
        "spin_budget_us": _auto_or(_int_range(0, 1_000_000)),
        "spurious_per_s": _float_range(0, 100_000),
        "hot_path": _choice(*HOT_PATHS),
    },
    "pin": {"policy": _choice(*PIN_POLICIES)},
    "signals": {k: _signame for k in INTERRUPT_KINDS},
    "kick": {"delay_us": _int_range(1, 1000), "rounds": _int_range(1, 1_000_000)},
    "timeouts": {
        "ipi_ack_ms": _int_range(1, 600_000),
        "bringup_ms": _int_range(1, 600_000),
        "bringup_ms_per_cpu": _int_range(0, 10_000),
    },
    "host": {"memory_share": _float_range(0.05, 1.0), "cpu_process_mib": _int_range(1, 1024)},
}


@dataclass(frozen=True)
class Config:
    """Validated settings: ``cfg.get('watch', 'strategy')``; ``cfg.raw`` is the merged dict."""

    raw: dict[str, dict[str, Any]]

    def get(self, section: str, key: str) -> Any:
        return self.raw[section][key]

    def signals(self) -> dict[str, int]:
        return {k: parse_signal(self.raw["signals"][k]) for k in INTERRUPT_KINDS}

    def sizes(self) -> Sizes:
        """The memory every generation's map derives from (smpd.kernel.memmap); ConfigError when
        the crashkernel= region or the RAM asked for cannot hold what it must."""
        m, n = self.raw["memory"], self.get("machine", "cpus")
        base = Sizes(ncpus=n, text=m["text_pages"], data=m["data_pages"], pgtables=m["page_table_pages"],
                     stack_per_cpu=m["stack_pages_per_cpu"])
        crash = base.crash_needed if m["crashkernel_pages"] == "auto" else m["crashkernel_pages"]
        if 0 < crash < base.crash_needed:
            raise ConfigError(f"memory.crashkernel_pages = {crash} cannot hold a crash kernel of this machine: it "
                              f"needs {base.crash_needed} pages (its image, page tables and one CPU); set "
                              f"\"auto\", 0 for none, or at least {base.crash_needed}")
        sized = Sizes(n, base.text, base.data, base.pgtables, base.stack_per_cpu, crash=crash)
        ram = sized.ram if m["ram_pages"] == "auto" else m["ram_pages"]
        if ram < sized.ram_needed:
            raise ConfigError(f"memory.ram_pages = {ram} cannot hold two kernel generations of this machine "
                              f"and its crash region: it needs at least {sized.ram_needed}; set \"auto\"")
        return Sizes(n, base.text, base.data, base.pgtables, base.stack_per_cpu, crash=crash, ram=ram)

    def boot(self) -> Boot:
        """Generation 1's kernel: [kernel] flavour and boot (the seed draws a bare `kaslr`'s seed)."""
        seed = self.get("machine", "seed")
        b = parse_boot(self.get("kernel", "boot"), self.get("machine", "cpus"),
                       seed=0 if seed == "random" else seed)
        return Boot(flavour(self.get("kernel", "flavour")), b.nosmt, b.maxcpus, b.kaslr)

    def with_overrides(self, **sections: dict[str, Any]) -> "Config":
        """A copy with command-line values applied; each is validated like a file value."""
        raw = copy.deepcopy(self.raw)
        for section, values in sections.items():
            for key, value in values.items():
                if value is not None:
                    raw[section][key] = value
        return Config(_validated(raw, "the command line"))


def default_path() -> Path:
    """config/default.toml: next to the package in a checkout (and an editable install),
    inside it as smpd._config in a built wheel."""
    here = Path(__file__).resolve().parent.parent / "config" / "default.toml"
    if here.is_file():
        return here
    import importlib.resources  # here: ~10 ms of every command's start, for a built wheel's alone

    return Path(str(importlib.resources.files("smpd._config") / "default.toml"))


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of TOML; anything near this size is not one


def _read(path: Path) -> dict[str, Any]:
    try:
        with files.open_input(str(path), "config file") as f:  # a FIFO or a device is refused, not read
            data = f.read(MAX_CONFIG_BYTES + 1)
    except BadInput as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB; expected a TOML file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); expected a TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def _validated(raw: dict[str, Any], where: str) -> dict[str, Any]:
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"{where}: unknown section [{section}]; known sections: {', '.join(SCHEMA)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of keys")
        for key, value in values.items():
            check = SCHEMA[section].get(key)
            if check is None:
                raise ConfigError(
                    f"{where}: unknown key '{key}' in [{section}]; "
                    f"known keys: {', '.join(SCHEMA[section])}"
                )
            accepted = check(value)
            if accepted:
                raise ConfigError(f"{where}: {section}.{key} = {value!r} is invalid; expected {accepted}")
    sigs = [raw.get("signals", {}).get(k) for k in INTERRUPT_KINDS]
    if None not in sigs and len({parse_signal(s) for s in sigs}) != len(sigs):
        raise ConfigError(f"{where}: [signals] nmi, smi and mce must be distinct signals, got {sigs}")
    return raw


def load(user_file: str | Path | None = None) -> Config:
    """The defaults, overridden by ``user_file`` when given; every value validated."""
    return load_with_sources(user_file)[0]


def load_with_sources(user_file: str | Path | None = None) -> tuple[Config, dict[tuple[str, str], str]]:
    """load(), and where each value came from: {(section, key): the file that set it}."""
    if user_file is not None and not str(user_file):
        raise ConfigError("--config needs a file name; '' is none")
    raw = _validated(_read(default_path()), str(default_path()))
    sources = {(section, key): str(default_path()) for section, values in raw.items() for key in values}
    if user_file is not None:
        user = _validated(_read(Path(user_file)), str(user_file))
        for section, values in user.items():
            raw[section].update(values)
            sources.update({(section, key): str(user_file) for key in values})
        _validated(raw, str(user_file))
    return Config(raw), sources
