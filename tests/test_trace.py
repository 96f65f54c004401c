"""trace: the first diverging op of two programs, named by file and line, forward and backward."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from losscmp.cli import main
from losscmp.compare import Tolerance
from losscmp.audit import Settings, audit
from losscmp.generate import Case, Recipe, build_case
from losscmp.load import load_implementation, parse_ref
from losscmp.repro import save_case
from losscmp.spec import parse_spec
from losscmp.run import call
from losscmp.trace import MIN_COVERAGE, Phase, locate, record

from .conftest import FIXTURES

FORKS = FIXTURES / "forks"
BASE = FORKS / "sinkhorn_base.py"
SPEC = "x: N D real grad; y: M D real grad; N=5; M=7; D=2"


def marker_line(path: Path, marker: str) -> int:
    hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert len(hits) == 1, f"{marker!r} should tag exactly one line of {path}"
    return hits[0]


def sinkhorn_case(sizes: dict[str, int], magnitude: float, dtype: torch.dtype, seed: int = 1):
    spec = parse_spec(SPEC).with_sizes(**{k: (v, v) for k, v in sizes.items()})
    return spec, build_case(spec, Recipe(sizes=tuple(sizes.items()), magnitude=magnitude, seed=seed), dtype=dtype)


SMALL = {"N": 5, "M": 7, "D": 2}


@pytest.mark.parametrize(
    "fork, fork_point, sizes, magnitude, dtype, phase",
    [
        # exp over/underflows once |f| / eps passes ~709: float64 keeps the rounding noise
        # of the earlier iterations far below tolerance, so the overflow is the divergence.
        ("fork_logsumexp.py", "softmin", SMALL, 3.0, torch.float64, "forward"),
        # float32: log(sum(exp)) differs from logsumexp by a few ulps from the first call,
        # below the tolerance, until a later op carries it past: the line is still where it
        # started (it used to be the carrying op, with the FORK line only in the note).
        ("fork_logsumexp.py", "softmin", SMALL, 3.0, torch.float32, "forward"),
        ("fork_no_debias.py", "divergence", SMALL, 1.0, torch.float32, "forward"),
        ("fork_schedule.py", "schedule", SMALL, 1.0, torch.float32, "forward"),
        # Same value; the gradient loses the auto-correlation term (visible for tight clouds).
        ("fork_detach.py", "divergence", SMALL, 0.1, torch.float32, "backward"),
        # N = M: the cross and auto-correlation branches run look-alike backward ops; only
        # the forward op each belongs to tells them apart.
        ("fork_detach.py", "divergence", {"N": 4, "M": 4, "D": 2}, 0.1, torch.float32, "backward"),
        ("fork_sum.py", "divergence", SMALL, 1.0, torch.float32, "forward"),
        # Cost matrices past the whole-tensor limit: compared through their summaries.
        ("fork_logsumexp.py", "softmin", {"N": 20, "M": 30, "D": 2}, 3.0, torch.float64, "forward"),
    ],
)
def test_each_fork_is_localised_to_the_line_it_changed(fork, fork_point, sizes, magnitude, dtype, phase):
    spec, case = sinkhorn_case(sizes, magnitude, dtype)
    base = load_implementation(f"base={BASE}:sinkhorn_divergence")
    forked = load_implementation(f"fork={FORKS / fork}:sinkhorn_divergence")
    found = locate(base, forked, spec, case, Tolerance.for_dtype(dtype))
    assert found.location is not None, found.note
    theirs, ours = found.location["fork"], found.location["base"]
    assert Path(theirs.file) == FORKS / fork
    assert theirs.line == marker_line(FORKS / fork, "FORK:")
    assert "FORK:" in theirs.code
    assert (Path(ours.file), ours.line) == (BASE, marker_line(BASE, f"# fork point: {fork_point}"))
    assert theirs.phase == ours.phase == phase
    assert found.coverage > 0.8
    assert set(found.values) == {"base", "fork"} and found.values["base"] != found.values["fork"]


def test_a_gradient_only_divergence_names_the_backward_and_the_detach():
    spec, case = sinkhorn_case(SMALL, 0.1, torch.float32)
    base = load_implementation(f"base={BASE}:sinkhorn_divergence")
    forked = load_implementation(f"fork={FORKS / 'fork_detach.py'}:sinkhorn_divergence")
    found = locate(base, forked, spec, case, Tolerance.for_dtype(torch.float32))
    assert found.note.startswith("backward:")
    assert "gradient w.r.t. x" in found.note
    assert found.location["base"].op.startswith("aten.neg.default (backward of aten.sub.Tensor)")
    assert found.location["fork"].op.startswith("aten.detach.default")


def test_recording_leaves_the_numbers_bit_for_bit_unchanged():
    spec, case = sinkhorn_case(SMALL, 1.0, torch.float32, seed=4)
    impl = load_implementation(f"{BASE}:sinkhorn_divergence")
    traced, plain = record(impl, spec, case), call(impl.fn, spec, case)
    assert torch.equal(traced.outcome.value, plain.value)
    assert traced.outcome.grads.keys() == plain.grads.keys() == {"x", "y"}
    assert all(torch.equal(traced.outcome.grads[k], plain.grads[k]) for k in plain.grads)
    phases = [r.phase for r in traced.records]
    assert phases == sorted(phases, key=[Phase.FORWARD, Phase.BACKWARD].index) and Phase.BACKWARD in phases
    # Every backward op is tied to the forward op whose autograd node ran it.
    assert all(r.origin is not None and traced.records[r.origin].phase is Phase.FORWARD
               for r in traced.records if r.phase is Phase.BACKWARD)


UNRELATED = '''
import torch

def product(x, y):
    return (x * y).sum()

def norm_of_both(x, y):
    return torch.linalg.vector_norm(torch.cat((x, y)))
'''

CUSTOM_BACKWARD = '''
import torch

def exp_sum(x):
    return torch.exp(x).sum()  # autograd's exp

class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x  # WRONG: d exp(x) / dx is exp(x)

def exp_sum_custom(x):
    return Exp.apply(x).sum()
'''


def test_backward_ops_issued_by_a_custom_backward_are_placed_on_its_own_line(tmp_path):
    path = tmp_path / "custom.py"
    path.write_text(CUSTOM_BACKWARD)
    spec = parse_spec("x: N real grad; N=6")
    case = build_case(spec, Recipe(sizes=(("N", 6),), seed=3))
    found = locate(load_implementation(f"{path}:exp_sum"), load_implementation(f"{path}:exp_sum_custom"),
                   spec, case, Tolerance.for_dtype(torch.float32))
    assert found.location is not None, found.note
    wrong, right = found.location["exp_sum_custom"], found.location["exp_sum"]
    assert (Path(wrong.file), wrong.line, wrong.phase) == (path, marker_line(path, "# WRONG"), "backward")
    assert (right.line, right.phase) == (marker_line(path, "# autograd's exp"), "backward")


def test_programs_with_too_little_in_common_get_the_coverage_not_a_location(tmp_path):
    path = tmp_path / "unrelated.py"
    path.write_text(UNRELATED)
    spec = parse_spec("x: N real grad; y: N real; N=6")
    case = build_case(spec, Recipe(sizes=(("N", 6),), seed=0))
    found = locate(load_implementation(f"{path}:product"), load_implementation(f"{path}:norm_of_both"),
                   spec, case, Tolerance.for_dtype(torch.float32))
    assert found.location is None
    assert found.coverage < MIN_COVERAGE
    assert "share too little structure" in found.note
    assert f"{found.coverage:.0%}" in found.note
    assert found.to_json() == {"location": None, "location_note": found.note, "coverage": found.coverage,
                               "confidence": None, "side": None}


def test_two_sides_that_agree_get_no_location():
    spec, case = sinkhorn_case(SMALL, 1.0, torch.float32)
    same = [load_implementation(f"{label}={BASE}:sinkhorn_divergence") for label in ("one", "other")]
    found = locate(same[0], same[1], spec, case, Tolerance.for_dtype(torch.float32))
    assert found.location is None
    assert "agree on this case" in found.note
    assert found.coverage == 1.0


@pytest.fixture
def sum_fork_repro(tmp_path, in_repo):
    """A minimised repro of the mean -> sum fork, written by losscmp itself."""
    refs = [f"base={BASE}:sinkhorn_divergence", f"fork={FORKS / 'fork_sum.py'}:sinkhorn_divergence"]
    spec = "x: N D real grad; y: M D real grad; N=2..6; M=2..6; D=2"
    assert main([*refs, "--spec", spec, "--examples", "10", "--no-explain", "--save-dir", str(tmp_path), "-q"]) == 1
    saved = sorted(tmp_path.glob("*.json"))
    assert len(saved) == 1
    return refs, saved[0]


def test_the_trace_command_localises_a_saved_repro(sum_fork_repro, capsys, tmp_path):
    refs, repro = sum_fork_repro
    capsys.readouterr()
    out_json = tmp_path / "where.json"
    assert main(["trace", *refs, str(repro), "--json", str(out_json)]) == 1  # a difference reported: exit 1
    printed = capsys.readouterr().out
    line = marker_line(FORKS / "fork_sum.py", "FORK:")
    assert f"{FORKS / 'fork_sum.py'}:{line}" in printed
    where = json.loads(out_json.read_text())
    assert where["location"]["fork"]["line"] == line
    assert where["location"]["fork"]["file"] == str(FORKS / "fork_sum.py")
    assert "FORK:" in where["location"]["fork"]["code"]
    assert where["location"]["base"]["line"] == marker_line(BASE, "# fork point: divergence")
    assert 0.8 < where["coverage"] <= 1.0 and where["location_note"].startswith("forward:")


def test_the_trace_command_exits_0_when_the_sides_agree_on_the_case(sum_fork_repro, capsys):
    # Changed on purpose: exit 1 means "a difference was reported", so two sides that
    # agree (nothing to locate) exit 0, as `losscmp` itself does.
    refs, repro = sum_fork_repro
    capsys.readouterr()
    assert main(["trace", refs[0], f"again={BASE}:sinkhorn_divergence", str(repro), "--json", "-"]) == 0
    printed = capsys.readouterr()
    where = json.loads(printed.out)  # the JSON alone on stdout, the words on stderr
    assert where["location"] is None and "agree on this case" in where["location_note"]
    assert "agree on this case" in printed.err


def test_the_trace_command_rejects_a_missing_repro_in_one_line(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    assert main(["trace", f"{BASE}:sinkhorn_divergence", f"{FORKS / 'fork_sum.py'}:sinkhorn_divergence", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"losscmp: error: no such repro: {missing}"]


def test_the_trace_command_needs_two_implementations_and_a_repro(capsys):
    assert main(["trace", f"{BASE}:sinkhorn_divergence"]) == 2
    assert "usage: losscmp trace" in capsys.readouterr().err


# --- location by data: a hand-written Dice against an installed, MONAI-style library ---

DICE = FIXTURES / "dice.py"
MINE = f"mine={DICE}:dice_eps_in_denominator"
LIBRARY = "library=segloss:DiceLoss(softmax=True)"
DICE_SPEC = "input: B C H W real grad; target: B C H W binary; B=1; C=2; H=2; W=2"



def empty_class_case() -> Case:
    """Class 1 is empty and predicted near 0: the library's smooth_nr scores it 1, the
    eps-in-the-denominator-only Dice scores it 0 (0.011 apart in the loss)."""
    logits = torch.tensor([[[[2.0, 1.0], [0.5, 3.0]], [[-8.0, -9.0], [-7.5, -8.5]]]])
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0] = 1
    return Case({"input": logits, "target": target}, {"B": 1, "C": 2, "H": 2, "W": 2})


def test_a_dice_is_located_at_the_line_that_differs_not_at_ops_in_the_same_position(installed_segloss, tmp_path, capsys):
    """The denominators agree (sum(p) + sum(t) on one side, 2 (tp + fp + fn) with
    fp = sum(p) - tp on the other): neither the researcher's `denom` line nor the
    library's `fp` line computes a different quantity.  The numerators do."""
    spec = parse_spec(DICE_SPEC)
    repro = save_case(tmp_path, spec=spec, case=empty_class_case(), refs=[parse_ref(MINE), parse_ref(LIBRARY)],
                      pair=("mine", "library"), kind="value", outcomes={}, tolerance=(1.3e-6, 1e-5), seed=0, device="cpu")
    out_json = tmp_path / "where.json"
    assert main(["trace", MINE, LIBRARY, str(repro), "--json", str(out_json)]) == 1
    printed = capsys.readouterr().out
    where = json.loads(out_json.read_text())
    mine, library = where["location"]["mine"], where["location"]["library"]
    assert (mine["file"], mine["line"]) == (str(DICE), marker_line(DICE, "# mine: dice"))
    lib_dice = installed_segloss / "dice.py"
    # The numerators differ by smooth_nr = 1e-5, within the float32 atol; the ratio carries
    # it to 0.011.  The line is where the difference starts; the note names the ratio.
    assert (library["file"], library["line"]) == (str(lib_dice), marker_line(lib_dice, "# lib: numerator"))
    assert f"segloss/dice.py:{marker_line(lib_dice, '# lib: ratio')} only carries past the tolerance" in where["location_note"]
    assert where["side"] == "mine"  # the side under test, not the installed library
    assert where["confidence"] in ("high", "medium", "low") and f"confidence {where['confidence']}" in where["location_note"]
    assert f"{DICE}:{marker_line(DICE, '# mine: dice')}" in printed


