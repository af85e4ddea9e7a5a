"""A TRL user's words: every ``GRPOConfig`` name of TRL that the README maps is answered with the
name used here, in ``--set`` and in config files (one line, exit 2), and ``beta``, the same name
in both, is accepted."""

from __future__ import annotations

import pytest

from grpo_harness.cli import main

from .test_train_cli import TINY

TRL = [  # TRL's name and value, the name here in the answer
    ("num_iterations", "2", "grpo_epochs"),
    ("num_generations", "8", "group_size"),
    ("learning_rate", "1e-6", "lr"),
    ("epsilon", "0.2", "clip_eps_low"),
    ("epsilon_high", "0.28", "clip_eps_high"),
    ("scale_rewards", "false", "scale"),
    ("loss_type", "dapo", "loss_agg"),
    ("max_completion_length", "512", "--max-new-tokens"),
    ("temperature", "0.9", "--temperature"),
    ("top_p", "0.9", "--top-p"),
    ("generation_batch_size", "32", "groups_per_iteration"),
    ("per_device_train_batch_size", "8", "groups_per_iteration"),
    ("sync_ref_model", "true", "ref_update"),
    ("ref_model_sync_steps", "64", "update_ref_model_freq"),
    ("ref_model_mixup_alpha", "0.6", "ref_mix_alpha"),
    ("mask_truncated_completions", "true", "not"),
]


def one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name,value,ours", TRL)
def test_a_trl_name_in_set_is_answered_with_ours(tmp_path, capsys, name, value, ours):
    err = one_line(capsys, main(["train", "cartpole", "--out", str(tmp_path / "r"), "--set", f"{name}={value}"]))
    assert f"TRL's {name}" in err and ours in err, err
    assert not (tmp_path / "r").exists()


def test_a_trl_loss_type_names_the_value_here(tmp_path, capsys):
    err = one_line(capsys, main(["train", "cartpole", "--out", str(tmp_path / "r"), "--set", "loss_type=dr_grpo"]))
    assert "loss_agg=seq-mean-token-sum-norm" in err, err


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_trl_name_in_a_config_file_is_answered_with_ours(tmp_path, capsys, suffix):
    path = tmp_path / f"cfg{suffix}"
    path.write_text("num_iterations = 2\nlearning_rate = 1e-6\n" if suffix == ".toml"
                    else '{"num_iterations": 2, "learning_rate": 1e-6}')
    err = one_line(capsys, main(["train", "cartpole", "--out", str(tmp_path / "r"), "--config", str(path)]))
    assert str(path) in err and "TRL's num_iterations is grpo_epochs here" in err, err


def test_beta_is_the_same_name(tmp_path, capsys):
    assert main(["train", "cartpole", "--out", str(tmp_path / "r"), "--max-iterations", "1", *TINY,
                 "--set", "beta=0.0"]) == 0


def test_a_trl_name_in_ablate_vary_is_answered_with_ours(tmp_path, capsys):
    err = one_line(capsys, main(["ablate", "cartpole", "--out", str(tmp_path / "a"), "--vary", "num_iterations=1,4",
                                 "--seeds", "0"]))
    assert "TRL's num_iterations is grpo_epochs here" in err, err


def test_gspo_and_cispo_names_are_mapped():
    from grpo_harness.trl_names import hint

    assert hint("importance_sampling_level", "sequence") == ("TRL's importance_sampling_level is ratio_level here "
                                                             "(--set ratio_level=sequence)")
    assert hint("loss_type", "cispo").startswith("TRL's loss_type=cispo is --set policy_loss=cispo here")
    assert "epsilon_high=5 is --set clip_eps_high=4" in hint("loss_type", "cispo")
    assert "sequence-token = GSPO-token" in hint("importance_sampling_level")
