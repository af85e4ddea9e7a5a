"""``grpo-harness ablate``: variants and seeds, the measures read from a run's metrics (censored
runs at their budget), the verdict rule, and a real tiny ablation with its resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_harness import ablate
from grpo_harness.cli import main
from grpo_harness.run import UsageError


def args_for(**kw):
    base = dict(env="cartpole", variants=None, vary=[], overrides=[], tune=[], seeds="0-1", tune_seeds=None,
                train=None, alpha=None)
    base.update(kw)
    return type("Args", (), base)()


# --- variants and seeds --------------------------------------------------------------------------

def test_parse_seeds():
    assert ablate.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert ablate.parse_seeds([5, 6]) == [5, 6]
    for bad in ("3-1", "a", "1,1"):
        with pytest.raises(UsageError, match="--seeds"):
            ablate.parse_seeds(bad)


def test_vary_makes_one_variant_per_value_that_differs_from_the_base():
    # CartPole's defaults: gamma 0.99, grpo_epochs 10
    spec = ablate.spec_from_args(args_for(vary=["gamma=0.99,1.0", "grpo_epochs=1,4"], overrides=["lr=0.02"]))
    assert list(spec.variants) == ["base", "gamma=1.0", "grpo_epochs=1", "grpo_epochs=4"]
    assert spec.variants["base"].set == {"lr": 0.02}
    v = spec.variants["grpo_epochs=4"]
    assert v.set == {"grpo_epochs": 4} and v.baseline == "base"
    assert ablate.settings(spec, v, {}) == {"lr": 0.02, "grpo_epochs": 4}


def test_variants_file(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('env = "cartpole"\ntrain = ["--max-env-steps", "500"]\nseeds = "0-4"\ntune_seeds = "10-11"\n'
                 '[variants.base]\nset = {beta = 0.0}\n'
                 '[variants.e4]\nset = {grpo_epochs = 4}\ntune = {lr = [0.01, 0.003]}\nexpect = "worse"\n'
                 '[variants.anchor]\nset = {update_ref_model_freq = 0}\ncompare = false\n'
                 '[variants.k1]\nset = {kl_estimator = "k1"}\nbaseline = "anchor"\nmeasure = "final"\n')
    spec = ablate.spec_from_args(args_for(variants=f, seeds=None))
    assert spec.seeds == [0, 1, 2, 3, 4] and spec.tune_seeds == [10, 11] and spec.train == ["--max-env-steps", "500"]
    assert spec.variants["anchor"].baseline is None and spec.variants["k1"].baseline == "anchor"
    assert ablate.candidates(spec.variants["e4"]) == [{"lr": 0.01}, {"lr": 0.003}]
    jobs = ablate.tuning_jobs(spec, tmp_path)
    assert len(jobs) == 4 and {j.seed for j in jobs} == {10, 11}
    assert jobs[0].values == {"beta": 0.0, "grpo_epochs": 4, "lr": 0.01}


@pytest.mark.parametrize("kw, words", [
    (dict(seeds=None), ["no verdict seeds"]),
    (dict(tune_seeds="1-2"), ["[1]", "both tuning and verdict"]),
    (dict(tune=["lr=0.1,0.2"]), ["no --tune-seeds"]),
    (dict(vary=["gama=0.9"]), ["gama", "not a GRPOConfig key"]),
    (dict(overrides=["gamma=2"]), ["gamma"]),
    (dict(vary=["gamma"]), ["--vary expects KEY=V1,V2"]),
])
def test_bad_ablations_are_refused_in_one_line(kw, words):
    with pytest.raises(UsageError) as e:
        ablate.spec_from_args(args_for(**kw))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("name", ["cartpole", "sequence", "sequence-kl", "colours"])
def test_the_benchmark_variants_files_are_valid(name):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ablations" / f"{name}.toml"
    spec = ablate.load_spec(path)
    ablate.check_spec(spec)
    assert len(spec.seeds) >= 20 and not set(spec.seeds) & set(spec.tune_seeds)


def test_tune_from_takes_the_tuned_values_of_another_variant(tmp_path):
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                               "e4": ablate.Variant("e4", {"grpo_epochs": 4}, tune={"lr": [1e-3, 5e-4]}),
                               "kl": ablate.Variant("kl", {"grpo_epochs": 4, "beta": 0.04}, tune_from="e4")},
                       seeds=[0], tune_seeds=[9])
    ablate.check_spec(spec)
    assert [j.variant for j in ablate.tuning_jobs(spec, tmp_path)] == ["e4", "e4"]  # kl is not tuned itself
    assert ablate.tuned(spec, spec.variants["kl"], tmp_path) is None  # e4's tuning not run yet
    for lr, cost in ((1e-3, 80), (5e-4, 40)):
        job = ablate.Job("e4", 9, {"grpo_epochs": 4, "lr": lr},
                         tmp_path / "tune" / "e4" / ablate.slug(f"lr={json.dumps(lr)}") / "seed-9")
        job.folder.parent.mkdir(parents=True)
        job.result_path.write_text(json.dumps({"exit": 0, "reached": True, "iterations": cost, "seconds": 1.0,
                                               "final": 1.0, "final_rolling": 0.9}))
    assert ablate.tuned(spec, spec.variants["kl"], tmp_path) == ({"lr": 5e-4}, [])
    jobs = {j.variant: j for j in ablate.verdict_jobs(spec, tmp_path, {"base": {}, "e4": {"lr": 5e-4},
                                                                          "kl": {"lr": 5e-4}})}
    assert jobs["kl"].values == {"grpo_epochs": 4, "beta": 0.04, "lr": 5e-4}
    spec.variants["kl"].tune_from = "base"
    with pytest.raises(UsageError, match="must name a tuned variant"):
        ablate.check_spec(spec)


def test_variants_file_of_another_env_or_with_unknown_keys(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('env = "cartpole"\nseeds = "0-1"\n')
    with pytest.raises(UsageError, match="ablation of 'cartpole', not vlm"):
        ablate.spec_from_args(args_for(env="vlm", variants=f))
    f.write_text('[variants.x]\nsett = {gamma = 1.0}\n')
    with pytest.raises(UsageError, match="unknown key.*sett"):
        ablate.spec_from_args(args_for(variants=f))
    f.write_text('[variants.x]\nbaseline = "nobody"\n')
    with pytest.raises(UsageError, match="baseline 'nobody' is not a variant"):
        ablate.spec_from_args(args_for(variants=f))


# --- measures and verdicts -----------------------------------------------------------------------

def write_run(folder: Path, env: str, records: list[dict], train: dict, grpo: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"env": env, "grpo": grpo or {}, "train": train}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summarise_cartpole_run_reached_and_censored(tmp_path):
    recs = [{"iteration": 0, "env_steps": 100, "wall_time": 0.5, "eval_mean": 30.0},
            {"iteration": 1, "env_steps": 900, "wall_time": 1.5},
            {"iteration": 2, "env_steps": 2000, "wall_time": 2.5, "eval_mean": 480.0}]
    write_run(tmp_path / "a", "cartpole", recs, {})
    assert ablate.summarise_run("cartpole", tmp_path / "a") == {
        "reached": True, "iterations": 3, "env_steps": 2000, "seconds": 2.5, "final": 480.0,
        "iterations_run": 3, "wall_time": 2.5}
    write_run(tmp_path / "b", "cartpole", recs[:2], {})  # never solved: censored at what it used
    r = ablate.summarise_run("cartpole", tmp_path / "b")
    assert (r["reached"], r["env_steps"], r["iterations"], r["seconds"], r["final"]) == (False, 900, 2, 1.5, 30.0)


def test_summarise_vlm_run_uses_the_runs_target(tmp_path):
    recs = [{"iteration": i, "wall_time": float(i), "reward_rolling": v} for i, v in enumerate([0.1, 0.6, 0.7, 0.65])]
    recs[-1]["eval_reward_mean"] = 0.9
    write_run(tmp_path / "a", "vlm", recs, {"target_reward": 0.6})
    r = ablate.summarise_run("vlm", tmp_path / "a")
    assert (r["reached"], r["iterations"], r["seconds"], r["final"], r["final_rolling"]) == (True, 2, 1.0, 0.9, 0.65)
    write_run(tmp_path / "b", "vlm", recs, {"target_reward": 0.8})
    r = ablate.summarise_run("vlm", tmp_path / "b")
    assert (r["reached"], r["iterations"]) == (False, 4)


def test_summarise_vlm_run_counts_every_completion_to_the_target(tmp_path):
    """3 x 2 completions per iteration plus each iteration's extra draws, through the first
    iteration at the target (censored: through the last): 6 + (6 + 12) = 24 and 24 + 6 + (6 + 6) = 42."""
    recs = [{"iteration": i, "wall_time": float(i), "reward_rolling": v, "extra_generations": e}
            for i, (v, e) in enumerate([(0.1, 0.0), (0.9, 12.0), (0.7, 0.0), (0.6, 6.0)])]
    write_run(tmp_path / "a", "vlm", recs, {"target_reward": 0.8}, {"group_size": 3, "groups_per_iteration": 2})
    assert ablate.summarise_run("vlm", tmp_path / "a")["generations"] == 24
    write_run(tmp_path / "b", "vlm", recs, {"target_reward": 0.95}, {"group_size": 3, "groups_per_iteration": 2})
    assert ablate.summarise_run("vlm", tmp_path / "b")["generations"] == 42
    write_run(tmp_path / "c", "vlm", [{k: v for k, v in r.items() if k != "extra_generations"} for r in recs],
              {"target_reward": 0.8})  # no dynamic sampling; the GRPOConfig defaults' B x G
    from grpo_core.config import GRPOConfig

    per = GRPOConfig().group_size * GRPOConfig().groups_per_iteration
    assert ablate.summarise_run("vlm", tmp_path / "c")["generations"] == 2 * per


def fake_results(spec, out, costs: dict[str, list[int]], budget: int = 100):
    for name, values in costs.items():
        for seed, cost in zip(spec.seeds, values):
            job = ablate.Job(name, seed, {}, out / "runs" / ablate.slug(name) / f"seed-{seed}")
            job.folder.parent.mkdir(parents=True, exist_ok=True)
            doc = {"args": ablate.train_args(spec, job), "exit": 0, "reached": cost < budget, "iterations": cost,
                   "seconds": cost / 10, "final": 1.0 - cost / 1000, "final_rolling": 0.9,
                   "iterations_run": cost, "wall_time": cost / 10}
            job.result_path.write_text(json.dumps(doc))


@pytest.mark.parametrize("expect, variant_costs, verdict, p", [
    ("better", [10, 20, 30, 40, 50, 60], "held", 2 / 64),  # lower on all 6 seeds
    ("worse", [10, 20, 30, 40, 50, 60], "opposite", 2 / 64),
    ("better", [200, 200, 200, 200, 200, 200], "opposite", 2 / 64),
    ("better", [10, 20, 30, 40, 50, 100], "not shown", 2 / 32),  # the censored pair is a tie: dropped
    ("better", [100] * 6, "not shown", 1.0),  # every run censored at the same budget
])
def test_verdict_rule(tmp_path, expect, variant_costs, verdict, p):
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                               "v": ablate.Variant("v", {"gamma": 0.9}, expect=expect)}, seeds=list(range(6)))
    fake_results(spec, tmp_path, {"base": [100] * 6, "v": variant_costs})
    pair = ablate.collect(spec, tmp_path)["variants"]["v"]["pair"]
    assert pair["verdict"] == verdict and pair["p_cost"] == pytest.approx(p)
    md = ablate.markdown(ablate.collect(spec, tmp_path))
    assert f"**{verdict}**" in md and "verdict seeds 0-5" in md


def test_a_verdict_on_completions_counts_the_extra_draws(tmp_path):
    """The same iterations to the target, but fewer completions sampled on every seed (fewer
    groups redrawn): on iterations there is nothing to judge (every difference 0, p 1), on
    completions the variant is better on all 6 seeds (exact p = 2/64)."""
    gens = {"base": [2000] * 6, "v": [1500, 1400, 1300, 1200, 1100, 1000]}
    for cost, name, verdict, p in (("", "iterations", "not shown", 1.0),
                                   ("completions", "completions", "held", 2 / 64)):
        out = tmp_path / (cost or "default")
        spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                                   "v": ablate.Variant("v", {"dynamic_sampling_rounds": 1})},
                           seeds=list(range(6)), cost=cost)
        ablate.check_spec(spec)
        for variant, values in gens.items():
            for seed, g in zip(spec.seeds, values):
                job = ablate.Job(variant, seed, {}, out / "runs" / ablate.slug(variant) / f"seed-{seed}")
                job.folder.parent.mkdir(parents=True, exist_ok=True)
                job.result_path.write_text(json.dumps({
                    "args": ablate.train_args(spec, job), "exit": 0, "reached": True, "iterations": 50,
                    "generations": g, "seconds": 5.0, "final": 1.0, "final_rolling": 0.9,
                    "iterations_run": 300, "wall_time": 30.0}))
        doc = ablate.collect(spec, out)
        pair = doc["variants"]["v"]["pair"]
        assert (pair["verdict"], pair["p_cost"]) == (verdict, pytest.approx(p))
        assert doc["variants"]["v"]["summary"]["cost_q"][1] == (50 if not cost else 1250)
        md = ablate.markdown(doc)
        assert f"median paired difference in {name} |" in md and f"of the {name} to the target" in md


@pytest.mark.parametrize("env, cost", [("cartpole", "completions"), ("vlm", "env-steps"), ("vlm", "tokens")])
def test_a_cost_the_env_does_not_have_is_refused_naming_the_choices(tmp_path, env, cost):
    choices = {"cartpole": "env-steps, iterations", "vlm": "iterations, completions"}[env]
    with pytest.raises(UsageError, match=f"cost {cost!r} is not a cost of {env}: choose one of {choices}$"):
        ablate.spec_from_args(args_for(env=env, cost=cost))
    path = tmp_path / "v.toml"
    path.write_text(f'env = "{env}"\nseeds = "0-1"\ncost = "{cost}"\n')
    with pytest.raises(UsageError, match="is not a cost of"):
        ablate.spec_from_args(args_for(env=env, variants=path))
    path.write_text(f'env = "{env}"\nseeds = "0-1"\ncost = "iterations"\n')
    spec = ablate.spec_from_args(args_for(env=env, variants=path))
    assert ablate.cost_of(spec.env, spec.cost) == ("iterations", "iterations")


def _write(spec, out, variant, seed, folder_kind="runs", **result):
    job = ablate.Job(variant, seed, {}, out / folder_kind / ablate.slug(variant) / f"seed-{seed}")
    job.folder.parent.mkdir(parents=True, exist_ok=True)
    job.result_path.write_text(json.dumps({"args": ablate.train_args(spec, job), "exit": 0, "reached": True,
                                           "seconds": 1.0, "final": 500.0, "iterations_run": 40,
                                           "wall_time": 9.0, **result}))
    return job


def test_cartpole_on_iterations_judges_iterations_and_still_shows_env_steps(tmp_path):
    """Fewer iterations but more env steps on every seed (longer episodes per iteration): the
    verdict, its sooner/later counts and median difference follow the cost asked for; the
    variants table's env-steps column stays env steps."""
    for cost, verdict, sooner, median in (("", "opposite", 0, 300), ("iterations", "held", 6, -5)):
        out = tmp_path / (cost or "default")
        spec = ablate.Spec("cartpole", {"base": ablate.Variant("base", baseline=None),
                                        "v": ablate.Variant("v", {"gamma": 0.9})}, seeds=list(range(6)), cost=cost)
        for seed in spec.seeds:
            _write(spec, out, "base", seed, iterations=20, env_steps=1000)
            _write(spec, out, "v", seed, iterations=15, env_steps=1300)
        doc = ablate.collect(spec, out)
        pair = doc["variants"]["v"]["pair"]
        assert (pair["verdict"], pair["sooner"], pair["cost_median_diff"]) == (verdict, sooner, median)
        assert pair["p_cost"] == pytest.approx(2 / 64)
        assert "| v | gamma=0.9 | 6 | 6/6 | 15 [15, 15] | 1,300 [1,300, 1,300] |" in ablate.markdown(doc)


