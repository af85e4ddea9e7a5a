"""Sampling engines (adapters.vlm_engine): the VLM adapter samples through an engine, the policy
itself or a copy in another dtype synced with the trainer's weights, and the rollout carries the
engine's log-probs of its samples (``Rollout.engine_logp``) for the loop's mismatch metrics and
correction; the preflight's ``engine_consistency`` row compares them with the trainer's.

Each engine is checked against a source of its own: the policy path against a ``generate`` call
written here, the engine's log-probs against the processed scores transformers returns and, in
float32, against the trainer's forward; the synced weights against the policy's cast by hand;
the loop's correction on the toy task against the float64 oracle from the papers
(reference.grpo_math). Three broken engines are kept next to the tests that catch them, each
caught by the preflight row and by the per-iteration mismatch metric:

- ``NoTemperatureEngine``: log-probs read before the temperature (a recorder handed to
  ``generate`` with ``temperature=T``: transformers applies its warpers after the processors it
  is given; TRL issue 4159 returned vLLM's raw log-probs the same way);
- ``OffByOneEngine``: each step's distribution read at the token before the sampled one;
- ``SkipOneSync``: the weight sync skipped once: the engine samples with stale weights.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm import VLMAdapter  # noqa: E402
from adapters.vlm_engine import (  # noqa: E402
    ENGINES,
    CopyEngine,
    Generation,
    PolicyEngine,
    SampledLogp,
    hf_generate,
)
from adapters.vlm_preflight import (  # noqa: E402
    CHECKS,
    ENGINE,
    ENGINE_BOUNDS,
    LOGPROB,
    failed_names,
    format_preflight,
    run_preflight,
)
from adapters.vlm_tasks import colours_dataset  # noqa: E402
from adapters.vlm_tiny import load_vlm  # noqa: E402
from grpo_core._seeding import derive_seed  # noqa: E402
from grpo_core.adapter import Rollout  # noqa: E402
from grpo_core.config import GRPOConfig  # noqa: E402
from grpo_core.loop import GRPOTrainer  # noqa: E402
from reference import grpo_math as ref  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, add_eos_bias, tiny_dirs  # noqa: E402,F401  (fixtures)
from .toy_adapter import ToyAdapter  # noqa: E402

CFG = GRPOConfig(group_size=4, groups_per_iteration=2, gamma=1.0, grpo_epochs=1, beta=0.0,
                 stats_over="sequences", lr=1e-2, seed=0)
TEMPERATURE = 0.7


# --- broken engines, kept next to the tests that catch them ----------------------------------------

class NoTemperatureEngine(CopyEngine):
    """The recorder given to ``generate`` with the temperature left to transformers, whose
    warpers run after every processor it is handed: the log-probs of the untempered scores."""

    def generate(self, request):
        record = SampledLogp()
        out = hf_generate(self.model, request, processors=[record])
        return Generation(out.sequences, record.finish(out.sequences), out.scores, out.logits)


class _OffByOne(SampledLogp):
    def __call__(self, input_ids, scores):
        # this step's distribution at the token already in place: the previous one
        self.steps.append(torch.log_softmax(scores.float(), -1).gather(1, input_ids[:, -1:]))
        return scores

    def finish(self, sequences):
        return torch.cat(self.steps, 1).cpu()


class OffByOneEngine(CopyEngine):
    """Each step's log-prob read at the token before the one sampled (an index shifted by one)."""

    def generate(self, request):
        record = _OffByOne()
        warp = [] if request.temperature == 1.0 else [_temperature(request.temperature)]
        out = hf_generate(self.model, request, processors=[*warp, record], temperature=1.0)
        return Generation(out.sequences, record.finish(out.sequences), out.scores, out.logits)


class SkipOneSync(CopyEngine):
    """Skips sync number ``skip`` (1-based): that rollout is sampled with the previous weights."""

    def __init__(self, model, dtype=torch.bfloat16, *, skip: int = 2):
        super().__init__(model, dtype)
        self.skip, self.calls = skip, 0

    def sync(self, policy):
        self.calls += 1
        if self.calls != self.skip:
            super().sync(policy)


def _temperature(value):
    from transformers import TemperatureLogitsWarper

    return TemperatureLogitsWarper(value)


# --- set-up ---------------------------------------------------------------------------------------

def varied_reward(prompts, completions, **kw):
    """Different values within groups, so that every iteration updates the policy."""
    return [0.1 * len(c.split()) + 0.05 * (i % 3) for i, c in enumerate(completions)]


