"""Datasets for the VLM adapter: the synthetic colours task and a JSONL loader.

A dataset is a list of dicts with at least the columns ``image`` (a PIL image, a path, or a
list of either for several images), ``prompt`` (the question text, or a list of chat messages
whose content holds an ``{"type": "image"}`` part per image) and ``answer``; any other columns
are passed to the reward functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (225, 215, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
QUESTION = "What colour is this image?"
FILLER_WORDS = ("the", "it", "colour", "color", "image", "picture", "what", "this", "is", "of",
                "an", "and", "not", "maybe", "yes", "no", "dark", "light", "bright", "pale",
                "shade", "looks", "like", "very")


def colour_names(k: int = 4) -> list[str]:
    if not 2 <= k <= len(COLOURS):
        raise ValueError(f"k={k!r}: the colours task has 2..{len(COLOURS)} colours")
    return list(COLOURS)[:k]


def colours_vocabulary(k: int = 4) -> list[str]:
    """Every word the colours task's tiny tokenizer needs: the question, the K colour names and
    a few filler words the untrained model can also say."""
    words = QUESTION.replace("?", " ?").lower().split()
    return list(dict.fromkeys([*words, *colour_names(k), *FILLER_WORDS]))


def colour_image(rgb, *, size: int = 56, noise: int = 16, rng: np.random.Generator):
    """A ``size`` x ``size`` RGB image of one colour plus uniform integer noise in
    [-noise, noise] per pixel and channel."""
    from PIL import Image

    base = np.array(rgb, dtype=np.int16)[None, None, :]
    jitter = rng.integers(-noise, noise + 1, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + jitter, 0, 255).astype(np.uint8), "RGB")


def colours_dataset(n: int = 64, *, k: int = 4, seed: int = 0, size: int = 56, noise: int = 16) -> list[dict]:
    """``n`` samples of the colours task, the answers cycling through the K colours (so every
    colour is equally frequent); deterministic in ``seed``. Columns: image, prompt, answer."""
    names = colour_names(k)
    rng = np.random.default_rng([seed, 7])
    return [{"image": colour_image(COLOURS[names[i % k]], size=size, noise=noise, rng=rng),
             "prompt": QUESTION, "answer": names[i % k]} for i in range(n)]


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""


def first_word_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the completion's first word is the answer (case-insensitive), else 0.0."""
    return [1.0 if first_word(c) == str(a).strip().lower() else 0.0 for c, a in zip(completions, answer)]


def answered_a_colour(prompts, completions, **kwargs) -> list[float]:
    """Diagnostic (not a default reward): 1.0 if the first word is any colour name."""
    return [1.0 if first_word(c) in COLOURS else 0.0 for c in completions]


def load_jsonl(path, *, required=("image", "prompt", "answer")) -> list[dict]:
    """Rows of a JSONL file; ``image`` paths are resolved against the file's folder and opened
    lazily by the adapter. A missing column or image file raises ValueError naming the line."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name}:{lineno}: not JSON ({exc})") from None
            missing = [c for c in required if c not in row]
            if missing:
                raise ValueError(f"{path.name}:{lineno}: missing column(s) {', '.join(missing)}")
            images = row["image"] if isinstance(row["image"], list) else [row["image"]]
            resolved = []
            for img in images:
                p = Path(img)
                p = p if p.is_absolute() else path.parent / p
                if not p.is_file():
                    raise ValueError(f"{path.name}:{lineno}: image file {img!r} not found")
                resolved.append(str(p))
            row["image"] = resolved if isinstance(row["image"], list) else resolved[0]
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows
