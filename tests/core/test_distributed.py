"""QAT under torch.distributed: two gloo processes, different data, identical weights and scales after."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tests.core.helpers import prepare_and_calibrate
    from tests.core.test_prepare import Block
    torch.manual_seed(0)  # same initial model on every rank
    q = prepare_and_calibrate(Block().eval(), torch.randn(8, 3, 8, 8))
    q.train()
    initial = [p.detach().clone() for p in q.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(q)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in q.parameters()])
    start = torch.cat([p.reshape(-1) for p in initial])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"same": all(torch.equal(gathered[0], t) for t in gathered[1:]),
                    "moved": float((flat - start).abs().max())}, out)
    dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    out = str(tmp_path / "r.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    r = torch.load(out, weights_only=True)
    assert r["same"] and r["moved"] > 0  # trained, and in lockstep (weights and LSQ scales)
