"""Two-process gloo runs for the data-parallel tests: ``spawn(worker, out_dir)`` calls
``worker(rank, port, out_dir)`` in each process; ``process_group(rank, port)`` joins."""
from __future__ import annotations

import contextlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args) -> None:
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


@contextlib.contextmanager
def process_group(rank: int, port: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()
