"""``train vlm --data`` formats (grpo_harness/datasets_io.py): a datasets-saved folder, parquet,
CSV, JSON and JSONL; images as paths, bytes, ``{"bytes", "path"}`` dicts and lists; TRL's
conversational prompts; ``--column`` renames; errors naming the row. The images read back are
compared pixel for pixel with the ones the test wrote (the independent source); the datasets
files are built here with ``datasets`` offline (HF_DATASETS_OFFLINE=1, a private cache)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported anywhere here

from adapters.vlm_tasks import colours_dataset  # noqa: E402
from grpo_harness.datasets_io import load_rows, normalise_prompt, parse_column_maps  # noqa: E402
from grpo_harness.run import UsageError  # noqa: E402

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="the datasets package (data extra) is not installed")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """datasets offline, its Arrow cache in the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def pixels(img) -> np.ndarray:
    from PIL import Image

    if not isinstance(img, Image.Image):
        with Image.open(img) as im:
            img = im.convert("RGB")
    return np.asarray(img.convert("RGB"))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


ROWS = colours_dataset(4, seed=3)


def conversational(text: str) -> list[dict]:
    return [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": text}]


# --- the datasets library's formats ----------------------------------------------------------------

@needs_datasets
def test_a_saved_folder_with_several_images_and_conversational_prompts(tmp_path, offline):
    ds = offline.Dataset.from_dict(
        {"images": [[r["image"]] * (1 + i % 2) for i, r in enumerate(ROWS)],
         "prompt": [conversational(r["prompt"]) for r in ROWS], "solution": [r["answer"] for r in ROWS]},
        features=offline.Features({"images": offline.List(offline.Image()),
                                   "prompt": [{"role": offline.Value("string"), "content": offline.Value("string")}],
                                   "solution": offline.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = load_rows(tmp_path / "saved")
    assert len(rows) == 4
    for i, (row, src) in enumerate(zip(rows, ROWS)):
        assert len(row["image"]) == 1 + i % 2
        for img in row["image"]:
            np.testing.assert_array_equal(pixels(img), pixels(src["image"]))
        assert row["solution"] == src["answer"]
        # TRL's rule: string contents become text parts, the placeholders go before the user's text
        assert row["prompt"] == [{"role": "system", "content": [{"type": "text", "text": "Answer with one word."}]},
                                 {"role": "user", "content": [*[{"type": "image"}] * (1 + i % 2),
                                                              {"type": "text", "text": src["prompt"]}]}]
    offline.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows(tmp_path / "dict")) == 4  # its train split


@needs_datasets
def test_parquet_with_renamed_columns_and_raw_bytes(tmp_path, offline):
    ds = offline.Dataset.from_dict(
        {"img": [r["image"] for r in ROWS], "raw": [png_bytes(r["image"]) for r in ROWS],
         "question": [r["prompt"] for r in ROWS], "label": [r["answer"] for r in ROWS]},
        features=offline.Features({"img": offline.Image(), "raw": offline.Value("binary"),
                                   "question": offline.Value("string"), "label": offline.Value("string")}))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for image_column in ("img", "raw"):
        rows = load_rows(tmp_path / "d.parquet", columns=[f"image={image_column}", "prompt=question",
                                                           "answer=label"])
        for row, src in zip(rows, ROWS):
            np.testing.assert_array_equal(pixels(row["image"]), pixels(src["image"]))
            assert row["answer"] == src["answer"] and row["prompt"] == src["prompt"]
            assert "label" not in row and "question" not in row


@needs_datasets
def test_csv_with_image_paths_beside_the_file(tmp_path, offline):
    (tmp_path / "imgs").mkdir()
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", "answer"])
        for i, r in enumerate(ROWS):
            r["image"].save(tmp_path / "imgs" / f"{i}.png")
            w.writerow([f"imgs/{i}.png", r["prompt"], r["answer"]])
    rows = load_rows(tmp_path / "d.csv")
    for i, (row, src) in enumerate(zip(rows, ROWS)):
        assert row["image"] == str(tmp_path / "imgs" / f"{i}.png")
        np.testing.assert_array_equal(pixels(row["image"]), pixels(src["image"]))


@needs_datasets
def test_bad_datasets_rows_are_named(tmp_path, offline):
    raw = [png_bytes(r["image"]) for r in ROWS]
    raw[2] = b"not a png"
    offline.Dataset.from_dict({"image": raw, "prompt": ["q"] * 4}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UsageError, match=r"bad\.parquet row 2: image bytes \(9 bytes\) do not decode"):
        load_rows(tmp_path / "bad.parquet")
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    prompts = [one] * 3 + [[{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]]
    offline.Dataset.from_dict({"image": [png_bytes(r["image"]) for r in ROWS], "prompt": prompts}).to_parquet(
        str(tmp_path / "two.parquet"))
    with pytest.raises(UsageError, match=r"two\.parquet row 3: the prompt has 2 image placeholder\(s\).* for 1 image"):
        load_rows(tmp_path / "two.parquet")
    with pytest.raises(UsageError, match=r"row 0: no 'image' column \(columns: image, prompt\).*--column image"):
        load_rows(tmp_path / "two.parquet", columns=["photo=image"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="not one saved with datasets' save_to_disk"):
        load_rows(tmp_path / "plain")


def test_datasets_formats_without_datasets_are_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(UsageError, match=r"needs the 'datasets' package \(pip install 'grpo-harness\[data\]'\)"):
        load_rows(tmp_path / "d.parquet")


# --- JSON and JSONL (no extra package) ----------------------------------------------------------------

def test_json_and_jsonl_with_paths_lists_and_dicts(tmp_path):
    for i, r in enumerate(ROWS):
        r["image"].save(tmp_path / f"{i}.png")
    items = [{"image": {"bytes": None, "path": f"{i}.png"}, "prompt": r["prompt"], "answer": r["answer"]}
             for i, r in enumerate(ROWS)]
    (tmp_path / "d.json").write_text(json.dumps(items))
    lines = [json.dumps({"images": [f"{i}.png", f"{(i + 1) % 4}.png"], "prompt": "q", "answer": "x"})
             for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    for row, src in zip(load_rows(tmp_path / "d.json"), ROWS):
        np.testing.assert_array_equal(pixels(row["image"]), pixels(src["image"]))
    rows = load_rows(tmp_path / "d.jsonl")
    for i, row in enumerate(rows):
        assert [pixels(p).tolist() for p in row["image"]] == \
            [pixels(ROWS[j]["image"]).tolist() for j in (i, (i + 1) % 4)]


def test_json_errors_name_the_line(tmp_path):
    ROWS[0]["image"].save(tmp_path / "a.png")
    (tmp_path / "junk.png").write_text("hello")
    good = json.dumps({"image": "a.png", "prompt": "q"})
    cases = {
        "missing.jsonl": (good + "\n\n" + json.dumps({"image": "b.png", "prompt": "q"}),
                          r"missing\.jsonl:3: image file 'b.png' not found"),
        "junk.jsonl": (good + "\n" + json.dumps({"image": "junk.png", "prompt": "q"}),
                       r"junk\.jsonl:2: image .*junk\.png does not decode"),
        "noprompt.jsonl": (json.dumps({"image": "a.png", "question": "q"}),
                           r"noprompt\.jsonl:1: no 'prompt' column \(columns: image, question\)"),
        "notjson.jsonl": (good + "\n{oops", r"notjson\.jsonl:2: not JSON"),
        "inline.jsonl": (json.dumps({"image": "a.png", "prompt": [{"role": "user", "content": [
            {"type": "image", "image": "a.png"}]}]}), r"inline\.jsonl:1: an image inside the prompt's messages"),
        "role.jsonl": (json.dumps({"image": "a.png", "prompt": [{"role": "robot", "content": "q"}]}), r"role 'robot'"),
    }
    for name, (text, pattern) in cases.items():
        (tmp_path / name).write_text(text + "\n")
        with pytest.raises(UsageError, match=pattern):
            load_rows(tmp_path / name)
    with pytest.raises(UsageError, match=r"no column 'label' to map \(columns: image, prompt\)"):
        (tmp_path / "ok.jsonl").write_text(good + "\n")
        load_rows(tmp_path / "ok.jsonl", columns=["answer=label"])
    with pytest.raises(UsageError, match="unknown format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_rows(tmp_path / "d.txt")


def test_column_maps_and_prompt_normalisation():
    assert parse_column_maps(["image=img", " answer = label "]) == {"image": "img", "answer": "label"}
    for bad in (["image"], ["=img"], ["image=a", "image=b"]):
        with pytest.raises(UsageError, match="--column"):
            parse_column_maps(bad)
    # structured content kept, None keys (Arrow's struct columns) dropped, no second placeholder
    structured = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "q"}]}]
    assert normalise_prompt(structured, 1, "r") == [{"role": "user", "content": [{"type": "image"},
                                                                                 {"type": "text", "text": "q"}]}]
    assert normalise_prompt("plain text", 3, "r") == "plain text"  # the adapter adds the placeholders
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert [len(m["content"]) for m in normalise_prompt(two_users, 2, "r")] == [3, 1]