def test_the_tuning_choice_ranks_by_the_cost_asked_for(tmp_path):
    """lr 0.1 needs fewer iterations, lr 0.01 fewer completions (fewer redraws): each cost
    chooses its own; every candidate reached the target on every tuning seed."""
    for cost, chosen in (("", 0.1), ("completions", 0.01)):
        out = tmp_path / (cost or "default")
        v = ablate.Variant("v", tune={"lr": [0.1, 0.01]})
        spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None), "v": v}, seeds=[0],
                           tune_seeds=[100, 101], cost=cost)
        for cand, its, gens in (({"lr": 0.1}, 40, 3000), ({"lr": 0.01}, 60, 2000)):
            for seed in spec.tune_seeds:
                job = ablate.Job("v", seed, ablate.settings(spec, v, cand),
                                 out / "tune" / "v" / ablate.slug(ablate._cand_name(cand)) / f"seed-{seed}")
                job.folder.parent.mkdir(parents=True, exist_ok=True)
                job.result_path.write_text(json.dumps({"args": ablate.train_args(spec, job), "exit": 0,
                                                       "reached": True, "iterations": its, "generations": gens,
                                                       "seconds": 1.0, "final": 1.0, "final_rolling": 1.0}))
        assert ablate.choose(spec, v, out)[0] == {"lr": chosen}


