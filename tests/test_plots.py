"""What a reader of the plots would trip on: in ``inspect.png`` two coinciding zero-signal
measures told apart, a note in an empty KL panel, skipped updates on their own axis; CartPole's
evaluation band inside [0, 500]; the VLM curve's target drawn only on a scale where it means
something, and whole iterations on short runs; ``ablation.png`` with a title and a legend;
``--plot out.jpg`` in JPEG."""

from __future__ import annotations

import json

import pytest

from grpo_harness import ablate
from grpo_harness.cli import main
from grpo_harness.inspect_cmd import plot_run
from grpo_harness.trainlog import plot_curve

from .test_inspect import vlm_doc
from .test_train_cli import TINY

RECORDS = [{"iteration": i, "reward_mean": i / 10, "kl": 0.0, "entropy": 1.0, "zero_signal_groups": 2.0,
            "frac_reward_zero_std": 0.5, "grad_norm": 0.5 + i, "skipped_steps": float(i % 2)} for i in range(6)]


def labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_inspect_plot_tells_coinciding_lines_apart_and_gives_skips_their_own_axis(tmp_path):
    doc = vlm_doc(window=5)
    doc["grpo"]["beta"] = 0.0
    doc["grpo"]["groups_per_iteration"] = 4
    fig = plot_run(RECORDS, doc, tmp_path / "i.png")
    reward, groups, kl, grad = fig.axes[:4]
    zero, std0 = groups.get_lines()
    assert list(zero.get_ydata()) == list(std0.get_ydata())  # the same values here ...
    assert (zero.get_linestyle(), zero.get_linewidth()) != (std0.get_linestyle(), std0.get_linewidth())  # ... both seen
    assert "the same values" in std0.get_label()
    assert any("no KL term" in t.get_text() for t in kl.texts)
    twins = [ax for ax in fig.axes[4:] if ax.bbox.bounds == grad.bbox.bounds]
    assert labels(grad) == ["grad norm"] and len(twins) == 1 and labels(twins[0]) == ["skipped updates"]


def test_cartpole_eval_band_stays_within_what_an_episode_can_return(tmp_path):
    records = [{"env_steps": 100 * (i + 1), "mean_return": 400.0, "eval_mean": 490.0, "eval_std": 30.0}
               for i in range(3)]
    fig = plot_curve(records, tmp_path / "c.png", threshold=475)
    bars = fig.axes[0].containers[0].lines[2][0]
    tops = [max(y for _, y in seg) for seg in bars.get_segments()]
    bottoms = [min(y for _, y in seg) for seg in bars.get_segments()]
    assert max(tops) == pytest.approx(500.0) and min(bottoms) == pytest.approx(460.0)


def test_vlm_curve_has_whole_iterations_and_a_target_only_where_it_means_something(tmp_path):
    pytest.importorskip("transformers")
    from grpo_harness.train_vlm import VLM_DEFAULTS, curve_target, plot_reward_curve

    records = [{"iteration": i, "reward_mean": 3.0 * i} for i in range(3)]
    fig = plot_reward_curve(records, tmp_path / "v.png", window=2, target=None, title="t")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert not any("target" in label for label in labels(ax))
    train = dict(VLM_DEFAULTS["train"])
    assert curve_target({"name": "data"}, train) is None  # a user's reward: its own scale
    assert curve_target({"name": "colours"}, train) == 0.8  # rewards in [0, 1]
    assert curve_target({"name": "data"}, {**train, "target_reward": 7.5}) == 7.5  # the user's own


def test_ablation_plot_has_a_title_and_a_legend(tmp_path):
    from .test_ablate import fake_results

    spec = ablate.Spec("vlm", {"base": ablate.Variant("base", baseline=None),
                               "v": ablate.Variant("v", {"gamma": 0.9})}, seeds=list(range(3)))
    fake_results(spec, tmp_path, {"base": [50, 60, 100], "v": [40, 100, 30]})
    fig = ablate.plot(ablate.collect(spec, tmp_path), tmp_path / "a.png")
    assert fig.get_suptitle() and fig.legends and len(fig.legends[0].get_texts()) == 3


def test_inspect_plot_writes_the_format_its_suffix_names(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "cartpole", "--out", str(out), "--max-iterations", "2", *TINY]) == 0
    assert main(["inspect", str(out), "--plot", str(tmp_path / "p.jpg")]) == 0
    assert (tmp_path / "p.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert main(["inspect", str(out), "--plot", str(tmp_path / "p.xyz")]) == 2
    assert "not 'xyz'" in capsys.readouterr().err
