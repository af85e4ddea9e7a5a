"""The seed studies' shared runner (``benchmarks.seed_sweep``) and the TRL ablation's verdicts
(``benchmarks.trl_ablation.report``), on made-up results whose verdicts and p-values follow
from the exact signed-rank null distribution by hand."""

from __future__ import annotations

import json
import sys

from benchmarks import seed_sweep, trl_ablation

WRITE_RESULT = """
import json, sys
variant, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[sys.argv.index("--result") + 1]
if seed == 13:
    sys.exit("seed 13 refuses")
json.dump({"variant": variant, "seed": seed}, open(out, "w"))
"""


def test_run_sweep_appends_each_finished_run_and_leaves_out_a_failed_one(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    todo = [("a", 1), ("b", 13), ("a", 2)]
    seed_sweep.run_sweep(todo, lambda v, s: [sys.executable, "-c", WRITE_RESULT, v, str(s)], results, 2,
                         lambda r: f"done {r['seed']}")
    got = sorted((r["variant"], r["seed"]) for r in seed_sweep.load_results(results))
    assert got == [("a", 1), ("a", 2)]
    err = capsys.readouterr().err
    assert "3 runs to do (0 already in r.jsonl)" in err and "b seed 13: FAILED" in err and "seed 13 refuses" in err
    assert "a seed 2: done 2" in err
    assert seed_sweep.load_results(tmp_path / "none.jsonl") == []


def _rows(variant: str, costs: list[int], finals: list[float]) -> list[dict]:
    return [{"variant": variant, "seed": s, "reached": c < 300, "iterations": c, "seconds": c / 10.0,
             "final": f} for s, (c, f) in enumerate(zip(costs, finals))]


def test_trl_report_verdicts_follow_the_paired_test():
    """Six seeds. 4 iterations: sooner on all six by distinct amounts: held, p = 2/64. The
    sync pair: later on all six: opposite (expected sooner). The KL pair: three sooner, three
    later with ranks 1+2+6 vs 3+4+5: W = 9 of 21, p well above 0.05: not shown."""
    base = [200, 210, 220, 230, 240, 250]
    four = [c - d for c, d in zip(base, [1, 2, 3, 4, 5, 6])]
    kl = [c + d for c, d in zip(four, [-1, -2, 3, 4, 5, -6])]
    sync = [c + 10 * (k + 1) for k, c in enumerate(kl)]
    rows = (_rows(trl_ablation.BASE, base, [0.8] * 6) + _rows("TRL 4 iterations", four, [0.9] * 6)
            + _rows("TRL 4 iterations + beta 0.04", kl, [0.8] * 6)
            + _rows("TRL 4 iterations + beta 0.04 + sync every batch", sync, [0.8] * 6))
    text = trl_ablation.report(rows, list(range(6)))
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if " vs " in line}
    assert "| 6 / 0 / 0 | -4 | 0.0312 |" in lines["TRL 4 iterations vs TRL base"]
    assert lines["TRL 4 iterations vs TRL base"].endswith("**held** |")
    synced = lines["TRL 4 iterations + beta 0.04 + sync every batch vs TRL 4 iterations + beta 0.04"]
    assert "| 0 / 6 / 0 | +35 | 0.0312 |" in synced and synced.endswith("**opposite** |")
    kl_line = lines["TRL 4 iterations + beta 0.04 vs TRL 4 iterations"]
    assert "| 3 / 3 / 0 |" in kl_line and kl_line.endswith("**not shown** |")
    assert "TRL 4 iterations + epsilon_high 0.28 vs" not in text  # no runs: no row
    assert json.dumps(trl_ablation.VARIANTS)  # the overrides are plain values (recorded in the results)