def make_adapter(tiny_dirs, engine=None, *, family="qwen2_vl", dtype=torch.bfloat16, temperature=TEMPERATURE,
                 **kw):
    """A tiny model (EOS bias: ragged completions) sampled by ``engine`` (a CopyEngine class, or
    None for the policy)."""
    model, processor = load_vlm(tiny_dirs[family])
    add_eos_bias(model, processor.tokenizer.eos_token_id)
    kw.setdefault("max_new_tokens", 6)
    eng = None if engine is None else engine(model, dtype)
    return VLMAdapter(model, processor, colours_dataset(8), [varied_reward], temperature=temperature,
                      engine=eng, **kw)


def valid(rollout):
    return rollout.inputs["completion_attn"].bool()


# --- the policy path ----------------------------------------------------------------------------

def test_the_policy_engine_samples_as_generate_does_and_reports_nothing(tiny_dirs):
    """The default engine: the tokens of a ``generate`` call written here on the policy (same
    seed, temperature, suppressed ids), and no engine log-probs, so the loop neither measures
    nor corrects anything (its stats have no mismatch keys)."""
    from transformers import GenerationConfig

    ad = make_adapter(tiny_dirs)
    assert isinstance(ad.engine, PolicyEngine)
    rollout = ad.collect(num_groups=2, group_size=4, iteration=3)
    assert rollout.engine_logp is None
    batch = ad.encode_prompts([ad.dataset[i] for i in rollout.inputs["items"]])
    model = ad.policy
    saved = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=ad.eos_id, pad_token_id=ad.pad_id)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(ad.seed, "sample", 3))
            model.model.rope_deltas = None
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 mm_token_type_ids=batch["mm_token_type_ids"],
                                 pixel_values=torch.cat(batch["pixels"]), image_grid_thw=torch.cat(batch["grids"]),
                                 num_return_sequences=4, do_sample=True, temperature=TEMPERATURE, top_k=0,
                                 max_new_tokens=6, suppress_tokens=ad.suppress_ids, eos_token_id=ad.eos_id,
                                 pad_token_id=ad.pad_id)
            model.model.rope_deltas = None
    finally:
        model.generation_config = saved
    comp = out[:, batch["input_ids"].shape[1]:]
    m = valid(rollout)
    assert torch.equal(torch.where(m, comp, 0), torch.where(m, rollout.inputs["completion_ids"], 0))
    stats = GRPOTrainer(ad, CFG).step()
    assert not any(k.startswith("is_") or k == "mismatch_kl" for k in stats)


# --- the copy engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_copy_engine_logp_is_the_distribution_it_sampled_from(tiny_dirs, family):
    """Against two sources: the processed scores transformers returns for the same sampling
    steps (temperature and suppression applied), and, for a float32 copy, the trainer's own
    forward of the sampled tokens (~1e-7 apart: the same weights and function)."""
    for dtype in (torch.float32, torch.bfloat16):
        ad = make_adapter(tiny_dirs, CopyEngine, family=family, dtype=dtype, record_generation_logp=True)
        rollout = ad.collect(num_groups=2, group_size=4, iteration=0)
        m = valid(rollout)
        assert m.sum() > 8 and not m.all()  # ragged completions
        eng = rollout.engine_logp
        assert eng.dtype == torch.float32 and torch.all(eng[~m] == 0)
        assert (eng - rollout.inputs["gen_sample_logp"])[m].abs().max() < 1e-5
        train, _ = ad.forward_logp(ad.policy, rollout, torch.arange(8), want_entropy=False)
        gap = (eng - train.detach())[m].abs()
        if dtype == torch.float32:
            assert gap.max() < 1e-5
        else:  # a real mismatch: rounding, within the preflight's bound
            assert 1e-5 < gap.mean() < ENGINE_BOUNDS[torch.bfloat16][1]


def test_the_engine_holds_the_policys_weights_at_every_rollout(tiny_dirs):
    """At each sampling (dynamic sampling's redraws included) every engine tensor equals the
    policy's cast to bf16, although the policy moved between iterations."""
    ad = make_adapter(tiny_dirs, CopyEngine)
    engine = ad.engine
    seen = []
    generate = engine.generate

    def checked(request):
        state = engine.model.state_dict()
        policy = ad.policy.state_dict()
        assert all(torch.equal(state[k], policy[k].to(state[k].dtype)) for k in state)
        seen.append(state["lm_head.weight"].clone())
        return generate(request)

    engine.generate = checked
    cfg = CFG.replace(dynamic_sampling=True, dynamic_sampling_redraw="fresh", dynamic_sampling_rounds=1)
    tr = GRPOTrainer(ad, cfg)
    rollouts = sum(int(tr.step().get("sampling_rounds", 1)) for _ in range(3))
    assert len(seen) == rollouts == engine.syncs >= 3
    assert not torch.equal(seen[0], seen[-1])  # the weights did move: the check is not vacuous
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    assert not any(p.requires_grad for p in engine.model.parameters())