def test_audit_names_the_researchers_line_not_the_installed_librarys(installed_segloss):
    impls = [load_implementation(MINE), load_implementation(LIBRARY)]
    spec = parse_spec("input: B C H W real grad; target: B C H W binary; B=1..2; C=2..3; H=1..4; W=1..4")
    result = audit(impls, spec, Settings.of(examples=30, seed=0, impact_steps=0))
    found = [d for d in result.divergences if d.explanation is not None and d.explanation.location is not None]
    assert found, [d.explanation.sentence() for d in result.divergences if d.explanation]
    for d in found:
        loc = d.explanation.location
        assert loc.side == "mine"
        assert loc.location["mine"].line != marker_line(DICE, "# mine: denom")
        assert loc.location["library"].line != marker_line(installed_segloss / "utils.py", "# lib: fp")
        where = d.explanation.sentence().split("first differing op at ")[1].split(";")[0]
        assert where == f"{DICE.relative_to(Path.cwd()) if DICE.is_relative_to(Path.cwd()) else DICE}:{loc.location['mine'].line}"


# --- numerical findings: located on the unstable side by its own float32 vs float64 run ---

SOFTPLUS = FIXTURES / "softplus.py"
STABLE, NAIVE = f"stable={SOFTPLUS}:softplus", f"naive={SOFTPLUS}:softplus_naive"


