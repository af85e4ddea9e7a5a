"""Precision modes (``grpo_core.precision``; ``train vlm --precision``): bf16-mixed trains the
float32 master weights at a learning rate where bf16 weights cannot move, its update is fp32's
up to what bf16 rounding does to the gradient's signs, and bf16-true says when its updates
round away.

Independent sides: bf16's spacing is checked against torch's own bf16 rounding; the fp32-vs-mixed
tolerance is derived from Adam's first step, which is exactly ``-lr * sign(g)`` wherever
``|g|`` is far above Adam's eps (1e-8): the two runs' first updates can differ only on the
entries whose gradient sign the bf16 compute flipped, and there by exactly ``2 lr``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grpo_core.precision import (PRECISIONS, bf16_half_ulp, bf16_stalled_share, bf16_true_note, compute_context,
                                 moved_share, weight_dtype)

pytest.importorskip("transformers")

from adapters.vlm import VLMAdapter  # noqa: E402
from adapters.vlm_tasks import colours_dataset  # noqa: E402
from adapters.vlm_tiny import load_vlm  # noqa: E402
from grpo_core.config import GRPOConfig  # noqa: E402
from grpo_core.loop import GRPOTrainer  # noqa: E402
from grpo_harness.gpu_check import spread_reward  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, add_eos_bias, tiny_dirs  # noqa: E402,F401

LR = 1e-6
CFG = dict(group_size=4, groups_per_iteration=2, grpo_epochs=1, minibatches=1, beta=0.0, lr=LR, seed=0,
           stats_over="sequences", gamma=1.0, max_grad_norm=0.0, skip_zero_grad_steps=False)


def test_the_command_line_names_the_cores_precisions():
    from grpo_harness.train_vlm import PRECISIONS as CLI

    assert CLI == PRECISIONS


@pytest.mark.parametrize("w", [1.0, 0.02, -3.7, 1e-3, 0.75, 2.0 ** -20])
def test_half_ulp_is_bf16s_rounding_threshold(w):
    """A change slightly above half a bf16 ulp moves the rounded value; slightly below, it does
    not (torch's own round-to-nearest decides, an independent source)."""
    x = torch.tensor(w, dtype=torch.float64)
    b = x.to(torch.bfloat16)
    x = b.double()
    h = bf16_half_ulp(x)
    up = x + torch.sign(x) * h * 1.01
    down = x + torch.sign(x) * h * 0.99
    assert up.to(torch.bfloat16) != b
    assert down.to(torch.bfloat16) == b


def test_half_ulp_closed_forms():
    """2**(e - 8) for |w| in [2**e, 2**(e+1)): 1.0 -> 2**-8, 0.02 -> 2**-14 (6.1e-5, the issue's
    "about 6e-5"), 1.99 -> 2**-8."""
    got = bf16_half_ulp(torch.tensor([1.0, 0.02, 1.99, -0.5]))
    assert got.tolist() == [2.0 ** -8, 2.0 ** -14, 2.0 ** -8, 2.0 ** -9]


def test_stalled_share_and_the_note():
    """Weights of 0.02: half-ulp 6.1e-5. At lr 1e-6 every entry is stalled (the note says 100%);
    at lr 1e-3 none is (no note). Weights of 0 can always move."""
    w = [torch.full((100,), 0.02), torch.zeros(100)]
    assert bf16_stalled_share(w, 1e-6) == 0.5
    assert bf16_stalled_share(w, 1e-3) == 0.0
    note = bf16_true_note([torch.full((10,), 0.02)], 1e-6)
    assert note.startswith("warning: precision bf16-true at lr 1e-06: 100.0% of the trainable entries")
    assert "--precision bf16-mixed" in note
    assert bf16_true_note([torch.full((10,), 0.02)], 1e-3) is None


def test_weight_dtype_and_the_compute_context():
    assert weight_dtype("32") == weight_dtype("bf16-mixed") == torch.float32
    assert weight_dtype("bf16-true") == torch.bfloat16
    lin = torch.nn.Linear(4, 4)
    with compute_context("bf16-mixed", "cpu"):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16
    with compute_context("32", "cpu"):
        assert lin(torch.ones(1, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp16' is not valid; choose one of 32, bf16-mixed, bf16-true"):
        compute_context("fp16", "cpu")


# --- the tiny VLM ---------------------------------------------------------------------------------

def _adapter(tiny_dirs, precision):
    model, processor = load_vlm(tiny_dirs["qwen2_vl"], dtype=weight_dtype(precision))
    add_eos_bias(model, processor.tokenizer.eos_token_id)
    return VLMAdapter(model, processor, colours_dataset(8), [spread_reward], max_new_tokens=6)


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("precision, moved_at_least, moved_at_most", [
    ("32", 0.95, 1.0), ("bf16-mixed", 0.95, 1.0), ("bf16-true", 0.0, 0.10)])
def test_weights_move_at_lr_1e6(tiny_dirs, precision, moved_at_least, moved_at_most):
    """Three iterations at lr 1e-6 (the README's FSDP recipe's lr), Adam: float32 and bf16-mixed
    move at least 95% of the trainable entries (a few, like a key bias, get no gradient); bf16
    weights move at most 10% (issue: 2.6%). Under bf16-mixed the weights and gradients stay
    float32."""
    tr = GRPOTrainer(_adapter(tiny_dirs, precision), GRPOConfig(**CFG), precision=precision)
    before = _trainable(tr)
    for _ in range(3):
        tr.step()
    after = _trainable(tr)
    share = moved_share(before, after)
    assert moved_at_least <= share <= moved_at_most, f"{precision}: {share:.3f} of the entries moved"
    want = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(p.dtype == want for p in tr.params)
    assert all(p.grad is None or p.grad.dtype == want for p in tr.params)
    if precision == "bf16-true":
        assert bf16_true_note(tr.params, LR) is not None


@pytest.mark.slow
def test_bf16_mixed_first_update_is_fp32s_up_to_flipped_gradient_signs(tiny_dirs):
    """One rollout (float32, fixed), one Adam step from the same weights under "32" and under
    "bf16-mixed". Adam's first step is -lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|), so
    the two updates may differ only where sign(g32) != sign(g16), by 2 lr there. The share q of
    such entries is what bf16 rounding does to the gradient; it is measured from the two
    gradients and must be small (< 5%); the updates must agree everywhere else."""
    base = _adapter(tiny_dirs, "32")
    rollout = base.collect(num_groups=2, group_size=4, iteration=0)
    assert rollout.mask.any(1).all()
    results = {}
    for precision in ("32", "bf16-mixed"):
        ad = _adapter(tiny_dirs, precision)
        tr = GRPOTrainer(ad, GRPOConfig(**CFG), precision=precision)
        before = _trainable(tr)
        ro = copy.deepcopy(rollout)
        adv = tr._advantages(ro)
        tr._update(ro, adv, None)  # the trainer opens its own context per forward
        grads = {n: p.grad.detach().clone() for n, p in tr.policy.named_parameters() if p.grad is not None}
        results[precision] = ({n: _trainable(tr)[n] - before[n] for n in before}, grads)
    (u32, g32), (u16, g16) = results["32"], results["bf16-mixed"]
    assert g32.keys() == g16.keys()
    flipped = total = differ = 0
    weights = _trainable(GRPOTrainer(_adapter(tiny_dirs, "32"), GRPOConfig(**CFG)))
    for n in g32:
        # |g| >= 1e-4: Adam's eps (1e-8) changes the step by at most 1e-4 of lr; the applied step is
        # rounded into the float32 weight, off by up to one float32 spacing of w (tol)
        live = (g32[n].abs() > 1e-4) & (g16[n].abs() > 1e-4)
        w = weights[n]
        tol = 2e-4 * LR + 2 * (torch.nextafter(w.abs(), torch.full_like(w, float("inf"))) - w.abs())
        flip = live & (torch.sign(g32[n]) != torch.sign(g16[n]))
        same = live & ~flip
        flipped += int(flip.sum())
        total += int(live.sum())
        gap = (u32[n] - u16[n]).abs()
        assert bool((gap[same] <= tol[same]).all()), n
        assert bool(((gap[flip] - 2 * LR).abs() <= tol[flip]).all()), n
        differ += int((gap > tol)[live].sum())
    q = flipped / total
    assert total > 0.5 * sum(v.numel() for v in u32.values())
    assert q < 0.05, f"bf16 compute flipped {q:.3%} of the gradient's signs"
    assert differ == flipped


# --- the command line -----------------------------------------------------------------------------

def _cli(tiny_dirs, out, *extra):
    return ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(out), "--threads", "1",
            "--num-prompts", "8", "--eval-size", "4", "--set", "group_size=4", "--set", "groups_per_iteration=2",
            "--set", "dynamic_sampling=false", "--skip-preflight", "--lr-schedule", "constant", *extra]


def test_dtype_is_refused_with_what_replaced_it(tiny_dirs, tmp_path, capsys):
    from grpo_harness.train_vlm import main

    assert main(_cli(tiny_dirs, tmp_path / "r", "--dtype", "bfloat16")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dtype was replaced by --precision" in err[0] and "bf16-mixed" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_bf16_true_at_a_small_lr_says_so_at_the_start_and_in_inspect(tiny_dirs, tmp_path, capsys):
    from grpo_harness.cli import main as cli
    from grpo_harness.train_vlm import main

    assert main(_cli(tiny_dirs, tmp_path / "small", "--precision", "bf16-true", "--set", "lr=1e-6",
                     "--max-iterations", "1")) == 0
    assert "warning: precision bf16-true at lr 1e-06" in capsys.readouterr().err
    assert cli(["inspect", str(tmp_path / "small")]) == 0
    assert "warning: precision bf16-true at lr 1e-06" in capsys.readouterr().out
    assert main(_cli(tiny_dirs, tmp_path / "large", "--precision", "bf16-true", "--set", "lr=1e-2",
                     "--max-iterations", "1")) == 0
    assert "warning: precision bf16-true" not in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_mixed_checkpoints_hold_fp32_and_resume_exactly(tiny_dirs, tmp_path):
    """4 iterations straight vs 2 + resume 2 under bf16-mixed: the same metrics and weights;
    the checkpoint and final/ hold the float32 master weights (a bf16 export would round away
    what training moved in the weights autocast keeps in float32: embeddings, norms)."""
    import json

    from grpo_harness.train_vlm import main

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # --eval-every 2: the first session's last iteration (1) evaluates in both runs
    assert main(_cli(tiny_dirs, straight, "--precision", "bf16-mixed", "--max-iterations", "4", "--eval-every", "2")) == 0
    assert main(_cli(tiny_dirs, resumed, "--precision", "bf16-mixed", "--max-iterations", "2", "--eval-every", "2")) == 0
    assert main(["--out", str(resumed), "--resume", "--max-iterations", "4", "--threads", "1",
                 "--skip-preflight"]) == 0

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(resumed) == rows(straight) and len(rows(straight)) == 4
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["trainer"]["policy"]
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)["trainer"]["policy"]
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    final = load_file(str(next((straight / "final").glob("*.safetensors"))))
    assert {v.dtype for v in final.values() if v.is_floating_point()} == {torch.float32}
    assert json.loads((straight / "config.json").read_text())["train"]["precision"] == "bf16-mixed"


@pytest.mark.slow
def test_a_run_folder_from_before_precision_resumes(tiny_dirs, tmp_path):
    """config.json of an older version says train.dtype: it is read as the precision it meant."""
    import json

    from grpo_harness.train_vlm import main

    out = tmp_path / "old"
    assert main(_cli(tiny_dirs, out, "--max-iterations", "1")) == 0
    doc = json.loads((out / "config.json").read_text())
    doc["train"]["dtype"] = doc["train"].pop("precision") and "float32"
    (out / "config.json").write_text(json.dumps(doc))
    assert main(["--out", str(out), "--resume", "--max-iterations", "2", "--threads", "1", "--skip-preflight"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "32"


class _OneContextPerIteration(GRPOTrainer):
    """The first version: the whole iteration under one autocast context. Autocast caches the
    bf16 copy of each weight while its context is open, so every forward after the first
    optimizer step still computed with the weights from before it."""

    def compute(self):
        import contextlib

        return contextlib.nullcontext()

    def step(self):
        with compute_context(self.precision, "cpu"):
            return super().step()


@pytest.mark.slow
@pytest.mark.parametrize("cls, stale", [(GRPOTrainer, False), (_OneContextPerIteration, True)])
def test_bf16_mixed_forwards_see_each_optimizer_step(tiny_dirs, cls, stale):
    """Two epochs on one rollout, plain SGD at lr 0.1: the second epoch's forward runs on the
    weights the first epoch's step made. Its log-probs then differ from the first epoch's (the
    KL to the reference refreshed before the update: 0.061 in float32 here); with a stale cache
    every weight that autocast casts (the linear layers) is the first epoch's again, and only
    the rest (embeddings, norms) moves the log-probs: a KL of 0.015, a quarter of float32's."""
    cfg = GRPOConfig(**dict(CFG, grpo_epochs=2, beta=0.1, update_ref_model_freq=1, lr=0.1))
    kl = {}
    for precision, kind in (("32", GRPOTrainer), ("bf16-mixed", cls)):
        ad = _adapter(tiny_dirs, precision)
        sgd = torch.optim.SGD([p for p in ad.policy.parameters() if p.requires_grad], lr=0.1)
        tr = kind(ad, cfg, sgd, precision=precision)
        st = tr.step()
        kl[precision] = (st["kl"], st["ratio_max"])
    fp32_kl, mixed = kl["32"][0], kl["bf16-mixed"]
    assert fp32_kl > 1e-4
    if stale:
        assert mixed[0] < 0.5 * fp32_kl
    else:
        assert 0.5 * fp32_kl < mixed[0] < 2 * fp32_kl and mixed[1] > 1.0


# --- the device of a rank (issue 29, item 7) -------------------------------------------------------

class _Rank:
    def __init__(self, local_rank):
        self.local_rank = local_rank


@pytest.mark.parametrize("asked, local, want", [("cuda", 3, "cuda:3"), ("cuda:3", 3, "cuda:3"), ("cpu", 3, "cpu")])
def test_each_rank_takes_its_local_gpu(asked, local, want):
    from grpo_harness.train_vlm import rank_device

    assert rank_device(asked, _Rank(local)) == want
    assert rank_device(asked, None) == asked  # one process: as asked


def test_an_index_that_contradicts_the_local_rank_is_refused():
    """Before: every rank honoured --device cuda:0 literally, and NCCL failed on a shared GPU."""
    from grpo_harness.run import UsageError
    from grpo_harness.train_vlm import rank_device

    with pytest.raises(UsageError, match=r"--device cuda:0: under torchrun each rank uses .* \(cuda:2 for local rank 2\)"):
        rank_device("cuda:0", _Rank(2))


def test_the_process_group_binds_the_rank_to_its_gpu(monkeypatch):
    import torch.distributed as dist

    from grpo_harness import launch

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("set", i))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch.World(10.0)
    assert seen["set"] == 1 and seen["device_id"] == torch.device("cuda", 1)
    assert seen["backend"] == "cpu:gloo,cuda:nccl"


# --- CUDA settings (issue 29, items 4 and 11), with torch.backends' setters recorded --------------

def _record_backends(monkeypatch):
    seen = {}
    for name in ("enable_cudnn_sdp", "enable_flash_sdp", "enable_mem_efficient_sdp", "enable_math_sdp"):
        monkeypatch.setattr(torch.backends.cuda, name, lambda on, name=name: seen.__setitem__(name, on))
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **kw: seen.__setitem__("deterministic", on))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    return seen


def test_cuda_turns_off_cudnn_attention_and_deterministic_turns_on_the_rest(monkeypatch):
    import os

    from grpo_harness.train_vlm import CUBLAS_WORKSPACE, configure_cuda

    seen = _record_backends(monkeypatch)
    configure_cuda("cpu", deterministic=True)
    assert seen == {}  # CPU: nothing to change
    configure_cuda("cuda:0", deterministic=False)
    assert seen == {"enable_cudnn_sdp": False} and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    configure_cuda("cuda:0", deterministic=True)
    assert seen == {"enable_cudnn_sdp": False, "deterministic": True, "enable_flash_sdp": False,
                    "enable_mem_efficient_sdp": False, "enable_math_sdp": True}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_checkpoints_carry_the_cuda_random_streams(monkeypatch):
    """When CUDA is in use the RNG state holds every device's stream, and restoring puts them back
    (torch.cuda mocked: 2 devices)."""
    from grpo_harness import run as run_module

    streams = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: streams)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.setdefault("all", states))
    state = run_module.rng_state()
    assert [t.tolist() for t in state["cuda"]] == [[1, 2], [3, 4]]
    run_module.set_rng_state(state)
    assert [t.tolist() for t in restored["all"]] == [[1, 2], [3, 4]]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in run_module.rng_state()  # a CPU run's checkpoint is as before


# --- preflight bounds by device and precision (issue 29, item 10) ---------------------------------

def test_logprob_bounds_by_device_and_dtype():
    from adapters.vlm_preflight import CUDA_FLOAT32_BOUND, logprob_bound

    assert logprob_bound(torch.float32, "cpu") == ("max", 1e-4)
    assert logprob_bound(torch.float32, "cuda") == CUDA_FLOAT32_BOUND == ("max", 1e-3)
    assert logprob_bound(torch.bfloat16, "cuda") == logprob_bound(torch.bfloat16, "cpu") == ("mean", 0.05)


def test_preflight_bound_reaches_the_row(tiny_dirs, tmp_path, capsys):
    """--preflight-bound 1e-12: the float32 row (max gap ~5e-7) now fails, naming the bound."""
    from grpo_harness.train_vlm import main

    args = [a for a in _cli(tiny_dirs, tmp_path / "r", "--max-iterations", "1", "--preflight-bound", "1e-12")
            if a != "--skip-preflight"]
    assert main(args) == 1
    out = capsys.readouterr()
    assert "logprob_consistency" in out.out and "exceeds 1e-12" in out.out


# --- host memory (issue 29, item 8) ---------------------------------------------------------------

def test_a_cuda_model_is_loaded_onto_its_device(tiny_dirs, monkeypatch):
    """``load_vlm(device="cuda:1")`` asks from_pretrained for device_map="cuda:1" (no host copy
    first); on CPU nothing changes (from_pretrained recorded, then the real load on CPU)."""
    from transformers import AutoModelForImageTextToText

    seen = []
    real = AutoModelForImageTextToText.from_pretrained

    def record(path, **kw):
        seen.append(kw.get("device_map"))
        kw.pop("device_map", None)
        return real(path, **kw)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", record)
    load_vlm(tiny_dirs["qwen2_vl"], device="cuda:1")
    load_vlm(tiny_dirs["qwen2_vl"], device="cpu")
    assert seen == ["cuda:1", None]


