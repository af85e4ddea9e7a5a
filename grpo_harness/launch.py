"""``train`` under ``torchrun``: the same command, one process per rank.

``torchrun --standalone --nproc-per-node N -m grpo_harness.cli train cartpole ...`` (or ``...
train vlm ...``) starts N copies of the command; torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in each one's environment. ``grpo_harness.run`` sees
them (``launched_by_torchrun``) and runs the command on a ``World``:

- the default process group: gloo on CPU, plus nccl for CUDA tensors on a machine with CUDA
  (``cpu:gloo,cuda:nccl``: the small reductions of metrics travel on gloo), every collective
  bounded by ``--dist-timeout`` seconds, so that a rank waiting for a peer that hangs fails
  instead of waiting forever;
- on CUDA, each rank's device is ``cuda:LOCAL_RANK`` (given to ``init_process_group`` as its
  ``device_id``; ``train vlm --device cuda:N`` with another N is refused: choose GPUs with
  ``CUDA_VISIBLE_DEVICES``);
- the trainer is a ``grpo_core.distributed.DistributedGRPOTrainer`` (DDP, or FSDP2 with ``train
  vlm --fsdp``); its conventions make the run equal to one process holding every group;
- rank 0 writes: the run folder, ``config.json``, ``metrics.jsonl``, TensorBoard, the curve,
  checkpoints, and the progress lines; the other ranks print only their errors. Every rank
  reads the checkpoint to resume from ``--out`` (one machine, or a shared filesystem).

Failure: a rank that raises prints its error (a reward function's, by name) and exits non-zero;
its peers' next collective then fails (gloo and nccl notice the closed connection) or times out,
and torchrun stops the remaining ranks and exits non-zero. A rank killed by SIGKILL is the same
case. Nothing here starts or watches processes: torchrun does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import NoReturn

from .exits import EXIT_FAILED, one_line

DEFAULT_TIMEOUT_S = 1800.0
"""Default bound on one collective (``--dist-timeout``): longer than any rank's work between two
collectives (a rollout of a large model), short enough that a hung peer ends the run."""
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (its environment names a rank and a rendezvous)."""
    return all(k in os.environ for k in TORCHRUN_VARIABLES)


class World:
    """This process's place among the ranks of a torchrun launch."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch
        import torch.distributed as dist

        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        backend, kw = "gloo", {}
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            backend = "cpu:gloo,cuda:nccl"
            kw["device_id"] = torch.device("cuda", self.local_rank)  # NCCL binds this rank to its own GPU
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)

    @property
    def writer(self) -> bool:
        """The rank that writes files and progress lines."""
        return self.rank == 0

    def agree(self, value):
        """Rank 0's ``value`` on every rank (a decision that must be the same everywhere, such as
        whether to checkpoint now, taken from rank 0's clock and memory)."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block, then the others (e.g. building a file the others read)."""
        import torch.distributed as dist

        if not self.writer:
            dist.barrier()
        yield
        if self.writer:
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def vlm_fsdp_units(model) -> list:
    """What FSDP2 shards in a Qwen2-VL-family model besides the root: each vision block and
    decoder layer, and the vision tower itself (the adapter calls it outside the model's forward,
    once per prompt)."""
    inner = model.model
    return [*inner.visual.blocks, inner.visual, *inner.language_model.layers]


def run_on_world(cls, args, start=None) -> NoReturn:
    """Run the train command ``cls`` (a ``TrainingRun``) as this rank and end the process with
    its exit status (``leave``); ``start(world)``, if given, runs once the process group is up,
    before the command is built (the run module tells its folders which rank writes). A rank
    that loses a peer (its collective fails) says so in one line and exits 1: the peer prints its
    own error. Anything else that leaves the command is printed as the interpreter would print
    it (``_said``)."""
    import sys

    world = World(getattr(args, "dist_timeout", None) or DEFAULT_TIMEOUT_S)
    if start is not None:
        start(world)
    code, prog = EXIT_FAILED, "grpo-harness"
    try:
        run = cls(args)
        run.world, prog = world, run.prog
        code = run.main()
    except BaseException as e:  # noqa: BLE001 - every way out ends the rank through leave()
        code = _said(e, prog, world.rank)
    finally:
        try:
            world.close()
        except Exception as e:  # noqa: BLE001 - the rank's status stands; say why the close failed
            print(f"{prog}: rank {world.rank}: closing the process group failed ({one_line(e)})",
                  file=sys.stderr, flush=True)
        leave(code)


def _said(exc: BaseException, prog: str, rank: int) -> int:
    """Print what the interpreter would have printed for ``exc`` leaving the rank (the traceback
    through ``sys.excepthook``, which torch prefixes with the rank; ``sys.exit``'s message), or
    one line for a lost peer; the rank's exit status."""
    import sys

    import torch.distributed as dist

    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr, flush=True)
        return EXIT_FAILED
    if isinstance(exc, Exception) and (isinstance(exc, dist.DistError) or raised_in_collective(exc)):
        print(f"{prog}: rank {rank}: lost another rank ({type(exc).__name__}: {one_line(exc)}); "
              "that rank prints its own error", file=sys.stderr, flush=True)
        return EXIT_FAILED
    sys.excepthook(type(exc), exc, exc.__traceback__)
    return 128 + 2 if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED


def leave(code: int) -> NoReturn:
    """End this process now with ``code``, skipping the interpreter's finalization.

    After the last collective, gloo's worker threads can still hold that collective's work and
    release its tensors a moment later; a thread that takes the GIL while the interpreter
    finalizes makes it abort (SIGABRT, "terminate called without an active exception", a rank
    exit code of -6), even after ``destroy_process_group`` (gloo's threads outlive it). Seen here
    in 3 of 44 two-rank CartPole runs on a busy machine; torch pull request 179291 describes the
    same crash. Everything a run keeps is written and closed before this (metrics, TensorBoard,
    wandb, checkpoints, the curve); the standard streams are flushed here."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


def raised_in_collective(exc: BaseException) -> bool:
    """True when ``exc`` (or one it was raised from) came out of torch.distributed: a collective
    that failed because a peer closed its connection or timed out."""
    import torch.distributed

    root = os.path.dirname(torch.distributed.__file__) + os.sep
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(root):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False
