"""Datasets for the VLM adapter: the synthetic tasks (``TASKS``: colours, sequence) and a JSONL loader.

A dataset is a list of dicts with at least the columns ``image`` (a PIL image, a path, or a
list of either for several images), ``prompt`` (the question text, or a list of chat messages
whose content holds an ``{"type": "image"}`` part per image) and ``answer``; any other columns
are passed to the reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


# --- sequence: several answer words, each judged against the one before it ---------------------

SEQUENCE_TASK = """The sequence task: a multi-word answer where the plan's claims have room to act.

The image is one colour (the colours task's images); the answer is that colour and the next two
in the cycle of the K colours ("blue" -> "blue yellow red" for K = 4), 3 tokens with the tiny
model's word-level tokenizer. Each word earns 1/3: the first when it is the image's colour, each
later one when it follows the word said before it (``sequence_word_scores``), so the words must
come right in order and a wrong first word can still be continued correctly. The untrained
model says a word of the ~30 it can sample: chance is near 0, and the first thing learnt is to
answer with colour words. ``--task sequence`` puts the reward on the last token (an outcome,
as ``--reward`` does); ``--task sequence-words`` puts each word's share on its own token
(``WordCredit``: process supervision). Measured on seed 1 (400 iterations, VLM_DEFAULTS): the
rolling reward reached 0.74 (outcome) and 0.96 (per word) by iteration 200. Two earlier
designs did not learn on the tiny model (seed 0, 400-500 iterations) and were dropped: a 2 x 2 grid of
colours (the model names the overall colour four times: it does not tell the cells apart), and
"shade colour form" (the shade, learnt first, is repeated in every position).

What the plan's items should change here, and why:

- Discount. With the outcome on the last token, token t gets ``gamma**(2 - t)`` times the
  sequence's advantage: 0.995 scales the first word by 0.99, which cannot show; a discount
  cannot move credit between words, because one number scores all three. With per-word
  rewards, token t gets ``sum_{k >= t} gamma**(k - t) r~_k``: gamma = 1 credits the first word
  with the later words' rewards too (which it partly causes, as they are judged against it),
  gamma < 1 less so; this is where discounting can trade that noise for bias.
- Several epochs. A batch carries three scored decisions per completion (the colours task: one),
  so reusing it for several epochs at a learning rate tuned for them should reach the target in
  fewer iterations (generations), though not necessarily fewer seconds.
- Reference refresh. With beta > 0 and several epochs, the KL term acts within each iteration.
  Refreshed every iteration it is a trust region around the sampling policy; never refreshed it
  pulls all three word distributions back towards the random initial model, a pull that grows
  as they sharpen: a refresh should reach the target sooner and end higher at the same beta.
  With one epoch and a hard refresh every iteration the term is inert (``KLInertWarning``), as
  on the colours task.
"""

SEQUENCE_QUESTION = "Name this colour and the two colours after it."
SEQUENCE_WORDS = 3
"""The answer's length: the image's colour, then the next two in the cycle of the K colours."""


def sequence_answer(colour: str, k: int = 4, length: int = SEQUENCE_WORDS) -> str:
    """``colour`` and the colours after it in the cycle ``colour_names(k)``: for k = 4, "blue"
    -> "blue yellow red" (red, green, blue, yellow, red, ...)."""
    names = colour_names(k)
    i = names.index(colour)
    return " ".join(names[(i + j) % k] for j in range(length))


def sequence_dataset(n: int = 64, *, k: int = 4, seed: int = 0, noise: int = 16) -> list[dict]:
    """``n`` samples of the sequence task: the colours task's images (one colour, the answers
    cycling through the K colours), each answered by ``sequence_answer``; deterministic in
    ``seed``. Columns: image, prompt, answer, cycle (the K colour names in cycle order)."""
    cycle = " ".join(colour_names(k))
    return [{**row, "prompt": SEQUENCE_QUESTION, "answer": sequence_answer(row["answer"], k), "cycle": cycle}
            for row in colours_dataset(n, k=k, seed=seed, noise=noise)]


def sequence_vocabulary(k: int = 4) -> list[str]:
    """The question's words, the K colour names and the filler words."""
    words = SEQUENCE_QUESTION.replace(".", " .").lower().split()
    return list(dict.fromkeys([*words, *colour_names(k), *FILLER_WORDS]))


def _words(text: str) -> list[str]:
    return text.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()


def sequence_word_scores(said: list[str], answer: str, cycle: str) -> list[float]:
    """Each said word's share of the sequence reward, in order: the first word earns ``1/P``
    (P: the answer's length) when it is the image's colour (the answer's first word); word i
    (1 <= i < P) earns ``1/P`` when it follows word i-1 *as said* in ``cycle`` (so after a wrong
    first word, a right continuation of it still earns); words past P earn 0."""
    want, order = _words(str(answer)), _words(str(cycle))
    scores = []
    for i, w in enumerate(said):
        if i >= len(want):
            ok = False
        elif i == 0:
            ok = w == want[0]
        else:
            prev = said[i - 1]
            ok = prev in order and w == order[(order.index(prev) + 1) % len(order)]
        scores.append(1 / len(want) if ok else 0.0)
    return scores


def sequence_reward(prompts, completions, answer, cycle, **kwargs) -> list[float]:
    """The sum of ``sequence_word_scores`` over the completion's words (case-insensitive,
    punctuation dropped): 1 for the right colour and its two successors, 2/3 for a wrong colour
    followed by its own two successors, 1/3 for the right colour alone."""
    return [sum(sequence_word_scores(_words(c), a, cy)) for c, a, cy in zip(completions, answer, cycle)]