def test_checkpoints_are_read_memory_mapped(tmp_path, monkeypatch):
    from grpo_harness import run as run_module

    seen = {}
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    path = tmp_path / "c.pt"
    torch.save({"format": run_module.CHECKPOINT_FORMAT, "x": torch.zeros(3)}, path)
    assert run_module.read_checkpoint(path)["x"].tolist() == [0.0, 0.0, 0.0]
    assert seen.get("mmap") is True


# --- evaluation under torchrun (issue 29, item 5) --------------------------------------------------

def test_the_ranks_split_the_held_out_rows_and_merge_their_rewards():
    from grpo_harness.train_vlm import eval_share, merge_eval

    rows = list(range(10))
    shares = [eval_share(rows, r, 3) for r in range(3)]
    assert sorted(x for s in shares for x in s) == rows and shares[0] == [0, 3, 6, 9]
    # rank rewards 1.0 x 4 samples, 0.5 x 3, 0 x 3: the mean over all 10 is 5.5 / 10
    assert merge_eval(4 * 1.0 + 3 * 0.5, 10) == {"eval_reward_mean": 0.55, "eval_samples": 10}
    assert merge_eval(0.0, 0)["eval_samples"] == 0


def test_evaluation_runs_with_the_parameters_gathered_and_in_the_runs_precision():
    """The run's evaluation enters the trainer's gathered_parameters() (FSDP: one gather for the
    whole evaluation, not one per token) and its compute() context."""
    import contextlib

    from grpo_harness.train_vlm import VLMRun

    entered = []

    class Trainer:
        @contextlib.contextmanager
        def gathered_parameters(self):
            entered.append("gathered")
            yield

        def compute(self):
            entered.append("compute")
            return contextlib.nullcontext()

    class Adapter:
        def evaluate(self, rows):
            return {"eval_reward_mean": 1.0, "eval_samples": len(rows)}

    run = VLMRun.__new__(VLMRun)
    run.world, run.held, run.trainer, run.adapter = None, [1, 2], Trainer(), Adapter()
    assert run._evaluate() == {"eval_reward_mean": 1.0, "eval_samples": 2}
    assert entered == ["compute", "gathered"]


