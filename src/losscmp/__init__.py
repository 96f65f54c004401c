"""losscmp: differential testing for loss functions.

Do these implementations of "the same" loss really agree, in values and gradients?
If not: where, why, and on how small an input?  See ``losscmp --help``.
"""
__version__ = "0.2.0"

from .audit import AuditResult, Divergence, audit  # noqa: E402
from .engine import Evaluator, Runner  # noqa: E402
from .errors import LosscmpError  # noqa: E402
from .findings import Alone, Kind, Pair, Status  # noqa: E402
from .generate import Case, Recipe, build_case, cases, recipes  # noqa: E402
from .load import Implementation, load_implementation, parse_ref  # noqa: E402
from .settings import Execution, Outputs, Search, Settings, Tolerances  # noqa: E402
from .spec import Arg, Spec, parse_spec, preset, resolve_spec  # noqa: E402

__all__ = [
    "Alone", "Arg", "AuditResult", "Case", "Divergence", "Evaluator", "Execution", "Implementation", "Kind", "LosscmpError",
    "Outputs", "Pair", "Recipe", "Runner", "Search", "Settings", "Spec", "Status", "Tolerances",
    "audit", "build_case", "cases", "load_implementation", "parse_ref", "parse_spec", "preset", "recipes", "resolve_spec",
]