def test_a_numerical_finding_with_little_shared_structure_is_located_on_the_unstable_side(tmp_path, capsys):
    spec = parse_spec("x: N real grad; N=3")
    case = Case({"x": torch.tensor([89.0, 1.0, -2.0])}, {"N": 3})
    stable, naive = load_implementation(STABLE), load_implementation(NAIVE)
    tol = Tolerance.for_dtype(torch.float32)
    between = locate(stable, naive, spec, case, tol)
    assert between.location is None and between.coverage < MIN_COVERAGE  # the two programs barely align
    repro = save_case(tmp_path, spec=spec, case=case, refs=[parse_ref(STABLE), parse_ref(NAIVE)], pair=("stable", "naive"),
                      kind="value", outcomes={}, tolerance=(tol.rtol, tol.atol), seed=0, device="cpu")
    assert main(["trace", STABLE, NAIVE, str(repro), "--json", "-"]) == 1
    printed = capsys.readouterr()
    where = json.loads(printed.out)
    assert set(where["location"]) == {"naive"} and where["side"] == "naive"
    assert where["location"]["naive"]["line"] == marker_line(SOFTPLUS, "# naive:")
    assert where["location"]["naive"]["op"] == "aten.exp.default"
    assert where["confidence"] == "high" and where["coverage"] == 1.0
    assert "float64 oracle: numerical (naive is the unstable side)" in printed.err
    assert "inf" in printed.err and "4.4896128e+38" in printed.err  # exp(89): float32 overflows, float64 does not