def test_a_result_without_completions_and_without_its_folder_is_named(tmp_path):
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None)}, seeds=[0], cost="completions")
    job = _write(spec, tmp_path, "base", 0, iterations=50, final_rolling=0.9)  # no generations, no folder
    with pytest.raises(UsageError, match=f"{job.result_path} has no generations .* its run folder is gone"):
        ablate.collect(spec, tmp_path)
    spec.cost = ""
    assert ablate.collect(spec, tmp_path)["variants"]["base"]["summary"]["cost_q"][1] == 50


def test_another_cost_on_a_tuned_ablation_folder_is_refused(tmp_path):
    """Tuned values were ranked by the folder's cost; without tuning another cost is only
    another reading of the same runs."""
    tuned = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                                "v": ablate.Variant("v", tune={"lr": [0.1, 0.01]})}, seeds=[0], tune_seeds=[100])
    (tmp_path / ablate.REPORT_JSON).write_text(json.dumps({"cost": "iterations"}))
    tuned.cost = "completions"
    with pytest.raises(UsageError, match="was tuned and reported on iterations, not completions"):
        ablate.run_ablation(tuned, tmp_path, report_only=True, say=lambda line: None)
    plain = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None)}, seeds=[0], cost="completions")
    ablate._check_same_cost(plain, tmp_path)  # no tuning: allowed
    tuned.cost = "iterations"
    ablate._check_same_cost(tuned, tmp_path)  # the same cost: allowed