class WordCredit:
    """Process supervision for the sequence task, mixed into a VLM adapter class
    (``with_word_credit``): each word's ``sequence_word_scores`` share sits on the token that
    says it, marked in ``Rollout.scored`` (GRPO's process supervision, Shao et al. 2024, sec.
    4.1.3), instead of the whole reward on the last token. Words are read token by token: right
    for the tiny model's word-level tokenizer only. A row that says fewer words than the answer
    has its last token scored 0 (unless a word sits there), so it counts in its group. Every
    way the loop gets a rollout is covered: ``collect`` (a data-parallel rank's share too),
    ``collect_more`` and ``join_groups`` (dynamic sampling)."""

    def collect(self, *, num_groups: int, group_size: int, iteration: int, first_group: int = 0,
                total_groups: int | None = None):
        """As the adapter's ``collect`` (a data-parallel rank's share included), per-word credit."""
        rollout = super().collect(num_groups=num_groups, group_size=group_size, iteration=iteration,
                                  first_group=first_group, total_groups=total_groups)
        indices = self.prompt_indices(iteration, total_groups or num_groups)[first_group:first_group + num_groups]
        return self._word_credit(rollout, indices, group_size)

    def collect_more(self, *, num_groups: int, group_size: int, iteration: int, draw: int, again=None):
        """As the adapter's ``collect_more`` (an extra draw or a retry of dynamic sampling),
        per-word credit."""
        rollout = super().collect_more(num_groups=num_groups, group_size=group_size, iteration=iteration,
                                       draw=draw, again=again)
        return self._word_credit(rollout, rollout.inputs["items"], group_size)

    def join_groups(self, parts):
        """As the adapter's ``join_groups``, with each part's ``scored`` rows carried along
        (padding: not scored)."""
        import torch

        joined = super().join_groups(parts)
        g, t_len = joined.inputs["group_size"], joined.rewards.shape[1]
        rows = []
        for part, groups in parts:
            idx = [b * g + i for b in groups for i in range(g)]
            s = part.scored[idx]
            rows.append(torch.cat([s, s.new_zeros(len(idx), t_len - s.shape[1])], 1))
        joined.scored = torch.cat(rows)
        return joined

    def _word_credit(self, rollout, indices: list[int], group_size: int):
        """``rollout`` with each word's share on its token, the items ``indices`` (each repeated
        ``group_size`` times) judging the rows in order."""
        items = [self.dataset[i] for i in indices for _ in range(group_size)]
        ids, attn = rollout.inputs["completion_ids"], rollout.inputs["completion_attn"]
        rewards = rollout.rewards.new_zeros(rollout.rewards.shape)
        scored = rollout.mask.new_zeros(rollout.mask.shape, dtype=bool)
        for n, item in enumerate(items):
            if not bool(rollout.mask[n].any()):
                continue
            tokens = [int(t) for t in ids[n][: int(attn[n].sum())]]
            positions, said = [], []
            for j, tok in enumerate(tokens):
                for w in _words(self.tokenizer.decode([tok], skip_special_tokens=True)):
                    positions.append(j)
                    said.append(w)
            for j, r in zip(positions, sequence_word_scores(said, item["answer"], item["cycle"])):
                rewards[n, j] += r
                scored[n, j] = True
            if len(said) < len(_words(item["answer"])):
                scored[n, len(tokens) - 1] = True
        rollout.rewards, rollout.scored = rewards, scored
        return rollout


def with_word_credit(cls: type) -> type:
    """``cls`` (a VLM adapter class) with ``WordCredit`` mixed in."""
    return type(f"WordCredit{cls.__name__}", (WordCredit, cls), {})


# --- the task registry (``train vlm --task NAME``) -------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A built-in synthetic task: what ``train vlm --task NAME`` trains on."""

    dataset: Callable[..., list[dict]]
    """``dataset(n, k=K, seed=S)`` -> rows (image, prompt, answer)."""
    vocabulary: Callable[[int], list[str]]
    """``vocabulary(K)`` -> every word the tiny model's tokenizer needs."""
    reward: Callable[..., list[float]]
    """The default reward function (TRL's calling convention)."""
    max_new_tokens: int
    """Default completion length cap (colours: the word and the EOS; sequence: its 3 words)."""
    adapter: Callable[[type], type] | None = None
    """Wraps the VLM adapter class (``with_word_credit``); None: the reward is an outcome on the
    last token, as for any ``--reward``."""


TASKS: dict[str, Task] = {
    "colours": Task(colours_dataset, colours_vocabulary, first_word_reward, 2),
    "sequence": Task(sequence_dataset, sequence_vocabulary, sequence_reward, SEQUENCE_WORDS),
    "sequence-words": Task(sequence_dataset, sequence_vocabulary, sequence_reward, SEQUENCE_WORDS,
                           adapter=with_word_credit),
}
"""colours: one-word answers, the quick smoke. sequence: three words, each judged against the
one before it, the reward an outcome on the last token; sequence-words: the same task with each
word's share of the reward on its own token (process supervision). See ``SEQUENCE_TASK``."""


def task_adapter(task: dict, cls: type) -> type:
    """The adapter class of a ``train vlm`` run of ``task`` (its task settings): ``cls``, or the
    built-in task's wrapper of it; a run scored by the user's ``--reward`` gets plain ``cls``."""
    spec = TASKS.get(task["name"])
    if spec is None or spec.adapter is None or task.get("reward"):
        return cls
    return spec.adapter(cls)