def test_audit_locates_a_numerical_finding_on_the_unstable_side():
    impls = [load_implementation(STABLE), load_implementation(NAIVE)]
    result = audit(impls, parse_spec("x: N real grad; N=1..4"), Settings.of(examples=40, seed=0, impact_steps=0))
    numerical = [d for d in result.divergences if d.explanation is not None and d.explanation.category.value == "numerical"]
    assert numerical, [d.explanation.sentence() for d in result.divergences if d.explanation]
    for d in numerical:
        ex = d.explanation
        assert ex.unstable_side == "naive"
        assert ex.location is not None and ex.location.location is not None, ex.location and ex.location.note
        assert ex.location.location["naive"].line == marker_line(SOFTPLUS, "# naive:")
        assert "by its own float32 vs float64 run" in ex.location.note
        assert f"first differing op at {SOFTPLUS.relative_to(Path.cwd()) if SOFTPLUS.is_relative_to(Path.cwd()) else SOFTPLUS}:" in ex.sentence()


def test_a_numerical_location_names_the_working_dtype_run_in_plain_words():
    # The BCE demo's minimal example: sigmoid(8) rounded in float32, amplified by BCELoss'
    # log.  The note read "bce_on_sigmoid in float64's op amplifies a difference its inputs
    # carry within the tolerance": the float64 run carries nothing; the float32 run does.
    bce = load_implementation(f"{FIXTURES}/bce.py:bce_on_sigmoid")
    spec = parse_spec("logits: B logits grad; target: B binary; B=1..4")
    case = Case({"logits": torch.tensor([8.0]), "target": torch.tensor([0.0])}, {"B": 1})
    loc = locate(bce, load_implementation(f"{FIXTURES}/bce.py:bce_with_logits"), spec, case,
                 Tolerance.for_dtype(torch.float32), unstable="bce_on_sigmoid")
    assert loc.location is not None and loc.location["bce_on_sigmoid"].line == 13, loc.note
    assert "float64's" not in loc.note and "float32's" not in loc.note and " in float64" not in loc.note, loc.note
    assert "the float32 run's inputs differ from the other run's within the tolerance, and the op amplifies" in loc.note, loc.note
    assert "carried past it on the float32 run" in loc.note, loc.note


