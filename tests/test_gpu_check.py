"""``grpo-harness gpu-check``: one line and exit 0 without CUDA; the CUDA code path run on CPU
with the tiny model (``--device cpu --tiny``) writes every number it promises; the 2B shape is
the published Qwen2-VL-2B size."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from grpo_harness import cli, gpu_check  # noqa: E402


def test_without_cuda_one_line_and_exit_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "nvidia_devices", lambda: [])
    assert cli.main(["gpu-check", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 1 and "no CUDA device" in out.out
    assert out.err == "" and not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "needs --tiny"),
    (["--device", "cpu", "--tiny", "--iterations", "0"], "--iterations must be >= 1"),
    (["--device", "nonsense"], "is not a device"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert cli.main(["gpu-check", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_on_cpu_writes_json_and_results_section(tmp_path, capsys):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Before\n\nkept\n\n## GPU check\n\nold text\n\n## After\n\nkept too\n")
    rc = cli.main(["gpu-check", "--device", "cpu", "--tiny", "--precision", "32", "--iterations", "2",
                   "--out", str(tmp_path), "--results-md", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "preflight" in out and "logprob_consistency" in out  # the table is printed
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["shape"] == "tiny" and r["iterations"] == 2 and len(r["steps"]) == 2
    assert r["median_step_seconds"] > 0 and r["sampled_tokens_per_second"] > 0
    assert r["trained_tokens_per_second"] > r["sampled_tokens_per_second"]  # prompts (image tokens) too
    assert r["peak_rss_gb"] > 0 and r["preflight_passed"]
    assert r["logprob_gap"]["statistic"] == "max" and r["logprob_gap"]["max"] < 1e-4  # float32
    assert all(s["skipped_steps"] == 0 for s in r["steps"]), "the hashed reward gives every step a gradient"
    text = md.read_text()
    assert "old text" not in text and "kept\n" in text and "kept too" in text
    assert text.index("## Before") < text.index("## GPU check") < text.index("## After")
    assert "seconds per iteration" in text and (tmp_path / "gpu.md").read_text() in text


def test_replace_section_appends_when_missing():
    new = "## GPU check\n\nnumbers\n"
    assert gpu_check.replace_section("# R\n\n## A\n\na\n", new) == "# R\n\n## A\n\na\n\n" + new
    twice = gpu_check.replace_section(gpu_check.replace_section("# R\n", new), new)
    assert twice.count("## GPU check") == 1


def test_the_2b_shape_has_qwen2_vl_2b_parameter_count():
    """Built on the meta device (no memory): Qwen2-VL-2B-Instruct has 2.21B parameters
    (the Qwen2-VL paper: a 675M-parameter vision encoder and a 1.5B language model)."""
    from adapters.vlm_tasks import colours_vocabulary
    from adapters.vlm_tiny import build_tokenizer
    from transformers import AutoModelForImageTextToText

    config = gpu_check.shape_config("qwen2-vl-2b", build_tokenizer(colours_vocabulary()))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = gpu_check.parameter_count(model)
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    assert 2.15e9 < total < 2.25e9, total
    assert 0.6e9 < vision < 0.7e9, vision
    assert model.config.text_config.num_hidden_layers == len(model.config.text_config.layer_types) == 28


def test_spread_reward_varies_within_a_group():
    r = gpu_check.spread_reward(None, ["w1 w2", "w2 w1", "w3", "w1 w2"])
    assert all(0 <= x < 1 for x in r) and r[0] == r[3] and len(set(r)) == 3


@pytest.mark.parametrize("gpus, argv", [(["/dev/nvidia0"], []), ([], ["--device", "cuda:0"])])
def test_a_gpu_that_torch_cannot_use_fails(tmp_path, monkeypatch, capsys, gpus, argv):
    """An NVIDIA device on the machine (or an explicit cuda:N) with a CPU build of torch: exit 1
    with the install hint, not the "no CUDA here" exit 0 (issue: a gpu-check that cannot fail)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "nvidia_devices", lambda: gpus)
    assert cli.main(["gpu-check", *argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err and "TORCH_SPEC" in err


def test_a_cuda_index_beyond_the_devices_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["gpu-check", "--device", "cuda:5"]) == 2
    assert capsys.readouterr().err.strip() == "gpu-check: --device cuda:5: this machine has 2 CUDA device(s)"


def test_dtype_is_refused_with_what_replaced_it(capsys):
    assert cli.main(["gpu-check", "--dtype", "bfloat16"]) == 2
    assert "--dtype was replaced by --precision" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("precision, passes", [("bf16-mixed", True), ("bf16-true", False)])
def test_the_learning_check_catches_a_run_that_does_not_train(tmp_path, capsys, precision, passes):
    """The recipe's lr (1e-6) on the tiny model: bf16-mixed moves nearly every trainable entry,
    bf16 weights a few percent; the check fails the second (exit 1), whatever the preflight says."""
    rc = cli.main(["gpu-check", "--device", "cpu", "--tiny", "--precision", precision, "--iterations", "1",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["learning"]["passed"] is passes and (rc == 0) is (passes and r["preflight_passed"])
    if passes:
        assert r["learning"]["moved_share"] > 0.95 and "learns" in out
    else:
        assert r["learning"]["moved_share"] < 0.1 and "DOES NOT LEARN" in out and rc == 1