def test_join_groups_keeps_each_rows_engine_logp(tiny_dirs):
    ad = make_adapter(tiny_dirs, CopyEngine)
    a = ad.collect(num_groups=2, group_size=4, iteration=0)
    b = ad.collect_more(num_groups=2, group_size=4, iteration=0, draw=1)
    joined = ad.join_groups([(a, [1]), (b, [0, 1])])
    t = joined.engine_logp.shape[1]
    pad = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))  # noqa: E731
    assert torch.equal(joined.engine_logp, torch.cat([pad(a.engine_logp[4:]), pad(b.engine_logp)]))
    plain = make_adapter(tiny_dirs)
    c = plain.collect(num_groups=2, group_size=4, iteration=0)
    assert plain.join_groups([(c, [0])]).engine_logp is None


# --- the mismatch, measured every iteration -------------------------------------------------------

def mismatch_per_iteration(tiny_dirs, engine, iterations=3, **kw):
    tr = GRPOTrainer(make_adapter(tiny_dirs, engine, **kw), CFG)
    return [tr.step() for _ in range(iterations)]


def test_mismatch_metrics_of_a_correct_copy(tiny_dirs):
    """float32: no mismatch (ratios 1 to rounding); bf16: a small one, every ratio near 1 and
    nothing truncated at C = 2."""
    for st in mismatch_per_iteration(tiny_dirs, CopyEngine, dtype=torch.float32):
        assert st["mismatch_kl"] < 1e-10 and abs(st["is_ratio_min"] - 1) < 1e-5 > abs(st["is_ratio_max"] - 1)
    for st in mismatch_per_iteration(tiny_dirs, CopyEngine):
        assert 0 < st["mismatch_kl"] < 1e-4
        assert 0.98 < st["is_ratio_min"] <= st["is_ratio_mean"] <= st["is_ratio_max"] < 1.02
        assert st["is_truncated_frac"] == st["is_masked_frac"] == st["is_masked_seq_frac"] == 0.0


@pytest.mark.parametrize("broken", [NoTemperatureEngine, OffByOneEngine])
def test_a_broken_engine_shows_in_every_iterations_mismatch(tiny_dirs, broken):
    good = max(st["mismatch_kl"] for st in mismatch_per_iteration(tiny_dirs, CopyEngine))
    for st in mismatch_per_iteration(tiny_dirs, broken):
        assert st["mismatch_kl"] > 100 * good, (broken.__name__, st["mismatch_kl"], good)


def test_a_skipped_sync_shows_as_a_jump_in_that_iterations_mismatch(tiny_dirs):
    """The second rollout sampled with the first one's weights: its mismatch jumps far above a
    synced engine's; the iterations around it are as a correct engine's."""
    good = [st["mismatch_kl"] for st in mismatch_per_iteration(tiny_dirs, CopyEngine)]
    skipped = [st["mismatch_kl"] for st in mismatch_per_iteration(tiny_dirs, SkipOneSync)]
    assert skipped[1] > 100 * max(good)
    assert skipped[0] == good[0] and max(skipped[0], skipped[2]) < 10 * max(good)


# --- the preflight row ----------------------------------------------------------------------------

def engine_row(adapter_or_trainer, **kw):
    rows = run_preflight(adapter_or_trainer, CFG, checks=(LOGPROB, ENGINE), **kw)
    by = {r.name: r for r in rows}
    return by[LOGPROB], by[ENGINE]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preflight_engine_row_passes_for_a_synced_copy(tiny_dirs, dtype):
    ad = make_adapter(tiny_dirs, CopyEngine, dtype=dtype)
    logprob, row = engine_row(ad)
    assert logprob.passed and logprob.details["statistic"] == "max"  # the policy's own sampling, float32
    assert row.passed, row.explanation
    assert row.details["weights"] == 0.0 and row.details["tokens"] > 8
    stat, bound = ENGINE_BOUNDS[dtype]
    assert (row.details["statistic"], row.bound) == (stat, bound)
    assert row.value < (1e-5 if dtype == torch.float32 else bound / 4)


