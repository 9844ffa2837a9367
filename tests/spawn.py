"""Run a test function on several CPU processes joined by a gloo process group (or one GPU per
process with NCCL), collecting every rank's traceback."""

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, failures, comm, target, args):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if comm == "nccl":
            torch.cuda.set_device(rank)
            torch.set_default_device(f"cuda:{rank}")
        dist.init_process_group(comm, rank=rank, world_size=world)
        torch.set_num_threads(1)
        target(rank, world, *args)
        dist.destroy_process_group()
    except BaseException:
        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def run_ranks(target, world, *args, comm="gloo", timeout=240):
    """target(rank, world, *args) on `world` spawned processes (target must be a module-level
    function); raises AssertionError with every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, failures, comm, target, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