def test_the_report_names_the_seeds_every_variant_finished(tmp_path):
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                               "v": ablate.Variant("v", {"gamma": 0.9})}, seeds=list(range(6)))
    fake_results(spec, tmp_path, {"base": [50] * 6, "v": [40] * 4})  # v stopped after seed 3
    md = ablate.markdown(ablate.collect(spec, tmp_path))
    assert "verdict seeds 0-5 (finished by every variant: 0-3); tuning seeds none (no variant is tuned here)" in md


def test_a_result_of_other_settings_is_not_mixed_in(tmp_path):
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None)}, seeds=[0])
    fake_results(spec, tmp_path, {"base": [50]})
    spec.train = ["--max-iterations", "7"]
    job = ablate.verdict_jobs(spec, tmp_path, {"base": {}})[0]
    with pytest.raises(UsageError, match="was run as"):
        ablate.Runner(spec, 1, print).prepare(job)


def test_a_finished_run_under_other_train_defaults_runs_again(tmp_path, monkeypatch):
    """The same arguments are another run once a train-command default changes (e.g. the VLM
    defaults gaining dynamic sampling): such a result is dropped and the run started afresh;
    a default the variant sets itself does not count."""
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                               "v": ablate.Variant("v", {"gamma": 0.9})}, seeds=[0])
    jobs = {j.variant: j for j in ablate.verdict_jobs(spec, tmp_path, {"base": {}, "v": {}})}
    for job in jobs.values():
        job.folder.mkdir(parents=True)
        job.result_path.write_text(json.dumps({"args": ablate.train_args(spec, job), "exit": 0}))
        (job.folder / "config.json").write_text(json.dumps({"grpo": {"gamma": 1.0, "lr": 0.001}}))
    monkeypatch.setattr(ablate, "_command_defaults", lambda env: {"gamma": 1.0, "lr": 0.001})
    said = []
    runner = ablate.Runner(spec, 1, said.append)
    assert runner.prepare(jobs["base"]) is None and runner.prepare(jobs["v"]) is None  # as run
    monkeypatch.setattr(ablate, "_command_defaults", lambda env: {"gamma": 0.5, "lr": 0.001})
    assert runner.prepare(jobs["v"]) is None  # gamma is the variant's own setting
    cmd = runner.prepare(jobs["base"])
    assert cmd is not None and "--resume" not in cmd and not jobs["base"].result_path.exists()
    assert said == ["base seed 0: run again, the train defaults changed since (gamma: 1.0 -> 0.5)"]


