"""pytest plugin: differential tests of loss functions inside a research repo's suite.

Registered through the ``pytest11`` entry point, so installing losscmp is enough::

    def test_my_dice_matches_monai(losscmp):
        losscmp.check(my_dice, "monai.losses:DiceLoss(sigmoid=False)", spec="segmentation")

``check`` first replays the cases saved for this test by earlier runs (a regression
suite that grows by itself), then fuzzes.  On divergence it fails the test with the
report, having saved each minimised case under ``--losscmp-save-dir/<test name>/``.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Callable

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("losscmp", "losscmp: differential testing of loss functions")
    group.addoption("--losscmp-examples", type=int, default=None, help="cases per losscmp.check (default: each call's own, else 100)")
    group.addoption("--losscmp-seed", type=int, default=0, help="seed for losscmp.check (default 0)")
    group.addoption("--losscmp-save-dir", default="fixtures/losscmp", help="where minimised cases are saved and replayed from (default fixtures/losscmp)")
    group.addoption("--losscmp-no-replay", action="store_true", help="do not replay saved cases before fuzzing")


class LossChecker:
    """What the ``losscmp`` fixture gives a test."""

    def __init__(self, request: pytest.FixtureRequest):
        config = request.config
        self.examples = config.getoption("--losscmp-examples")
        self.seed = config.getoption("--losscmp-seed")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")[-100:]
        self.save_dir = Path(config.rootpath) / config.getoption("--losscmp-save-dir") / slug
        self.replay = not config.getoption("--losscmp-no-replay")

    def check(self, *impls: str | Callable[..., Any], spec: Any = None, examples: int = 100, **settings: Any):
        """Fail the calling test if the implementations disagree; return the audit result."""
        from .audit import audit
        from .settings import Settings
        from .infer import infer_spec
        from .report import print_audit
        from .spec import Spec, resolve_spec

        loaded = _unique_labels([_implementation(i) for i in impls])
        if len(loaded) < 2:
            raise pytest.UsageError("losscmp.check needs at least two implementations")
        the_spec = spec if isinstance(spec, Spec) else resolve_spec(spec) if spec else infer_spec(loaded)
        if self.replay:
            self._replay_saved(loaded, the_spec)
        config = Settings.of(examples=self.examples or examples, seed=self.seed, save_dir=self.save_dir, **settings)
        result = audit(loaded, the_spec, config)
        if not result.agree:
            pytest.fail(_render(print_audit, result), pytrace=False)
        return result

    def _replay_saved(self, impls, spec) -> None:
        from .replay import replay
        from .repro import ReproError, load_repro

        if not self.save_dir.is_dir():
            return
        by_label = {i.label: i for i in impls}
        for path in sorted(self.save_dir.glob("*.json")):
            try:
                repro = load_repro(path)
            except ReproError as e:
                pytest.fail(f"saved case {path.name}: {e}", pytrace=False)
            if repro.spec.text() != spec.text() or not set(repro.pair) <= set(by_label):
                continue  # saved for another pairing of this test
            verdict = replay(repro, [by_label[la] for la in dict.fromkeys(repro.pair)]).verdict
            if verdict.kind:
                pytest.fail(f"saved case {path} still diverges ({verdict.kind}): {verdict.detail}", pytrace=False)


def _implementation(impl: str | Callable[..., Any]):
    from .load import Implementation, Ref, load_implementation

    if isinstance(impl, str):
        return load_implementation(impl)
    if not callable(impl):
        raise pytest.UsageError(f"losscmp.check: {impl!r} is neither a reference nor callable")
    name = getattr(impl, "__qualname__", None) or type(impl).__qualname__
    module = getattr(impl, "__module__", None) or type(impl).__module__
    # A lambda or a local function has no importable reference; the test holds it, which is enough.
    label = re.sub(r"[^\w.+-]", "", name.split(".")[-1]) or "impl"
    return Implementation(Ref(text=f"{module}:{name}", label=label, target=str(module), attrs=tuple(name.split("."))), impl)


def _unique_labels(impls):
    from dataclasses import replace

    seen: dict[str, int] = {}
    out = []
    for impl in impls:
        n = seen[impl.label] = seen.get(impl.label, 0) + 1
        out.append(impl if n == 1 else replace(impl, ref=replace(impl.ref, label=f"{impl.label}#{n}")))
    return out


def _render(print_fn, result) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    print_fn(result, Console(file=buffer, width=140, color_system=None, highlight=False))
    return buffer.getvalue()


@pytest.fixture
def losscmp(request: pytest.FixtureRequest) -> LossChecker:
    """Differentially test loss implementations: ``losscmp.check(a, b, spec=...)``."""
    return LossChecker(request)
