"""``grpo-harness check-estimator`` end to end: the command's ``main`` with its exit status,
stdout and stderr, in this process (a subprocess per case cost the torch import each time);
``test_subprocess_entry_point_exit_status`` runs the real console entry point once per exit
status.

Every deliberately wrong estimator of ``tests/wrong_estimators.py`` must exit 1 with the row
that names its bug among the failed rows; the correct ones and the built-ins exit 0; usage
errors exit 2 with one line on stderr.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from grpo_harness.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
FILE = "tests/wrong_estimators.py"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> Result:
    """``grpo-harness check-estimator ARGS`` in this process, from the repository root."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(["check-estimator", *args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(cwd)
    return Result(int(code or 0), out.getvalue(), err.getvalue())


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "grpo_harness.cli", "check-estimator", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def rows_of(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    doc = json.loads(proc.stdout)
    return {r["name"]: r for r in doc["rows"]}


WRONG = [
    ("kl_detached", "kl", ["grad_reaches_logp", "grad_direction"]),
    ("kl_wrong_sign", "kl", ["nonnegative", "unbiased", "grad_direction"]),
    ("kl_k3_inverted", "kl", ["unbiased", "grad_direction"]),
    ("adv_biased_std_one_sample", "advantage", ["group_size_one"]),
    ("adv_mean_only_claims_std", "advantage", ["unit_scale"]),
    ("adv_leak_across_groups", "advantage", ["groups_independent", "zero_mean"]),
    ("returns_off_by_one", "returns", ["recursion"]),
    ("returns_padding_leak", "returns", ["padding_invariance"]),
    ("adv_loo_std_of_others", "advantage", ["bounded_advantage"]),
    ("gspo_wrong_axis", "loss", ["row_equivariance"]),
    ("cispo_undetached", "loss", ["weight"]),
]


@pytest.mark.parametrize("name,kind,failing", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_estimator_exits_1_naming_the_problem(name, kind, failing):
    proc = cli(f"{FILE}:{name}", "--kind", kind, "--json")
    assert proc.returncode == 1, proc.stderr
    rows = rows_of(proc)
    failed = {n for n, r in rows.items() if r["status"] == "FAIL"}
    assert set(failing) <= failed, failed
    for n in failing:
        assert rows[n]["passed"] is False and rows[n]["explanation"]


@pytest.mark.parametrize("name,kind", [("correct_k3", "kl"), ("correct_adv", "advantage"),
                                       ("correct_returns", "returns"), ("correct_loss", "loss")])
def test_correct_estimator_exits_0(name, kind):
    proc = cli(f"{FILE}:{name}", "--kind", kind, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["passed"] is True and doc["kind"] == kind


# k1 and k3 take the same path as k2 here (all six are checked in-process in test_kit.py);
# k3 runs below with an overriding --expect.
BUILTIN_NAMES = ["k2", "k3_is", "group_advantages", "discounted_returns",
                 "policy_loss_dual_clip", "gspo_loss", "gspo_token_loss", "cispo_loss",
                 "rloo_advantage"]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_exits_0_with_a_readable_table(name):
    proc = cli(f"builtin:{name}")  # --kind may be left out for built-ins
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:5] == ["check", "status", "value", "bound", "explanation"]
    assert lines[-1].startswith("result: PASS")
    assert not any(line.split()[1] == "FAIL" for line in lines[2:-1])


def test_expect_overrides_decorator_claims():
    proc = cli("builtin:k3", "--kind", "kl", "--expect", "grad=kl_policy_ref", "--json",
               "--samples", "4000")
    assert proc.returncode == 1
    rows = rows_of(proc)
    assert rows["grad_direction"]["status"] == "FAIL"
    assert rows["grad_direction"]["value"] == "kl_ref_policy"


TRAINERS = "tests/trainer_estimators.py"


def test_loss_kind_names_verl_issue_3741_against_a_dr_grpo_claim():
    proc = cli(f"{TRAINERS}:verl_sum_norm_loss", "--kind", "loss")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("result: FAIL (2 failed: aggregation, padding_invariance)")
    assert "verl issue 3741" in proc.stdout


def test_expect_sets_loss_and_advantage_claims():
    proc = cli(f"{TRAINERS}:verl_policy_loss", "--kind", "loss", "--json",
               "--expect", "agg=grpo,clip_ratio_c=none")
    assert proc.returncode == 1
    rows = rows_of(proc)
    assert rows["aggregation"]["value"] == "token-mean" and rows["aggregation"]["status"] == "FAIL"
    assert rows["clip_ratio_c"]["status"] == "FAIL" and rows["clip_ratio_c"]["value"] == 3.0
    proc = cli(f"{TRAINERS}:verl_grpo_advantage", "--kind", "advantage", "--json",
               "--expect", "eps=1e-6,singleton=raw")
    failed = {n for n, r in rows_of(proc).items() if r["status"] == "FAIL"}
    assert proc.returncode == 1 and failed == {"ties_float32"}


def test_readme_example_passes(tmp_path):
    """The estimators of the README's kit section: the loss run as the README runs it, the
    other two in-process (same path, without two more torch imports)."""
    from grpo_core.testing.kit import all_passed, check_estimator
    from grpo_harness.check_cmd import resolve_target

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Checking your own estimator"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "my_estimators.py"
    path.write_text(code)
    proc = cli(f"{path}:my_loss", "--kind", "loss")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, kind in (("my_k3", "kl"), ("my_adv", "advantage")):
        assert all_passed(check_estimator(resolve_target(f"{path}:{name}"), kind, samples=4000))


# {plain}: a small file without imports, so that these runs skip the torch import
USAGE = {
    "missing_file": (["tests/no_such_file.py:f", "--kind", "kl"], "file not found"),
    "missing_module": (["no_such_package.mod:f", "--kind", "kl"], "module not found"),
    "missing_function": (["{plain}:no_such_function", "--kind", "kl"], "has no attribute"),
    "not_callable": (["{plain}:answer", "--kind", "kl"], "not callable"),
    "import_error": (["{broken}:f", "--kind", "kl"], "importing"),
    "missing_kind": ([f"{FILE}:correct_k3"], "--kind is required"),
    "unknown_builtin": (["builtin:k4"], "unknown builtin"),
    "wrong_signature": ([f"{FILE}:kl_wrong_signature", "--kind", "kl"], "wrong signature"),
    "raises_on_call": ([f"{FILE}:returns_raises", "--kind", "returns"],
                       "basic call raised RuntimeError"),
    "bad_claim_value": ([f"{FILE}:correct_loss", "--kind", "loss", "--expect", "eps_low=abc"],
                        "claim eps_low must be"),
    "claim_of_another_kind": ([f"{FILE}:correct_loss", "--kind", "loss", "--expect", "eps=1e-4"],
                              "unknown claim 'eps' for a loss estimator"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_error_exits_2_with_one_line(case, tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("answer = 42\n\ndef f(a, b):\n    return a\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('missing dependency')\n")
    args, message = USAGE[case]
    proc = cli(*(a.format(plain=plain, broken=broken) for a in args))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr


@pytest.mark.parametrize("args,code", [
    ((f"{FILE}:correct_k3", "--kind", "kl"), 0),
    ((f"{FILE}:kl_detached", "--kind", "kl"), 1),
    ((f"{FILE}:no_such_function", "--kind", "kl"), 2),
])
def test_subprocess_entry_point_exit_status(args, code):
    """The real entry point, as a user's shell sees it: the same exit statuses."""
    proc = cli_subprocess(*args)
    assert proc.returncode == code, proc.stderr
    if code == 2:
        assert len(proc.stderr.strip().splitlines()) == 1
