"""Run a function on several CPU processes (gloo), the way torchrun would start them."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(fn, *args, size: int = 2) -> None:
    """``fn(rank, *args)`` in ``size`` fresh processes with torchrun's environment (one thread
    each); ``fn`` enters ``kdcnet.distributed.session`` itself. Raises if a process fails."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read when the children import torch
    try:
        mp.start_processes(_entry, args=(size, free_port(), fn, args), nprocs=size, start_method="spawn",
                           daemon=True)
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