def test_a_pin_of_what_a_finished_run_ran_with_keeps_it(tmp_path, monkeypatch):
    """A variants file that pins a setting after its runs (its default changed since) keeps
    the finished runs that ran with that value (config.json; a field it lacks counts at the
    GRPOConfig default); a pin of another value, or a recorded pin that is gone, is another
    run and stops the ablation. The absent field is judged the same way for stale defaults."""
    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None)}, seeds=[0])
    job = ablate.verdict_jobs(spec, tmp_path, {"base": {}})[0]
    job.folder.mkdir(parents=True)
    recorded = ablate.train_args(spec, job)
    job.result_path.write_text(json.dumps({"args": recorded, "exit": 0}))
    (job.folder / "config.json").write_text(json.dumps({"grpo": {"gamma": 1.0, "dynamic_sampling_rounds": 2}}))
    monkeypatch.setattr(ablate, "_command_defaults", lambda env: {"gamma": 1.0, "dynamic_sampling_rounds": 4,
                                                                  "dynamic_sampling_redraw": "retry"})
    said = []
    runner = ablate.Runner(spec, 1, said.append)
    spec.train = ["--set", "dynamic_sampling_rounds=2", "--set", "dynamic_sampling_redraw=fresh"]
    assert runner.prepare(job) is None and said == []  # ran with 2 rounds; no field: the default, fresh
    for pins in (["--set", "dynamic_sampling_rounds=3"], ["--set", "dynamic_sampling_redraw=retry"]):
        spec.train = pins
        with pytest.raises(UsageError, match="was run as"):
            runner.prepare(job)
    spec.train = ["--set", "dynamic_sampling_rounds=2"]  # the redraw left to the (changed) default
    cmd = runner.prepare(job)
    assert cmd is not None and said == ["base seed 0: run again, the train defaults changed since "
                                        "(dynamic_sampling_redraw: 'fresh' -> 'retry')"]
    job.folder.mkdir(parents=True, exist_ok=True)  # the run again, with what it ran with
    (job.folder / "config.json").write_text(json.dumps({"grpo": {"gamma": 1.0, "dynamic_sampling_rounds": 2}}))
    for record, pins in (([*recorded, "--set", "gamma=1.0"], []),  # a pin the record has and the file dropped
                         ([*recorded, "--threads", "2"], ["--set", "gamma=1.0"])):  # another argument
        job.result_path.write_text(json.dumps({"args": record, "exit": 0}))
        spec.train = pins
        with pytest.raises(UsageError, match="was run as"):
            runner.prepare(job)


