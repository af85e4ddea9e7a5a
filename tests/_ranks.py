"""Run a function on W gloo ranks and collect what each returns (for tests/test_distributed*.py).

``on_ranks(fn, world, *args)`` starts ``world`` processes with ``torch.multiprocessing``
(spawn), each at one torch thread, joins them in a process group through a file store in a
temporary folder (no port to collide with another test worker), calls ``fn(rank, world,
*args)`` and returns the list of results by rank. A rank that raises fails the call with its
traceback (torch.multiprocessing stops the others); a run past ``timeout`` seconds is killed.
``fn`` must be a module-level function of an importable module (spawn pickles it by name).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path

import torch

COLLECTIVE_TIMEOUT_S = 60


def _entry(rank: int, fn, world: int, folder: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_ranks(fn, world: int, *args, timeout: float = 240) -> list:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(fn, world, folder, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks ran past {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world)]
