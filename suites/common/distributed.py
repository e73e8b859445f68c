"""Processes of a run: rank-0 logging, DistributedDataParallel set-up (torchrun or ``--multiprocessing-distributed``)
and the replica check after distributed training.

    is_main()          True outside distributed runs and on rank 0: only rank 0 logs and writes
    say(msg)           print on rank 0 (the runner's log lines: ``=> ...``)
    rank(), world()    this process's rank and the number of processes (0 and 1 without torch.distributed)
    broadcast_object   rank 0's decision on every rank
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("suites")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """True outside distributed runs and on rank 0."""
    return rank() == 0


def say(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def under_torchrun(args) -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE for env:// rendezvous)."""
    return args.dist_url == "env://" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process(cfg, local: int, nproc: int, device) -> None:
    """Join the process group: ``local`` is this process's index on the node (its device), ``nproc`` the processes
    per node. pytorch/examples' rank arithmetic: --world-size nodes, --rank the node's rank."""
    rank = cfg.rank
    if cfg.dist_url == "env://" and rank == -1:
        rank = int(os.environ.get("RANK", 0))
    if cfg.multiprocessing_distributed:
        rank = (rank * nproc + local) if rank >= 0 else local
        if cfg.dist_url == "env://":
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
    backend = cfg.dist_backend
    if backend == "nccl" and device.type != "cuda":
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method=cfg.dist_url, world_size=cfg.world_size, rank=rank)


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (evaluation runs on rank 0 only)."""
    if not initialized():
        return value
    t = torch.tensor([value if is_main() else 0.0], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t[0])


def broadcast_object(obj):
    """Rank 0's object on every rank (pickled; outside distributed runs returned as is). Every decision the ranks
    must agree on (a cache hit, the output folder, what --resume restores) is made on rank 0 and shared with this:
    a rank deciding on its own, from a file another rank may have written meanwhile, can skip a collective the others
    wait in."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if initialized():
        dist.barrier()


def state_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of each tensor of the state_dict (shape and bytes)."""
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            h = hashlib.sha256(str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out[k] = h.hexdigest()
    return out


def replica_check(model: nn.Module) -> dict:
    """After distributed training every rank must hold the same weights, scales and observer state: each rank's
    state digest (one per rank) and whether they agree; the tensors that differ are logged by name."""
    mine = state_digests(model)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    digests = [hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest() for d in gathered]
    same = len(set(digests)) == 1
    if same:
        say(f"=> all {len(digests)} ranks hold identical weights and quantizer state ({digests[0][:12]})")
    elif is_main():
        diff = [k for k in gathered[0] if any(g.get(k) != gathered[0][k] for g in gathered[1:])]
        logger.error("ranks ended with different model state in %d tensors: %s", len(diff), ", ".join(diff[:20]))
    return {"replica_digests": digests, "replicas_identical": same}