# --- a real ablation ----------------------------------------------------------------------------------

TINY = ["ablate", "cartpole", "--vary", "grpo_epochs=2", "--seeds", "0-1", "--jobs", "2",
        "--train", "--max-env-steps 300 --eval-episodes 2 --eval-every 1 --hidden 8"]


@pytest.mark.slow
def test_tiny_ablation_runs_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main([*TINY, "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert first.count("[run ") == 4
    for name in ("base", "grpo_epochs=2"):
        for seed in (0, 1):
            doc = json.loads((out / "runs" / name / f"seed-{seed}.json").read_text())
            assert doc["exit"] == 0 and doc["env_steps"] >= 1 and "--threads" in doc["args"]
    md = (out / "ablation.md").read_text()
    assert "| base |" in md and "| grpo_epochs 2 vs the base | grpo_epochs=2 vs base | 2 |" in md
    assert (out / "ablation.png").stat().st_size > 0
    metrics = (out / "runs" / "base" / "seed-0" / "metrics.jsonl").read_text()

    assert main([*TINY, "--out", str(out)]) == 0  # everything done: nothing runs again
    assert "[run " not in capsys.readouterr().out
    assert (out / "runs" / "base" / "seed-0" / "metrics.jsonl").read_text() == metrics

    (out / "runs" / "base" / "seed-1.json").unlink()  # finished but its result lost: resumed, not rerun
    assert main([*TINY, "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("[run ") == 1 and "base seed 1" in again
    assert "resuming at iteration" in (out / "runs" / "base" / "seed-1.log").read_text()


def test_runs_without_a_final_reward_are_judged_on_cost():
    """Runs stopped at the target before any evaluation have no final reward (NaN): the cost
    verdict is still given (the report crashed on them before), the final one is not, and a
    variant judged on the final reward is refused in one line."""
    import math

    spec = ablate.Spec(env="vlm", variants={}, seeds=[0, 1, 2])
    runs = lambda its: {s: {"iterations": it, "final": math.nan, "reached": True} for s, it in zip(range(3), its)}  # noqa: E731
    v = ablate.Variant(name="x", expect="worse")
    got = ablate.compare(spec, v, runs([10, 12, 14]), runs([9, 11, 13]))
    assert got["later"] == 3 and got["p_cost"] == 0.25 and math.isnan(got["p_final"])
    with pytest.raises(UsageError, match="judged on the final reward"):
        ablate.compare(spec, ablate.Variant(name="y", measure="final"), runs([1, 2, 3]), runs([1, 2, 3]))