def test_preflight_engine_row_only_with_a_separate_engine(tiny_dirs):
    ad = make_adapter(tiny_dirs)
    rows = run_preflight(ad, CFG)
    assert [r.name for r in rows] == list(CHECKS) and not failed_names(rows)
    _, row = engine_row(ad)
    assert row.passed is None and "policy itself" in row.explanation
    trainer = GRPOTrainer(make_adapter(tiny_dirs, CopyEngine), CFG)
    names = [r.name for r in run_preflight(trainer)]
    assert names == [CHECKS[0], ENGINE, *CHECKS[1:]]
    assert isinstance(trainer.adapter.engine, CopyEngine)  # the rows sampled by the policy put it back


@pytest.mark.parametrize("broken", [NoTemperatureEngine, OffByOneEngine])
def test_preflight_catches_wrong_engine_logprobs(tiny_dirs, broken):
    _, row = engine_row(make_adapter(tiny_dirs, broken))
    assert row.passed is False and row.details["weights"] == 0.0
    assert row.value > 2 * row.bound, format_preflight([row])
    assert "temperature" in row.explanation


def test_preflight_catches_a_missed_sync(tiny_dirs):
    """After an optimizer step, the engine's next sync skipped: the preflight's rollout is
    sampled with the weights before the step. The log-prob gap alone is far above the bound
    (what an engine that cannot show its weights is judged on), and the weights differ."""
    trainer = GRPOTrainer(make_adapter(tiny_dirs, SkipOneSync), CFG)
    trainer.step()
    _, row = engine_row(trainer)
    assert row.passed is False and row.details["mean"] > 2 * row.bound, format_preflight([row])
    assert row.details["weights"] > 0 and "weight sync" in row.explanation
    _, again = engine_row(trainer)  # the next sync happens: passes
    assert again.passed, again.explanation


# --- the loop's correction end to end, on the toy task against the oracle ------------------------

class _ToySampledByEngine(ToyAdapter):
    """The toy task sampled by an engine apart from the policy: the policy's table of logits
    plus fixed noise (what an engine in another arithmetic does, exaggerated), whose log-probs
    of its samples the rollout carries; old log-probs are left to the loop."""

    def __init__(self, *, noise: float = 0.8, **kw):
        super().__init__(**kw)
        gen = torch.Generator().manual_seed(123)
        self.noise = noise * torch.randn(self.policy.logits.shape, generator=gen, dtype=self.policy.logits.dtype)

    def engine_logits(self):
        return self.policy.logits.detach() + self.noise

    def collect(self, *, num_groups: int, group_size: int, iteration: int) -> Rollout:
        n = num_groups * group_size
        gen = torch.Generator().manual_seed(1000 * self.seed + iteration)
        logp_all = torch.log_softmax(self.engine_logits(), -1)
        tokens = torch.stack([torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1) for _ in range(n)])
        lengths = torch.randint(1, self.t_max + 1, (n,), generator=gen)
        mask = torch.arange(self.t_max)[None, :] < lengths[:, None]
        outcome = ((tokens == 0) & mask).sum(1).double() / lengths.double()
        rewards = torch.zeros(n, self.t_max, dtype=logp_all.dtype)
        rewards[torch.arange(n), lengths - 1] = outcome.to(rewards.dtype)
        engine = logp_all.gather(1, tokens.T).T
        return Rollout(rewards=rewards, mask=mask, old_logp=None, inputs={"tokens": tokens},
                       engine_logp=torch.where(mask, engine, torch.zeros_like(engine)))


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_the_loops_correction_matches_the_oracle_end_to_end(mode):
    """One iteration of the loop on samples from the perturbed engine (old log-probs from the
    trainer, the correction at C = 1.3 so that it truncates or masks some tokens): its loss,
    mismatch KL and the plain-SGD step of the policy's table equal the float64 oracle's (the
    loss from the papers, its gradient chained through the table's softmax by hand)."""
    lr, c = 0.1, 1.3
    cfg = GRPOConfig(group_size=4, groups_per_iteration=2, gamma=1.0, scale="group", stats_over="sequences",
                     grpo_epochs=1, minibatches=1, beta=0.0, max_grad_norm=0.0,
                     engine_correction=mode, engine_correction_threshold=c, lr=lr, seed=0)
    ad = _ToySampledByEngine(t_max=5, vocab=3, seed=1)
    before = ad.policy.logits.detach().clone()
    tr = GRPOTrainer(ad, cfg, optimizer=torch.optim.SGD([ad.policy.logits], lr=lr))
    rollout = ad.collect(num_groups=2, group_size=4, iteration=0)
    stats = tr.step()

    tokens, mask = rollout.inputs["tokens"], rollout.mask
    lengths = mask.sum(1).tolist()
    policy = torch.log_softmax(before, -1)
    rows = range(len(lengths))
    logp = [[float(policy[t, tokens[i, t]]) for t in range(lengths[i])] for i in rows]
    engine = [rollout.engine_logp[i, :lengths[i]].tolist() for i in rows]
    rewards = [[rollout.rewards[i, :lengths[i]].tolist() for i in range(g * 4, g * 4 + 4)] for g in range(2)]
    adv = [a for group in ref.group_advantages(rewards, gamma=1.0, scale="group", stats_over="sequences",
                                               eps=cfg.adv_eps) for a in group]
    keep = [ref.mis_keep(o, e, "token", c) if mode == "mis" else [True] * len(o) for o, e in zip(logp, engine)]
    pick = lambda xs: [[x for x, k in zip(r, ks) if k] for r, ks in zip(xs, keep)]  # noqa: E731
    weights = [ref.tis_weights(o, e, "token", c) for o, e in zip(logp, engine)] if mode == "tis" else None
    kept = pick(logp)
    loss, _, d = ref.grpo_loss(kept, kept, kept, pick(adv), [[0.0] * len(r) for r in kept], beta=0.0, ent_coef=0.0,
                               kl_estimator="k3", eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high,
                               agg=cfg.loss_agg, token_weights=weights)
    assert stats["loss"] == pytest.approx(loss, rel=1e-10, abs=1e-14)
    assert stats["mismatch_kl"] == pytest.approx(ref.mismatch_kl(logp, engine), rel=1e-10)
    changed = stats["is_truncated_frac"] if mode == "tis" else stats["is_masked_frac"]
    assert 0 < changed < 1  # the correction did act on some tokens, not all
    # d loss / d logits[t, v] = sum over kept tokens at t of d_it * (1[v = token] - softmax[t, v])
    grad = torch.zeros_like(before)
    probs = policy.exp()
    for i in rows:
        it = iter(d[i])
        for t in range(lengths[i]):
            if keep[i][t]:
                grad[t] += next(it) * (torch.nn.functional.one_hot(tokens[i, t], before.shape[1]) - probs[t])
    assert torch.allclose(ad.policy.logits.detach(), before - lr * grad, rtol=0, atol=1e-13)