# --- an EMLight-style fork of GeomLoss: located at the cost it computes, not the call site ---

EMLIGHT = FORKS / "emlight" / "geomloss"
OFFICIAL = 'official=geomloss:SamplesLoss(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, backend="tensorized")'
EMLIGHT_FORK = f'fork={EMLIGHT}:SamplesLoss(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, anchors=6)'
EMLIGHT_SPEC = "x: N D real grad; y: N D real grad; N=6; D=3"


def test_an_emlight_style_fork_is_located_at_its_cost_line_inside_the_sinkhorn_loop(tmp_path, capsys):
    pytest.importorskip("geomloss")
    spec = parse_spec(EMLIGHT_SPEC)
    case = build_case(spec, Recipe(sizes=(("N", 6), ("D", 3)), magnitude=1.0, seed=1))
    repro = save_case(tmp_path, spec=spec, case=case, refs=[parse_ref(OFFICIAL), parse_ref(EMLIGHT_FORK)],
                      pair=("official", "fork"), kind="value", outcomes={}, tolerance=(1.3e-6, 1e-5), seed=0, device="cpu")
    out_json = tmp_path / "where.json"
    assert main(["trace", OFFICIAL, EMLIGHT_FORK, str(repro), "--json", str(out_json)]) == 1
    where = json.loads(out_json.read_text())
    fork = where["location"]["fork"]
    assert (fork["file"], fork["line"]) == (str(EMLIGHT / "utils.py"), marker_line(EMLIGHT / "utils.py", "FORK:"))
    assert "samples_loss.py" not in fork["file"]
    assert where["side"] == "fork"  # the official package is installed: the fork is the side under test
    assert "cost_routines" not in where["location_note"]
    # Loop ops are named by their line and which of that line's runs they are, not "op 345 of 1020".
    assert "run 2 of 8 there" in where["location_note"]
    official = where["location"]["official"]
    assert official["code"].endswith("squared_distances(x, y) / 2),")  # official cost: |x - y|^2 / 2


