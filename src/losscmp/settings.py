"""Configuration as small frozen records, one per concern, built in one place.

* :class:`Search` — what is generated: how many cases, the seed, regimes, sizes.
* :class:`Execution` — how implementations are called: device, dtype, isolation.
* :class:`Tolerances` — the user's rtol/atol overrides (the dtype supplies defaults).
* :class:`Outputs` — what happens after the search: minimise, explain, save.

A library call writes nothing unless asked (``Outputs.save_dir`` is None by default);
the CLI and the pytest plugin pass their save folders explicitly.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .model import Tolerance
from .errors import UsageError


@dataclass(frozen=True)
class Search:
    examples: int = 100
    seed: int = 0
    regimes: tuple[str, ...] | None = None  # None: every regime
    max_size: int | None = None
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise UsageError(f"examples must be at least 1, not {self.examples}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be an integer in [0, 2**63), not {self.seed}")
        if self.max_size is not None and self.max_size < 1:
            raise UsageError(f"max size must be at least 1, not {self.max_size}")


def checked_device(device: str, option: str = "device") -> str:
    """cpu, or a CUDA device this machine has; else one line naming the option.

    The CLI checks its options here (naming them); :class:`Execution` checks again, so a
    library or plugin call with a bad device fails the same way."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"{option} {device!r} is not cpu or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device}: CUDA is not available on this machine")
        index = device.split(":")[1] if ":" in device else "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class RunnerKind(str, Enum):
    """How implementations are called; ``engine.RUNNERS`` builds each.  ``stops_hung_calls``:
    a call that hangs can be stopped (only a worker process can be killed mid-call)."""

    IN_PROCESS = "in-process", False
    ISOLATED = "isolated", True
    OTHER_INTERPRETER = "other interpreter", True
    RAY = "ray", True  # an actor on a Ray cluster (--ray): killed and restarted on a hang

    stops_hung_calls: bool  # set per member by __new__; an annotation only, so not a member

    def __new__(cls, value: str, stops_hung_calls: bool) -> RunnerKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.stops_hung_calls = stops_hung_calls
        return member

    @classmethod
    def choose(cls, isolate: bool, pythons: object, ray: str | None = None) -> RunnerKind:
        """The one place the runner is chosen: a Ray cluster, another interpreter (its other
        sides isolated when asked), isolation, or a plain call."""
        if ray:
            return cls.RAY
        return cls.OTHER_INTERPRETER if pythons else cls.ISOLATED if isolate else cls.IN_PROCESS


def check_timeout(timeout: float | None, runner: RunnerKind,
                  names: tuple[str, str, str] = ("a timeout", "isolation", "another interpreter")) -> None:
    """The one rule about timeouts and runners.  ``names``: how the front end calls the
    timeout, isolation and other-interpreter options (``--timeout``, ``--isolate``, ``--python``)."""
    if timeout is not None and not runner.stops_hung_calls:
        raise UsageError(f"{names[0]} needs {names[1]} or {names[2]} (a hung call can only be stopped in a worker process)")


def check_ray_installed() -> None:
    """``--ray`` without Ray: one line naming the extra that brings it."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError('--ray needs Ray, which is not installed here: pip install "losscmp[ray]"')


@dataclass(frozen=True)
class Execution:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    isolate: bool = False
    timeout: float | None = None  # seconds per call; see check_timeout
    pythons: tuple[tuple[str, str], ...] = ()  # (label, interpreter path): run that side there
    jobs: int = 1  # worker processes sharing the example budget
    devices: tuple[str, ...] = ()  # one worker per device (--devices cuda:0,cuda:1); overrides jobs
    ray: str | None = None  # "local" or a cluster's address: calls made by Ray actors (cluster.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", checked_device(self.device))
        object.__setattr__(self, "devices", tuple(checked_device(d, "devices") for d in self.devices))
        if self.devices:
            object.__setattr__(self, "jobs", len(self.devices))
        if not (isinstance(self.jobs, int) and self.jobs >= 1):
            raise UsageError(f"jobs must be a whole number >= 1, not {self.jobs}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"timeout must be a positive number of seconds, not {self.timeout}")
        check_timeout(self.timeout, self.runner)
        if self.ray is not None:
            self._check_ray()

    def _check_ray(self) -> None:
        """What runs under --ray today: CPU calls by actors that load references.  The rest
        is refused in one line rather than run somewhere other than asked."""
        if not (isinstance(self.ray, str) and self.ray.strip()):
            raise UsageError("--ray needs 'local' or a cluster address (auto, HOST:PORT, ray://HOST:PORT)")
        check_ray_installed()
        refused = (
            (self.isolate, "--isolate", "a Ray actor already is a worker process: a crash or a hang there is a finding"),
            (self.pythons, "--python", "start the cluster's Ray workers with that interpreter instead"),
            (self.devices or self.device != "cpu", "--device cuda / --devices", "CUDA actors are not scheduled yet"),
        )
        for given, option, why in refused:
            if given:
                raise UsageError(f"{option} is not supported with --ray ({why})")

    @property
    def runner(self) -> RunnerKind:
        return RunnerKind.choose(self.isolate, self.pythons, self.ray)


@dataclass(frozen=True)
class Tolerances:
    rtol: float | None = None
    atol: float | None = None

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, not {value}")

    def resolve(self, dtype: torch.dtype) -> Tolerance:
        return Tolerance.for_dtype(dtype, self.rtol, self.atol)


@dataclass(frozen=True)
class Outputs:
    minimize: bool = True
    explain: bool = True
    save_dir: Path | None = None
    impact_steps: int | None = None  # None: the explain stage's default

    def __post_init__(self) -> None:
        if self.impact_steps is not None and self.impact_steps < 0:
            raise UsageError(f"impact steps must be >= 0, not {self.impact_steps}")


@dataclass(frozen=True)
class Settings:
    search: Search = field(default_factory=Search)
    execution: Execution = field(default_factory=Execution)
    tolerances: Tolerances = field(default_factory=Tolerances)
    outputs: Outputs = field(default_factory=Outputs)
    reference: str | None = None

    @property
    def tolerance(self) -> Tolerance:
        return self.tolerances.resolve(self.execution.dtype)

    @classmethod
    def of(cls, reference: str | None = None, **flat: Any) -> Settings:
        """Build from flat keywords, each routed to the record that owns it:
        ``Settings.of(examples=50, dtype=torch.float64, rtol=1e-4, save_dir="out")``."""
        parts: dict[str, dict[str, Any]] = {}
        owners = {"search": Search, "execution": Execution, "tolerances": Tolerances, "outputs": Outputs}
        for key, value in flat.items():
            owner = next((name for name, record in owners.items() if key in {f.name for f in fields(record)}), None)
            if owner is None:
                raise UsageError(f"unknown setting {key!r}")
            if key == "save_dir" and value is not None:
                value = Path(value)
            parts.setdefault(owner, {})[key] = value
        return cls(**{name: owners[name](**kw) for name, kw in parts.items()}, reference=reference)
