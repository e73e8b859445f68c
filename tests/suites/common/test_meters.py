"""suites/common/meters.py: the running-average meter, the progress lines' format and top-k accuracy."""
from __future__ import annotations

import pytest
import torch

from suites.common.meters import AverageMeter, ProgressMeter, Summary, accuracy, summary_line


def test_topk_accuracy_hand_made():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3, 0.2],    # ranking 1, 3, 4, 0, 2
                           [0.8, 0.1, 0.7, 0.0, 0.6],    # ranking 0, 2, 4, 1, 3
                           [0.2, 0.3, 0.4, 0.5, 0.6],    # ranking 4, 3, 2, 1, 0
                           [0.5, 0.4, 0.3, 0.2, 0.1]])   # ranking 0, 1, 2, 3, 4
    target = torch.tensor([1, 4, 0, 3])                  # found at rank 1, 3, 5, 4
    top1, top3, top4, top10 = accuracy(logits, target, topk=(1, 3, 4, 10))
    assert [t.shape for t in (top1, top3)] == [(1,), (1,)]
    assert (top1.item(), top3.item(), top4.item(), top10.item()) == (25.0, 50.0, 75.0, 100.0)  # k > classes: all


def test_average_meter_and_summaries():
    m = AverageMeter("Loss", ":.3f")
    m.update(2.0, n=3)
    m.update(torch.tensor(4.0))
    assert (m.val, m.sum, m.count, m.avg) == (4.0, 10.0, 4, 2.5)
    assert str(m) == "Loss 4.000 (2.500)"
    assert m.summary() == "Loss 2.500"
    assert AverageMeter("n", summary_type=Summary.COUNT).summary() == "n 0.000"
    assert AverageMeter("t", summary_type=Summary.NONE).summary() == ""
    m.reset()
    assert (m.val, m.sum, m.count, m.avg) == (0.0, 0.0, 0, 0.0)
    assert summary_line(64.35, 89.9167) == " * Acc@1 64.350 Acc@5 89.917"


@pytest.mark.parametrize("total,batch,label", [(704, 20, "[ 20/704]"), (9, 8, "[8/9]"), (10, 0, "[ 0/10]")])
def test_progress_lines(total, batch, label):
    lines = []
    t, d = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f", Summary.NONE)
    t.update(0.473)
    d.update(2.364)
    p = ProgressMeter(total, [t, d], prefix="Float: [0]", print_freq=4, printer=lines.append, use_tqdm=False)
    p.step(batch)
    assert lines == [f"Float: [0]{label} Time  0.473 ( 0.473) Data  2.364 ( 2.364)"]
    p.step(batch + 1)  # not due (unless the last batch)
    assert len(lines) == (2 if batch + 1 == total - 1 else 1)
    p.display_summary()
    assert lines[-1] == " * Time 0.473"
    ProgressMeter(total, [t], printer=lines.append, use_tqdm=False, enabled=False).step(0)
    assert lines[-1] == " * Time 0.473"
