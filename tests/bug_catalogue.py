"""The catalogue of GRPO bugs that real trainers shipped (issue 28), and the check that flags each.

One entry per bug (or per form of a bug, when the harness catches one form and not another).
Each caught entry names the check that flags it and the test of ``tests/test_bug_catalogue.py``
that shows it: the broken variant, written here from the thread's description (no code carried
over), fails the check, and the correct code passes it. An entry the harness cannot catch says
why and has no test (a test that cannot fail would prove nothing).

``kind`` says what the check compares against:

- ``oracle``: an independent float64 computation of the same quantity (``reference/``, a naive
  formula, a closed form);
- ``property``: a property every correct implementation has (the kit's rows, a contract guard,
  an invariance);
- ``knob changes the loss``: a setting must reach the loss and change it;
- ``not caught``: no check of the harness fails on it (``note`` says why).

To add a bug: append a :class:`Bug` here, write its broken variant and its demonstration in
``tests/test_bug_catalogue.py`` (a function registered in ``DEMOS`` under the same ``key``), and
run ``pytest tests/test_bug_catalogue.py``. The report (``reports/verify.md``) lists every entry
with the outcome of its test in that run.

Not a test module (no ``test_`` prefix); imports nothing but the standard library, so that the
report plugin can read it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("oracle", "property", "knob changes the loss", "not caught")
LEVELS = ("kit", "loop", "adapter")
TEST_MODULE = "tests/test_bug_catalogue.py"
TEST_NAME = "test_bug_is_caught"


@dataclass(frozen=True)
class Bug:
    key: str
    """Short id; the parameter of the catalogue's test (``test_bug_is_caught[key]``)."""
    reference: str
    """The project and the thread (issue, pull request or commit), as the field names it."""
    thread: str
    """``owner/repo#number`` (or ``@commit``), without a URL."""
    source: str
    """How the variant was written: from the thread (read), or from the issue's summary."""
    bug_class: str
    level: str
    """Where the bug lives: ``kit`` (an estimator or a loss), ``loop`` (a piece of the trainer
    injected into the real ``GRPOTrainer``), ``adapter`` (what an adapter or an engine hands
    the loop)."""
    check: str
    """The check that flags it: a kit row, a test, a preflight row, a contract guard."""
    kind: str
    note: str = ""

    @property
    def caught(self) -> bool:
        return self.kind != "not caught"

    @property
    def test(self) -> str | None:
        """The node id of the test that shows the catch (None when not caught)."""
        return f"{TEST_MODULE}::{TEST_NAME}[{self.key}]" if self.caught else None

    def as_dict(self) -> dict:
        return {**asdict(self), "caught": self.caught, "test": self.test}


READ = "read the thread"
SUMMARY = "from the issue's summary (thread not found in the search index)"

