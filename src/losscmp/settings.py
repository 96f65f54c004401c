"""Configuration as small frozen records, one per concern, built in one place.

* :class:`Search` — what is generated: how many cases, the seed, regimes, sizes.
* :class:`Execution` — how implementations are called: device, dtype, isolation.
* :class:`Tolerances` — the user's rtol/atol overrides (the dtype supplies defaults).
* :class:`Outputs` — what happens after the search: minimise, explain, save.

A library call writes nothing unless asked (``Outputs.save_dir`` is None by default);
the CLI and the pytest plugin pass their save folders explicitly.

Every front end builds its run's :class:`Settings` here, and every knob is checked here,
once.  A refusal names the knob as the command line does (``--timeout needs --isolate,
--python or --ray``); a front end that names its knobs otherwise gives ``Settings.of`` its table
(:data:`CALL_TERMS` for keyword arguments, :data:`PLUGIN_TERMS` for the pytest options),
so the same rule reads ``timeout= needs isolate=True, pythons= or ray=`` in a test.
"""
from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .model import Tolerance
from .errors import UsageError


# --- each knob's name in each front end ----------------------------------------------

# Keyword arguments (``assert_losses_agree``, ``losscmp.check``, ``Settings.of``).
CALL_TERMS = {"--spec": "spec=", "--python": "pythons=", "--timeout": "timeout=", "--isolate": "isolate=True",
              "--examples": "examples=", "--reference": "reference=", "--rtol": "rtol=", "--atol": "atol=",
              "--seed": "seed=", "--device": "device=", "--devices": "devices=", "--dtype": "dtype=", "--jobs": "jobs=",
              "--max-size": "max_size=", "--impact": "impact_steps=", "--ray": "ray="}
# The pytest plugin's command line.
PLUGIN_TERMS = {f"--{name}": f"--losscmp-{name}"
                for name in ("examples", "seed", "device", "dtype", "rtol", "atol", "isolate", "timeout", "python", "ray")}


def in_terms(text: str, terms: dict[str, str]) -> str:
    """``text`` (a message naming knobs as the command line does) in another front end's terms."""
    return re.sub("|".join(re.escape(o) + r"(?![\w-])" for o in terms), lambda m: terms[m.group(0)], text)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype, or its name."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


@dataclass(frozen=True)
class Search:
    examples: int = 100
    seed: int = 0
    regimes: tuple[str, ...] | None = None  # None: every regime
    max_size: int | None = None
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.examples, int) and self.examples >= 1):
            raise UsageError(f"--examples must be at least 1, not {self.examples}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise UsageError(f"--seed must be an integer in [0, 2**63), not {self.seed}")
        if self.max_size is not None and not (isinstance(self.max_size, int) and self.max_size >= 1):
            raise UsageError(f"--max-size must be at least 1, not {self.max_size}")


def checked_device(device: str, option: str = "--device") -> str:
    """cpu, or a CUDA device this machine has; else one line naming the option."""
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


def checked_timeout(timeout: float | None) -> float | None:
    """None, or a positive, finite number of seconds."""
    if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout:g}"
                         if isinstance(timeout, (int, float)) else f"--timeout must be a positive number of seconds, not {timeout!r}")
    return timeout


def check_timeout(timeout: float | None, runner: RunnerKind) -> None:
    """The one rule about timeouts and runners."""
    if timeout is not None and not runner.stops_hung_calls:
        raise UsageError("--timeout needs --isolate, --python or --ray (a hung call can only be stopped in a worker process)")


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
        object.__setattr__(self, "devices", tuple(checked_device(d, "--devices") for d in self.devices))
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "pythons", tuple((str(la), str(py)) for la, py in dict(self.pythons).items()))
        if self.devices:
            object.__setattr__(self, "jobs", len(self.devices))
        if not (isinstance(self.jobs, int) and self.jobs >= 1):
            raise UsageError(f"--jobs must be a whole number >= 1, not {self.jobs}")
        checked_timeout(self.timeout)
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
                raise UsageError(f"--{name} must be a finite number >= 0, not {value}")

    def resolve(self, dtype: torch.dtype) -> Tolerance:
        return Tolerance.for_dtype(dtype, self.rtol, self.atol)


@dataclass(frozen=True)
class Outputs:
    minimize: bool = True
    explain: bool = True
    save_dir: Path | None = None
    impact_steps: int | None = None  # None: the explain stage's default

    def __post_init__(self) -> None:
        if self.impact_steps is not None and not (isinstance(self.impact_steps, int) and self.impact_steps >= 0):
            raise UsageError(f"--impact must be >= 0, not {self.impact_steps}")


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
    def of(cls, reference: str | None = None, *, terms: dict[str, str] | None = None, **flat: Any) -> Settings:
        """Build from flat keywords, each routed to the record that owns it:
        ``Settings.of(examples=50, dtype=torch.float64, rtol=1e-4, save_dir="out")``.
        A refusal is one :class:`UsageError` line, its knobs named in ``terms``
        (default: as the command line names them)."""
        try:
            return cls._of(reference, flat)
        except UsageError as error:
            if terms:
                raise UsageError(in_terms(str(error), terms)) from None
            raise

    @classmethod
    def _of(cls, reference: str | None, flat: dict[str, Any]) -> Settings:
        parts: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            owner = next((name for name, record in _OWNERS.items() if key in {f.name for f in fields(record)}), None)
            if owner is None:
                raise UsageError(f"unknown setting {key!r}")
            if key == "save_dir" and value is not None:
                value = Path(value)
            parts.setdefault(owner, {})[key] = value
        return cls(**{name: _OWNERS[name](**kw) for name, kw in parts.items()}, reference=reference)

    def flat(self) -> dict[str, Any]:
        """Every knob as a keyword of :meth:`of` (``reference`` included)."""
        knobs = {f.name: getattr(part, f.name) for part in (self.search, self.execution, self.tolerances, self.outputs)
                 for f in fields(part)}
        return {**knobs, "reference": self.reference}

    def updated(self, *, terms: dict[str, str] | None = None, **flat: Any) -> Settings:
        """These settings with some knobs changed, checked again as a whole (a timeout given
        here must still have a worker to stop, wherever the isolation was given)."""
        merged = {**self.flat(), **flat}
        reference = merged.pop("reference")
        return Settings.of(reference, terms=terms, **merged)


_OWNERS: dict[str, type] = {"search": Search, "execution": Execution, "tolerances": Tolerances, "outputs": Outputs}
