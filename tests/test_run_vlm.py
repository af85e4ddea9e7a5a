"""``train vlm`` on the run module: the user's reward code and data fail in one line (exit 2)
and leave a checkpoint of the last completed iteration or no run folder, images are checked
at load, ``--model`` and ``--device`` fail fast, the LR schedule is exact across a resume with a
new budget, and LoRA checkpoints hold only the adapters. The shared run behaviour (signals,
corruption, fingerprints) is tested once, on CartPole, in tests/test_run_reliability.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from adapters.vlm_tasks import colours_dataset  # noqa: E402
from grpo_harness.train_vlm import VLM_DEFAULTS, main  # noqa: E402

from .test_vlm import _one_thread, _quiet_transformers, tiny_dirs  # noqa: E402,F401  (fixtures)

REWARDS = '''
import math
calls = 0

def raising(prompts, completions, **kw):
    raise ZeroDivisionError("division by zero")

def short(prompts, completions, **kw):
    return [1.0]

def nan(prompts, completions, **kw):
    return [math.nan] * len(completions)

def nothing(prompts, completions, **kw):
    return [None] * len(completions)

def third_call_raises(prompts, completions, **kw):
    global calls
    calls += 1
    if calls == 3:
        raise KeyError("missing_column")
    return [float(c.startswith("red")) for c in completions]
'''


@pytest.fixture
def data(tmp_path):
    """rows.jsonl (4 colour rows, a blank line after the second) and rewards.py."""
    lines = []
    for i, row in enumerate(colours_dataset(4)):
        row["image"].save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": row["prompt"], "answer": row["answer"]}))
    lines.insert(2, "")
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path


def data_args(tiny_dirs, data, reward="third_call_raises", *extra):
    return ["--data", str(data / "rows.jsonl"), "--reward", f"{data / 'rewards.py'}:{reward}",
            "--model", str(tiny_dirs["qwen2_vl"]), "--max-iterations", "4", "--max-new-tokens", "2",
            "--set", "group_size=2", "--set", "groups_per_iteration=2", "--threads", "1",
            "--set", "dynamic_sampling=false", *extra]  # one reward call per iteration: no extra draws


def one_error_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("grpo-harness train vlm: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("reward,needles", [
    ("raising", ["'raising' raised ZeroDivisionError: division by zero"]),
    ("short", ["'short' returned 1 values for 4 completions"]),
    ("nan", ["'nan' returned nan"]),
    ("nothing", ["'nothing' scored no sample"]),
])
def test_a_bad_reward_is_one_line_and_leaves_no_folder(tiny_dirs, data, tmp_path, capsys, reward, needles):
    out = tmp_path / "run"
    rc = main([*data_args(tiny_dirs, data, reward, "--skip-preflight"), "--out", str(out)])
    one_error_line(capsys, rc, "iteration 0", *needles)
    assert not out.exists()


def test_a_reward_failing_later_keeps_the_completed_iterations(tiny_dirs, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*data_args(tiny_dirs, data, "third_call_raises", "--skip-preflight"), "--out", str(out)])
    one_error_line(capsys, rc, "iteration 2", "'third_call_raises' raised KeyError")
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2
    assert (out / "final" / "config.json").exists()  # the model of iteration 1, exported


def test_a_reward_failing_in_the_preflight_is_named(tiny_dirs, data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([*data_args(tiny_dirs, data, "raising"), "--out", str(out)])
    one_error_line(capsys, rc, "preflight", "'raising' raised ZeroDivisionError")
    assert not out.exists()


def test_bad_vlm_inputs_are_one_line_and_leave_no_folder(tiny_dirs, data, tmp_path, capsys, monkeypatch):
    (data / "syntax.py").write_text("def f(prompts, completions, **kw):\n    return [1.0 for c in completions\n")
    (data / "not_an_image.png").write_text("hello")
    bad_rows = (data / "rows.jsonl").read_text().splitlines()
    bad_rows[3] = bad_rows[3].replace('"img2.png"', '"not_an_image.png"')  # line 4 of the file
    (data / "bad_rows.jsonl").write_text("\n".join(bad_rows) + "\n")
    (data / "latin1.jsonl").write_bytes(b'{"image": "img0.png", "prompt": "caf\xe9", "answer": "red"}\n')
    ok = data_args(tiny_dirs, data)
    colours = ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--max-iterations", "1"]
    cases = [
        ([*ok, "--reward", f"{data / 'nope.py'}:f"], ["nope.py does not exist"]),
        ([*ok, "--reward", f"{data / 'syntax.py'}:f"], ["syntax.py:f", "SyntaxError", "line 2"]),
        ([*ok, "--reward", "adapters.vlm_tasks:no_such_fn"], ["no_such_fn"]),
        ([*ok, "--reward", "no_such_module_xyz:f"], ["no_such_module_xyz", "ModuleNotFoundError"]),
        ([*colours, "--colours", "7"], ["--colours 7", "2..6"]),
        ([*colours, "--device", "tpu9"], ["--device 'tpu9'", "not a device"]),
        ([*colours, "--set", "lr=Infinity"], ["lr", "finite"]),
        ([*colours[:2], "--model", str(data / "no" / "such" / "model"), "--max-iterations", "1"],
         ["does not exist"]),
        ([*ok[:1], str(data / "bad_rows.jsonl"), *ok[2:]], ["bad_rows.jsonl:4", "not_an_image.png", "does not decode"]),
        ([*ok[:1], str(data / "latin1.jsonl"), *ok[2:]], ["latin1.jsonl", "not UTF-8"]),
    ]
    if not torch.cuda.is_available():
        cases.append(([*colours, "--device", "cuda"], ["--device cuda", "no CUDA device"]))
    for args, needles in cases:
        out = tmp_path / "new" / "run"
        one_error_line(capsys, main([*args, "--out", str(out)]), *needles)
        assert not (tmp_path / "new").exists(), args


def test_an_adapter_refusing_its_arguments_is_one_line(tiny_dirs, tmp_path, capsys, monkeypatch):
    """A ValueError from a constructor (e.g. an option the adapter does not support)."""
    from adapters import vlm

    def refuse(self, *args, **kwargs):
        raise ValueError("top_p < 1 is not supported: the training log-probs would not match")

    monkeypatch.setattr(vlm.VLMAdapter, "__init__", refuse)
    out = tmp_path / "run"
    rc = main(["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--top-p", "0.9", "--out", str(out)])
    one_error_line(capsys, rc, "top_p < 1 is not supported")
    assert not out.exists()


def test_a_hub_id_offline_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    """No network and not in the cache: one line saying so (no minutes of retries)."""
    import huggingface_hub.constants
    from adapters import vlm_tiny

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(vlm_tiny, "load_vlm", lambda *a, **k: pytest.fail("the model load was attempted"))
    out = tmp_path / "run"
    rc = main(["--task", "colours", "--model", "some-org/some-model-xyz", "--out", str(out)])
    one_error_line(capsys, rc, "some-org/some-model-xyz", "not in the local Hugging Face cache",
                   "point --model at the folder")
    assert not out.exists()


def test_resume_without_config_json(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--max-iterations", "1", "--threads", "1",
            "--num-prompts", "8", "--eval-size", "4", "--set", "group_size=4", "--skip-preflight"]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    one_error_line(capsys, main(["--out", str(out), "--resume", "--colours", "3"]),  # the task is the run's
                   "--colours 3 differs from the run's 4")
    (out / "config.json").unlink()
    one_error_line(capsys, main(["--out", str(out), "--resume"]), "config.json is missing")


# --- the learning-rate schedule across a resume (issue: changed --max-iterations) ----------------

def test_lr_follows_the_schedule_after_a_resume_with_a_new_budget(tiny_dirs, tmp_path):
    """lr at iteration i is lr0 * (1 - i / T) for the budget T in force: T = 2 for the first
    session, T = 6 after resuming with --max-iterations 6."""
    out = tmp_path / "run"
    base = ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--out", str(out), "--threads", "1",
            "--num-prompts", "8", "--eval-size", "4", "--set", "group_size=4", "--set", "groups_per_iteration=2",
            "--skip-preflight", "--lr-schedule", "linear"]
    assert main([*base, "--max-iterations", "2"]) == 0
    assert main(["--out", str(out), "--resume", "--max-iterations", "6", "--threads", "1", "--skip-preflight"]) == 0
    lr0 = VLM_DEFAULTS["grpo"]["lr"]
    got = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [lr0 * (1 - i / (2 if i < 2 else 6)) for i in range(6)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    # The old code restored the scheduler and the optimizer's lr from the checkpoint: iteration
    # 2 ran at the old schedule's lr0 * (1 - 2/2) = 0, then lambda(3) of the new one.
    old = [lr0, lr0 / 2, 0.0, lr0 * (1 - 3 / 6), lr0 * (1 - 4 / 6), lr0 * (1 - 5 / 6)]
    assert old != pytest.approx(want, rel=1e-12, abs=0)


# --- LoRA checkpoints: the adapters and their optimizer state only -------------------------------

def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tiny_dirs, tmp_path):
    pytest.importorskip("peft")
    base = ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--threads", "1", "--num-prompts", "8",
            "--eval-size", "4", "--eval-every", "2", "--set", "group_size=4", "--set", "groups_per_iteration=2",
            "--set", "beta=0.04", "--set", "update_ref_model_freq=2", "--set", "grpo_epochs=2", "--lora-rank", "4",
            "--skip-preflight", "--lr-schedule", "constant"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*base, "--out", str(straight), "--max-iterations", "4"]) == 0
    assert main([*base, "--out", str(resumed), "--max-iterations", "2"]) == 0
    assert main(["--out", str(resumed), "--resume", "--max-iterations", "4", "--threads", "1",
                 "--skip-preflight"]) == 0

    ckpt = torch.load(straight / "checkpoint.pt", weights_only=True)
    policy = ckpt["trainer"]["policy"]
    assert ckpt["trainer"]["policy_trainable_only"] is True
    assert policy and all(".lora_" in k and ".policy." in k for k in policy), sorted(policy)[:3]
    assert not any("base_layer" in k or "embed" in k for k in policy)
    adapter_bytes = sum(t.numel() * t.element_size() for t in policy.values())
    model_bytes = sum(f.stat().st_size for f in tiny_dirs["qwen2_vl"].glob("*.safetensors"))
    assert (straight / "checkpoint.pt").stat().st_size < model_bytes / 2 + 8 * adapter_bytes

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(resumed) == rows(straight)
    other = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for part in ("policy", "reference"):
        a, b = ckpt["trainer"][part], other["trainer"][part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert all(math.isfinite(r["loss"]) for r in rows(straight))


class _World:
    writer = True

    def __init__(self, size: int = 2):
        self.size = size


@pytest.mark.parametrize("world, given, expected", [
    (None, {}, True),  # no torchrun: the default stands
    (_World(), {}, False),  # two ranks: not supported there yet, so the default is turned off
    (_World(1), {}, False),  # one torchrun process: the distributed trainer, which refuses it too
    (_World(), {"dynamic_sampling": True}, True),  # asked for: kept (the distributed trainer refuses it)
])
def test_default_dynamic_sampling_under_torchrun(world, given, expected, capsys):
    from grpo_harness.train_vlm import VLMRun

    assert VLM_DEFAULTS["grpo"]["dynamic_sampling"] is True
    run = VLMRun.__new__(VLMRun)
    run.world, run.bar = world, None
    assert run._defaults_for_world(given)["dynamic_sampling"] is expected
    said = "dynamic sampling (a default) is off" in capsys.readouterr().err
    assert said is (world is not None and not given)


# --- a default that changes the objective says so (correctness pass 2, item 1) ------------------

def test_the_default_retry_says_it_is_a_curriculum(tiny_dirs, tmp_path, capsys):
    """The VLM default (dynamic sampling that retries unsolved prompts) reweights prompts; the
    run's first lines say so. Turned off, nothing is said."""
    base = ["--task", "colours", "--model", str(tiny_dirs["qwen2_vl"]), "--threads", "1", "--num-prompts", "8",
            "--eval-size", "4", "--set", "group_size=4", "--set", "groups_per_iteration=2", "--skip-preflight",
            "--max-iterations", "1"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "dynamic_sampling_redraw='retry' (2 rounds) weights a prompt" in err and "curriculum" in err
    assert main([*base, "--out", str(tmp_path / "b"), "--set", "dynamic_sampling=false"]) == 0
    assert "curriculum" not in capsys.readouterr().err