CATALOGUE: tuple[Bug, ...] = (
    Bug("trl-3992", "TRL #3992", "huggingface/trl#3992",
        "read the report it answers (huggingface/trl#3991); the PR text was not found",
        "scale knob branches inverted: the default 'group' did not divide by the std, "
        "'none' and 'batch' divided by the group std",
        "kit", "kit advantage rows `unit_scale` / `affine_invariance` (claim std_scaled) for "
        "'group' and 'none'; the float64 oracle `reference.grpo_math.group_advantages` for 'batch'",
        "property",
        "the kit measures whether an advantage is std-scaled; 'batch' is compared with the oracle"),
    Bug("trl-4db63af", "TRL commit 4db63af", "huggingface/trl@4db63af", SUMMARY,
        "a (B,) sequence advantage broadcast against (B, T) along T (no unsqueeze(1))",
        "kit", "kit loss row `row_equivariance`", "property",
        "runs only when B == T; the kit's square batch is where it shows"),
    Bug("trl-6439", "TRL #6439", "huggingface/trl#6439",
        "read the PR and its issue (huggingface/trl#6369)",
        "token-mean normaliser counted tokens the loss masks out (truncated completions)",
        "loop", "first-update gradient against the float64 oracle `reference.grpo_math.grpo_loss` "
        "(new: `test_bug_is_caught[trl-6439]`)",
        "oracle",
        "a truncation-masking adapter and a trainer dividing by the count taken before the "
        "masking: gradient 0.55 of the right one here"),
    Bug("trl-6024", "TRL #6024 (issue #5619)", "huggingface/trl#6024", READ,
        "token normaliser counted over the generation batch while the step covers part of it "
        "(off by the ratio of the two)",
        "loop", "first-update gradient against the float64 oracle `reference.grpo_math.grpo_loss`, "
        "per minibatch", "oracle",
        "in this loop: the count of the whole rollout used for each of 2 minibatches (gradients "
        "0.67 and 0.33 of the right ones)"),
    Bug("ms-swift-10117", "ms-swift #10117", "modelscope/ms-swift#10117",
        "read the issue and its fix (modelscope/ms-swift#10116)",
        "a loss already divided by the global token count divided again by the number of "
        "accumulation steps",
        "loop", "first-update gradient against the float64 oracle `reference.grpo_math.grpo_loss`, "
        "with 4 micro-batches", "oracle",
        "gradient 1/4 of the right one here"),
    Bug("verl-6957", "verl #6957", "verl-project/verl#6957", READ,
        "loss normalised per micro-batch and summed: gradient about K times too large",
        "loop", "first-update gradient against the float64 oracle, with 4 micro-batches", "oracle",
        "gradient 5.1 times the right one here; verl's instance was the critic's value loss: the "
        "harness has no critic, so the class is shown on the policy loss "
        "(`tests/test_micro_batches.py` keeps the averaged form, transformers' accumulation bug)"),
    Bug("areal-1273", "AReaL #1273", "areal-project/AReaL#1273", READ,
        "an extra division by the number of micro-batches (the pipeline schedule's) on a loss "
        "already normalised globally: gradient K times too small",
        "loop", "first-update gradient against the float64 oracle, with 4 micro-batches", "oracle",
        "same arithmetic as ms-swift #10117 (the same broken trainer), another cause"),
    Bug("areal-1454", "AReaL #1454", "areal-project/AReaL#1454", READ,
        "fixed-size group slices over groups of varying size (failed samples dropped)",
        "adapter", "the Rollout contract (`Rollout.validate`: N = B x G rows, group b = rows "
        "b*G..b*G+G-1); a failed sample kept as a fully masked row leaves its group's "
        "statistics to the survivors (closed form)", "property",
        "an adapter that drops a failed sample is refused before any advantage is computed"),
    Bug("areal-1454-compacted", "AReaL #1454 (compacted form)", "areal-project/AReaL#1454", READ,
        "survivors of several groups packed together and padded back to B x G rows: shapes "
        "right, groups crossing prompt boundaries",
        "adapter", "-", "not caught",
        "a Rollout carries no prompt id, so the loop cannot tell which prompt a row came from; "
        "feasible check: a per-row prompt id in Rollout, and the loop refusing a group whose "
        "rows name two prompts (a grpo_core change)"),
    Bug("areal-1346", "AReaL #1346", "areal-project/AReaL#1346", READ,
        "values at padding positions averaged into a sequence-level advantage",
        "kit", "kit loss row `padding_invariance`", "property"),
    Bug("nemo-rl-1518", "NeMo-RL #1518", "NVIDIA-NeMo/RL#1518", READ,
        "leave-one-out baseline divided by the std of the other G - 1 rewards: advantages of "
        "+-1e6 when those are equal",
        "kit", "kit advantage row `bounded_advantage` (also `tests/test_rloo.py::"
        "test_bounded_by_sqrt_g_on_near_constant_groups`)", "property",
        "variant reused: tests/wrong_estimators.py `adv_loo_std_of_others`"),
    Bug("easyr1-596", "EasyR1 #596", "hiyouga/EasyR1#596",
        "the project's existing variant (thread not found in the search index)",
        "GSPO sequence ratio (B,) broadcast along T of (B, T)",
        "kit", "kit loss row `row_equivariance`", "property",
        "variant reused: tests/wrong_estimators.py `gspo_wrong_axis`"),
    Bug("slime-2247", "slime #2247", "THUDM/slime#2247", READ,
        "dual-clip bound never passed to the loss: silently ignored",
        "loop", "the dual-clip setting changes the update (as in `tests/test_loop.py::"
        "test_dual_clip_is_a_config_option`)", "knob changes the loss"),
    Bug("slime-657", "slime #657", "THUDM/slime#657", READ,
        "tokens rejected by masked importance sampling still counted in the loss denominator",
        "loop", "the float64 oracle (`tests/test_engine_correction.py::"
        "test_masked_tokens_in_the_normaliser_are_caught`)", "oracle",
        "variant reused from tests/test_engine_correction.py"),
    Bug("openrlhf-1319", "OpenRLHF #1319", "OpenRLHF/OpenRLHF#1319", READ,
        "entropy computed from the logits before temperature scaling",
        "adapter", "the naive float64 log_softmax(logits / T) of `tests/test_logprobs.py::"
        "test_forward_matches_naive`", "oracle",
        "the broken piece is the per-token log-prob/entropy function the VLM adapter calls"),
    Bug("trl-4159", "TRL #4159", "huggingface/trl#4159", READ,
        "engine log-probs not temperature-matched: on-policy importance ratio 2.0",
        "adapter", "the VLM preflight row `engine_consistency` and the per-iteration mismatch_kl "
        "(`tests/test_vlm_engine.py::test_preflight_catches_wrong_engine_logprobs[NoTemperatureEngine]`, "
        "`test_a_broken_engine_shows_in_every_iterations_mismatch`); here: on-policy, the loop's "
        "engine mismatch (`engine_correction`'s mismatch_kl, is_ratio_*) is exactly 0", "property",
        "shown on a toy engine at temperature 0.6 through the real loop (mismatch_kl 0.029, ratios "
        "0.59..1.25 where 1 is right)"),
    Bug("nemo-rl-3297", "NeMo-RL #3297", "NVIDIA-NeMo/RL#3297", READ,
        "the first entry of the engine's log-prob dictionary recorded instead of the sampled "
        "token's", "adapter", "on-policy, the loop's engine mismatch is exactly 0 (new); on a VLM "
        "run the preflight row `engine_consistency` compares the engine's log-probs with the "
        "trainer's the same way", "property",
        "shown on a toy engine that records the top-ranked token's log-prob (mismatch_kl 0.25, "
        "ratios down to 0.15); tests/test_vlm_engine.py's broken engines are other forms "
        "(no temperature, off by one token)"),
    Bug("verl-4708", "verl #4708", "verl-project/verl#4708", READ,
        "old log-probs computed in train mode (dropout on)",
        "loop", "preflight row `deterministic_forward` (`adapters/vlm_preflight.py`, every "
        "`train vlm` run); the loop's own dropout check on its one-epoch old-log-prob shortcut",
        "property", "shown on a toy policy with dropout on its logits"),
    Bug("verl-4708-loop", "verl #4708 (loop path)", "verl-project/verl#4708", READ,
        "old log-probs recomputed by the loop (`_batch_logp`, several epochs) from a policy "
        "left in train mode with dropout",
        "loop", "the loop watches the old-log-prob recomputation for dropout and refuses it, naming "
        "the module (`grpo_core/loop.py`; before, ratios 0.62..2.27 at the first update on the toy)",
        "property"),
    Bug("verl-3741", "verl #3741", "verl-project/verl#3741", READ,
        "Dr. GRPO aggregation without the division by the number of sequences",
        "kit", "kit loss row `aggregation` (names the 'token-sum / max_len' model)", "property"),
    Bug("verl-179", "verl PR #179", "verl-project/verl#179", READ,
        "KL penalty subtracted from the loss instead of added",
        "loop", "end-to-end parity with the float64 CartPole oracle "
        "(`tests/test_cartpole_parity.py`, setting hard-freq1)", "oracle",
        "the preflight's `kl_gradient` row only checks that the KL term has a gradient, "
        "not its sign"),
    Bug("open-instruct-530", "open-instruct #530", "allenai/open-instruct#530", READ,
        "KL term computed on log-probs taken under no_grad: no gradient",
        "loop", "end-to-end parity with the float64 CartPole oracle (as the parity test's "
        "`kl_gradient_detached` mutation); the estimator alone: gradient direction by exact "
        "enumeration (`tests/test_catches_mistakes.py::test_detached_k3_is_caught`); the "
        "preflight row `kl_gradient`", "oracle"),
)
"""Every catalogued bug, in the order of issue 28's table."""


def by_key() -> dict[str, Bug]:
    return {b.key: b for b in CATALOGUE}


def summary() -> tuple[int, int]:
    """(caught, total) over the catalogue's entries."""
    return sum(b.caught for b in CATALOGUE), len(CATALOGUE)