def test_tf32_is_offered_and_off_by_default(monkeypatch):
    from grpo_harness.train_vlm import configure_cuda

    _record_backends(monkeypatch)
    asked = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", asked.append)
    configure_cuda("cuda", deterministic=False)
    assert asked == []
    configure_cuda("cuda", deterministic=False, tf32=True)
    assert asked == ["high"]



@pytest.mark.slow
def test_every_forward_autocasts_and_no_backward_or_step_does(tiny_dirs):
    """bf16-mixed, 2 epochs x 2 minibatches with a reference (beta > 0): every forward of the
    policy and of the reference (rollout, old and reference log-probs, the update's) runs under
    autocast; every backward and optimizer step outside it (a context held over a step computes
    with stale bf16 copies of the weights)."""
    cfg = GRPOConfig(**dict(CFG, grpo_epochs=2, minibatches=2, beta=0.1, update_ref_model_freq=1))
    tr = GRPOTrainer(_adapter(tiny_dirs, "bf16-mixed"), cfg, precision="bf16-mixed")
    seen = {"policy": [], "reference": [], "backward": [], "step": []}
    tr.policy.lm_head.register_forward_pre_hook(lambda m, a: seen["policy"].append(torch.is_autocast_enabled("cpu")))
    tr.reference.lm_head.register_forward_pre_hook(
        lambda m, a: seen["reference"].append(torch.is_autocast_enabled("cpu")))
    tr.policy.lm_head.weight.register_hook(lambda g: seen["backward"].append(torch.is_autocast_enabled("cpu")))
    step = tr.optimizer.step

    def recorded_step(*a, **kw):
        seen["step"].append(torch.is_autocast_enabled("cpu"))
        return step(*a, **kw)

    tr.optimizer.step = recorded_step
    tr.step()
    assert seen["policy"] and all(seen["policy"]), seen["policy"]
    assert seen["reference"] and all(seen["reference"])
    assert len(seen["step"]) == 4 and not any(seen["step"]) and seen["backward"] and not any(seen["backward"])