# --- the command ----------------------------------------------------------------------------------

def test_engine_names_agree():
    from grpo_harness import train_vlm

    assert train_vlm.ENGINES == ENGINES


def test_tracker_names_of_the_mismatch_metrics():
    from grpo_harness.trackers import tracker_tag

    assert tracker_tag("mismatch_kl") == "train/rollout_corr/k3_kl"
    assert tracker_tag("is_ratio_max") == "train/rollout_corr/rollout_is_max"
    assert tracker_tag("is_truncated_frac") == "train/is_truncated_frac"


def test_the_engine_ablation_file_varies_the_engine():
    from pathlib import Path

    from grpo_harness.ablate import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "benchmarks" / "ablations" / "engine.toml")
    assert spec.env == "vlm"
    flags = {name: v.train for name, v in spec.variants.items()}
    assert flags["base"] == [] and any(f == ["--engine", "copy-bf16"] for f in flags.values())


@pytest.mark.slow
def test_train_vlm_engine_copy_bf16_records_and_resumes(tmp_path, capsys):
    from grpo_harness.train_vlm import main

    out = tmp_path / "run"
    base = ["--task", "colours", "--out", str(out), "--threads", "1", "--num-prompts", "8", "--eval-size", "4",
            "--set", "group_size=4", "--lr-schedule", "constant"]
    assert main([*base, "--engine", "copy-bf16", "--max-iterations", "2"]) == 0
    text = "".join(capsys.readouterr())
    assert re.search(r"engine_consistency\s+PASS", text) and "sampled by copy-bf16" in text
    assert json.loads((out / "config.json").read_text())["train"]["engine"] == "copy-bf16"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mismatch_kl"] < 1e-4 and math.isfinite(r["is_ratio_min"]) for r in recs)
    resume = ["--out", str(out), "--resume", "--threads", "1"]
    assert main([*resume, "--max-iterations", "3", "--engine", "policy"]) == 2
    assert "engine='policy' differs from the run's 'copy-bf16'" in capsys.readouterr().err
    assert main([*resume, "--max-iterations", "3", "--skip-preflight"]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and "mismatch_kl" in recs[-1]
    lora = tmp_path / "lora"
    assert main(["--task", "colours", "--out", str(lora), "--engine", "copy-bf16", "--lora-rank", "2"]) == 2
    assert "--lora-rank is not supported" in capsys.readouterr().err
