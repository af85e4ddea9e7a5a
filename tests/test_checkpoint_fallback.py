"""A checkpoint that unpickles but does not restore (a NaN weight, a tensor of the wrong shape, a
missing part, counters that disagree with metrics.jsonl) is named in one line and the previous
checkpoint is used, as for a file that does not load; nothing is dropped from the metrics
before the checkpoint in use has been checked against them."""

from __future__ import annotations

import shutil

import pytest
import torch

from .test_train_cli import assert_same_run, assert_usage_error, load_ckpt, metrics, train
from .test_train_cli import straight_run  # noqa: F401  (fixture: 4 iterations, checkpoint every 1)


def iterations_of(out) -> list[int]:
    return [r["iteration"] for r in metrics(out)]


def edit(path, change) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, path)


def first_weight(state) -> str:
    return next(k for k, v in state["trainer"]["policy"].items() if v.dim() == 2)


def nan_weight(state) -> None:
    state["trainer"]["policy"][first_weight(state)][0, 0] = float("nan")


def wrong_shape(state) -> None:
    key = first_weight(state)
    state["trainer"]["policy"][key] = state["trainer"]["policy"][key][:, :1].clone()


def no_optimizer(state) -> None:
    del state["trainer"]["optimizer"]


def iteration_rewound(state) -> None:
    state["trainer"]["iteration"] = 1  # written after 4 iterations


@pytest.mark.parametrize("change,needles", [
    (nan_weight, ["NaN", "policy"]),
    (wrong_shape, ["shape", "policy"]),
    (no_optimizer, ["optimizer"]),
    (iteration_rewound, ["metrics.jsonl", "iteration"]),
])
def test_a_checkpoint_that_does_not_restore_falls_back_to_the_previous(straight_run, tmp_path, capsys, change,
                                                                        needles):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)  # checkpoint.pt after iteration 3, checkpoint.prev.pt after 2
    edit(out / "checkpoint.pt", change)
    capsys.readouterr()
    assert train(out, "--resume") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "checkpoint.pt" in line]
    assert len(lines) == 1, err
    assert "checkpoint.prev.pt" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert (out / "checkpoint.pt.corrupt").exists()
    assert iterations_of(out) == [0, 1, 2, 3]
    assert_same_run(straight_run, out)  # iteration 3 was re-run from the previous checkpoint


def test_no_checkpoint_that_restores_is_one_line_and_drops_nothing(straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    edit(out / "checkpoint.pt", nan_weight)
    edit(out / "checkpoint.prev.pt", iteration_rewound)
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    err = assert_usage_error(capsys, train(out, "--resume"), "checkpoint.pt", "NaN", "checkpoint.prev.pt",
                             "metrics.jsonl")
    assert len(err.strip().splitlines()) == 1, err
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.pt.corrupt").exists()
    assert load_ckpt(out)["trainer"]["iteration"] == 4


def test_metrics_lost_in_a_crash_keep_the_checkpoint(straight_run, tmp_path, capsys):
    """A crash can lose metrics.jsonl's last lines while checkpoint.pt (written after iteration 3)
    survived: the checkpoint is kept and the lost lines are named, not the checkpoint thrown away
    and its iterations redone."""
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:-1]))  # iteration 3's line lost
    capsys.readouterr()
    assert train(out, "--resume", "--max-iterations", "5") == 0
    err = capsys.readouterr().err
    assert "the lines of iterations 3-3 were lost in a crash" in err, err
    assert not (out / "checkpoint.pt.corrupt").exists()
    assert iterations_of(out) == [0, 1, 2, 4]