def test_audit_of_the_emlight_style_fork_names_its_cost_line():
    pytest.importorskip("geomloss")
    impls = [load_implementation(OFFICIAL), load_implementation(EMLIGHT_FORK)]
    result = audit(impls, parse_spec(EMLIGHT_SPEC), Settings.of(examples=6, seed=0, impact_steps=0))
    located = [d for d in result.divergences if d.explanation is not None and d.explanation.location is not None
               and d.explanation.location.location is not None]
    assert located, [d.explanation.sentence() for d in result.divergences if d.explanation]
    for d in located:
        assert d.explanation.location.location["fork"].line == marker_line(EMLIGHT / "utils.py", "FORK:")
        assert f"first differing op at {EMLIGHT.relative_to(Path.cwd()) if EMLIGHT.is_relative_to(Path.cwd()) else EMLIGHT}/utils.py:" in d.explanation.sentence()


HELPER_LIBRARY = '''
import torch

def capped_square(x):
    return torch.clamp(x, max=1.0) ** 2
'''

USES_HELPER = '''
import torch
import capsq


def squares(x):
    return (x ** 2).mean()


def squares_via_helper(x):
    return capsq.capped_square(x).mean()  # calls the helper
'''


def test_the_line_is_in_the_implementations_own_file_not_in_a_helper_library_it_calls(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "capsq.py").write_text(HELPER_LIBRARY)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "capsq", raising=False)
    mine = tmp_path / "mine.py"
    mine.write_text(USES_HELPER)
    spec = parse_spec("x: N real grad; N=4")
    case = Case({"x": torch.tensor([0.5, 3.0, -2.0, 0.25])}, {"N": 4})
    found = locate(load_implementation(f"{mine}:squares"), load_implementation(f"{mine}:squares_via_helper"),
                   spec, case, Tolerance.for_dtype(torch.float32))
    assert found.location is not None, found.note
    helper_side = found.location["squares_via_helper"]
    assert (Path(helper_side.file), helper_side.line) == (mine, marker_line(mine, "# calls the helper"))
    assert found.side == "squares_via_helper"


def test_the_json_report_carries_the_locations_confidence_and_side(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([STABLE, NAIVE, "--spec", "x: N real grad; N=1..4", "--examples", "40", "--impact", "0",
                 "--no-save", "--json", str(out), "-q"]) == 1
    found = [d for d in json.loads(out.read_text())["divergences"] if d.get("category") == "numerical"]
    assert found
    for d in found:  # the explanation's own record carries them (the top level copies the contract fields)
        assert d["explanation"]["location_side"] == d["unstable_side"] == "naive"
        assert d["explanation"]["location_confidence"] == "high"
        assert d["location"]["naive"]["line"] == marker_line(SOFTPLUS, "# naive:")


@pytest.mark.slow
def test_trace_of_a_saved_hang_stops_at_the_timeout_it_was_found_with(tmp_path, short_tmp):
    """``losscmp trace`` calls both sides in-process; on a case saved as a timeout the hang
    is stopped by the supervisor's watchdog at the timeout the case was found with (2 s
    here), as ``replay`` uses it, not after the 120 s in-process default."""
    import subprocess
    import time

    mis = FIXTURES / "misbehaving.py"
    saved = tmp_path / "saved"
    assert main([f"{mis}:mse", f"{mis}:sleeps", "--spec", "regression", "--examples", "10", "--isolate", "--timeout", "2",
                 "--no-explain", "--no-minimize", "--save-dir", str(saved), "-q"]) == 1
    repro = next(saved.glob("mse--sleeps--timeout--*.json"))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "losscmp", "trace", f"{mis}:mse", f"{mis}:sleeps", str(repro)],
                          capture_output=True, text=True, timeout=100, cwd=tmp_path, env={**os.environ, "TMPDIR": str(short_tmp)})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "sleeps did not return within 2 s" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - start < 60
