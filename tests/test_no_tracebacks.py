"""Mistakes that ended in a traceback and now end in one line (exit 2): ``inspect --plot`` to a
path it cannot write, ``report`` on malformed XML, a truncated ``model.safetensors``, a
``--hidden`` too large for the machine's memory, and ``--out ""``."""

from __future__ import annotations

import importlib.util
import os

import pytest

from grpo_harness.cli import main

from .test_train_cli import TINY


def one_line(capsys, rc: int, *needles: str, code: int = 2) -> str:
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "run"
    assert main(["train", "cartpole", "--out", str(out), "--max-iterations", "2", *TINY]) == 0
    return out


def test_inspect_plot_into_a_folder_is_one_line(cartpole_run, tmp_path, capsys):
    capsys.readouterr()
    one_line(capsys, main(["inspect", str(cartpole_run), "--plot", str(tmp_path)]), str(tmp_path), "folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_inspect_plot_into_a_read_only_folder_is_one_line(cartpole_run, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        capsys.readouterr()
        one_line(capsys, main(["inspect", str(cartpole_run), "--plot", str(ro / "p.png")]), "cannot write")
    finally:
        ro.chmod(0o700)


def test_inspect_plot_under_a_file_is_one_line(cartpole_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    one_line(capsys, main(["inspect", str(cartpole_run), "--plot", str(tmp_path / "file" / "p.png")]),
             "cannot write")


def test_report_on_malformed_xml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "junit.xml"
    bad.write_text("<testsuites><testsuite><testcase name='x'>")
    one_line(capsys, main(["report", str(bad), "--out", str(tmp_path / "rep")]), str(bad), "not valid JUnit XML")


def test_a_policy_too_large_for_memory_is_refused_naming_the_estimate(tmp_path, capsys):
    one_line(capsys, main(["train", "cartpole", "--out", str(tmp_path / "r"), "--hidden", "100000"]),
             "--hidden 100000", "GB")
    assert not (tmp_path / "r").exists()


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "cartpole", "--out", "", "--max-iterations", "1", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "empty" in err, err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the vlm extra")
def test_a_truncated_model_safetensors_is_one_line(tmp_path, capsys):
    from adapters.vlm_tasks import colours_vocabulary
    from adapters.vlm_tiny import build_tiny_vlm

    folder = build_tiny_vlm(tmp_path / "m", words=colours_vocabulary(), family="qwen2_vl", seed=0)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    rc = main(["train", "vlm", "--task", "colours", "--model", str(folder), "--out", str(tmp_path / "r"),
               "--threads", "1"])
    one_line(capsys, rc, "cannot load model", "model.safetensors")


def test_the_memory_estimate_counts_the_policy_parameters():
    from adapters.cartpole import CartPolePolicy
    from grpo_harness.train import policy_parameters

    for hidden in (1, 8, 64):
        assert policy_parameters(hidden) == sum(p.numel() for p in CartPolePolicy(hidden).parameters())
