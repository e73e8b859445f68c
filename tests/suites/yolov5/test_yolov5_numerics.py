"""The YOLOv5 suite's numerics against hand-computed cases: CIoU, target assignment, the loss terms, NMS against a
brute-force reference, the EMA's decay, the model table's scaling rules and the precision envelope."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from suites.yolov5 import evaluate as E
from suites.yolov5 import postprocess as PP
from suites.yolov5.loss import YoloLoss, assign_targets, ciou
from suites.yolov5.models import common
from suites.yolov5.models.yolo import Model
from suites.yolov5.trainer import ModelEMA, ema_decay

torch.set_num_threads(1)


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_ciou_identical_boxes_is_one():
    b = _boxes([3.0, 4.0, 2.0, 5.0], [0.5, 0.5, 1.0, 1.0])
    assert torch.allclose(ciou(b, b.clone()), torch.ones(2, dtype=torch.float64), atol=1e-6)


def test_ciou_disjoint_boxes_is_minus_the_distance_term():
    # [0, 2] x [0, 2] and [4, 6] x [0, 2]: IoU 0, same aspect (v = 0), centres 4 apart, enclosing box 6 x 2
    got = ciou(_boxes([1.0, 1.0, 2.0, 2.0]), _boxes([5.0, 1.0, 2.0, 2.0]))
    assert got.item() == pytest.approx(-16 / 40, abs=1e-6)
    # farther apart the penalty grows toward -1
    far = ciou(_boxes([1.0, 1.0, 2.0, 2.0]), _boxes([41.0, 1.0, 2.0, 2.0]))
    assert far.item() == pytest.approx(-40 ** 2 / (42 ** 2 + 2 ** 2), abs=1e-6) and far.item() < got.item()


def test_ciou_aspect_term_and_alpha_without_gradient():
    # same centre: [0, 2] x [0, 2] inside [0, 2] x [-1, 3]: IoU 0.5, no distance term
    pred = _boxes([1.0, 1.0, 2.0, 2.0]).requires_grad_(True)
    target = _boxes([1.0, 1.0, 2.0, 4.0])
    v = 4 / math.pi ** 2 * (math.atan(2 / 4) - math.atan(2 / 2)) ** 2
    alpha = v / (1 - 0.5 + v)
    got = ciou(pred, target)
    assert got.item() == pytest.approx(0.5 - alpha * v, abs=1e-6)
    got.sum().backward()
    # the same expression with alpha a constant gives the same gradient: alpha carries none
    ref_pred = pred.detach().clone().requires_grad_(True)
    w, h = ref_pred[0, 2], ref_pred[0, 3]
    inter = torch.minimum(w, torch.tensor(2.0)) * torch.minimum(h, torch.tensor(4.0))
    iou = inter / (w * h + 8 - inter)
    v_t = 4 / math.pi ** 2 * (math.atan(2 / 4) - torch.atan(w / h)) ** 2
    (iou - alpha * v_t).backward()
    assert torch.allclose(pred.grad[0, 2:], ref_pred.grad[0, 2:], atol=1e-6)


def _cells(a) -> set:
    return {(int(gx), int(gy)) for gx, gy in zip(a.gx, a.gy)}


def test_assignment_own_cell_and_nearer_neighbours():
    anchors = torch.tensor([[2.0, 2.0], [10.0, 10.0]])  # the second is 5x the targets' size: dropped
    grid = 8
    # centre (3.25, 4.375) in grid units: near the left and the top border of cell (3, 4)
    t = torch.tensor([[0, 2, 3.25 / grid, 4.375 / grid, 2 / grid, 2 / grid]])
    a = assign_targets(t, anchors, grid, grid)
    assert len(a) == 3 and set(a.anchor.tolist()) == {0} and set(a.cls.tolist()) == {2}
    assert _cells(a) == {(3, 4), (2, 4), (3, 3)}
    offsets = {(int(gx), int(gy)): tuple(b[:2].tolist()) for gx, gy, b in zip(a.gx, a.gy, a.box)}
    assert offsets == {(3, 4): (0.25, 0.375), (2, 4): (1.25, 0.375), (3, 3): (0.25, 1.375)}
    assert torch.equal(a.box[:, 2:], torch.full((3, 2), 2.0)) and torch.equal(a.anchor_wh, torch.full((3, 2), 2.0))
    # near the right and the bottom border
    t = torch.tensor([[1, 0, 5.75 / grid, 6.625 / grid, 2 / grid, 2 / grid]])
    a = assign_targets(t, anchors, grid, grid)
    assert _cells(a) == {(5, 6), (6, 6), (5, 7)} and set(a.image.tolist()) == {1}
    assert all(-0.5 <= v <= 1.5 for v in a.box[:, :2].flatten().tolist())
    # within a cell of the image edge: no neighbour beyond it
    t = torch.tensor([[0, 0, 0.25 / grid, 0.25 / grid, 2 / grid, 2 / grid],
                      [0, 0, 7.75 / grid, 7.75 / grid, 2 / grid, 2 / grid]])
    assert _cells(assign_targets(t, anchors, grid, grid)) == {(0, 0), (7, 7)}
    # the centre of a cell: only that cell
    t = torch.tensor([[0, 0, 4.5 / grid, 4.5 / grid, 2 / grid, 2 / grid]])
    assert _cells(assign_targets(t, anchors, grid, grid)) == {(4, 4)}


def test_assignment_drops_anchors_by_side_ratio():
    anchors = torch.tensor([[2.0, 2.0], [8.0, 2.0]])
    grid = 16
    # 8 x 2 target: ratio 4 to the square anchor (not below anchor_t 4: dropped), 1 to the wide one
    t = torch.tensor([[0, 0, 8.5 / grid, 8.5 / grid, 8 / grid, 2 / grid]])
    a = assign_targets(t, anchors, grid, grid)
    assert a.anchor.tolist() == [1] and torch.equal(a.anchor_wh, torch.tensor([[8.0, 2.0]]))
    assert len(assign_targets(t, anchors, grid, grid, anchor_t=4.01)) == 2  # both kept when the threshold allows
    # a 0.4 x 0.4 target is 5x smaller than a 2 x 2 anchor: no assignment at all
    assert len(assign_targets(torch.tensor([[0, 0, 0.5, 0.5, 0.4 / grid, 0.4 / grid]]), anchors[:1], grid, grid)) == 0
    assert len(assign_targets(torch.zeros(0, 6), anchors, grid, grid)) == 0


def test_loss_terms_and_shapes():
    anchors = torch.tensor([[[2.0, 2.0]]])  # one level, one anchor
    loss = YoloLoss(anchors, nc=2, hyp={}, img_size=640)
    raw = [torch.zeros(2, 1 * 7, 8, 8, requires_grad=True)]
    t = torch.tensor([[1, 1, 4.5 / 8, 4.5 / 8, 2 / 8, 2 / 8]])
    total, items = loss(raw, t)
    assert items.shape == (3,) and not items.requires_grad
    # logits 0: xy offset 0.5 (the cell centre), wh = anchor: a perfect box, CIoU 1, box loss 0
    assert items[0].item() == pytest.approx(0.0, abs=1e-6)
    # objectness: BCE(0, target) over 2 x 8 x 8 slots, target 1 at the one assigned slot; 1 level: gains x 3
    bce0 = math.log(2)
    assert items[1].item() == pytest.approx(1.0 * 3 * 4.0 * bce0, rel=1e-5)  # balance 4.0 of the first level
    assert items[2].item() == pytest.approx(0.5 * 2 / 80 * 3 * bce0, rel=1e-5)
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)  # times the batch size
    total.backward()
    assert raw[0].grad.abs().sum() > 0


def _brute_force_nms(x: torch.Tensor, conf_thres: float, iou_thres: float, multi_label: bool = True):
    """Greedy per-class NMS written the slow way: every (box, class) candidate (or each box's best class), best
    first, kept unless a kept candidate of its class overlaps it by more than ``iou_thres``."""
    cands = []
    for row in x.tolist():
        if row[4] <= conf_thres:
            continue
        scores = [p * row[4] for p in row[5:]]
        best = max(range(len(scores)), key=scores.__getitem__)
        for c, s in enumerate(scores):
            if s > conf_thres and (multi_label or c == best):
                cx, cy, w, h = row[:4]
                cands.append((s, c, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    cands.sort(key=lambda r: -r[0])

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept = []
    for s, c, box in cands:
        if all(kc != c or iou(box, kb) <= iou_thres for _, kc, kb in kept):
            kept.append((s, c, box))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, nc = 120, 3
    x = torch.cat([torch.rand(n, 2, generator=g) * 60, torch.rand(n, 2, generator=g) * 20 + 4,
                   torch.rand(n, 1, generator=g), torch.rand(n, nc, generator=g)], 1).double()
    for conf, iou, multi_label in ((0.05, 0.5, True), (0.3, 0.3, True), (0.05, 0.5, False)):
        got = PP.nms(x[None], conf, iou, max_det=1000, multi_label=multi_label)[0]
        ref = _brute_force_nms(x, conf, iou, multi_label)
        assert len(got) == len(ref) > 0
        for row, (s, c, box) in zip(got.tolist(), ref):  # both best first
            assert row[4] == pytest.approx(s) and int(row[5]) == c and row[:4] == pytest.approx(box)
    assert PP.nms(x[None], conf_thres=0.05, iou_thres=0.5, max_det=7)[0].shape == (7, 6)
    assert PP.nms(torch.zeros(1, 4, 5 + nc), 0.1)[0].shape == (0, 6)


def test_ema_follows_the_published_decay():
    assert ema_decay(1, 0.9999, 2000) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(100000, 0.9999, 2000) == pytest.approx(0.9999)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    assert set(ema.ema.state_dict()) == set(model.state_dict()) and not ema.ema.training
    assert not any(p.requires_grad for p in ema.ema.parameters())
    expected = None
    for k in range(1, 6):
        with torch.no_grad():
            model[0].weight.fill_(float(k))
        model(torch.randn(4, 3))  # moves the BN statistics
        ema.update(model)
        w = float(k)
        d = ema_decay(k, 0.9, 2.0)
        expected = w if expected is None else d * expected + (1 - d) * w  # the first update copies the model
        assert ema.updates == k
        assert torch.allclose(ema.ema[0].weight, torch.full((2, 3), expected), atol=1e-6)
    assert int(ema.ema[1].num_batches_tracked) == 5  # integer buffers copied
    assert not torch.equal(ema.ema[1].running_mean, model[1].running_mean)  # float buffers averaged


def test_model_table_scaling_rules():
    cfg = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25, "act": "relu",
           "anchors": [[10, 13, 16, 30]],
           "backbone": [[-1, 1, "Conv", [100, 3, 2]],        # 25 -> 32: rounded up to a multiple of 8
                        [-1, 9, "C3", [64]],                  # 9 x 0.33 -> 3 bottlenecks, 16 channels
                        [-1, 3, "Conv", [64, 3, 1]],          # 3 x 0.33 -> 1: a plain Conv, no Sequential
                        [-1, 2, "Bottleneck", [64]]],         # 2 x 0.33 -> 1 (at least one)
           "head": [[[-1, -3], 1, "Concat", [1]],             # -3: row 1
                    [[-1], 1, "Detect", ["nc", "anchors"]]]}
    m = Model(cfg)
    assert m.model[0].conv.out_channels == 32 and isinstance(m.model[0].act, nn.ReLU)
    assert len(m.model[1].m) == 3 and m.model[1].cv3.conv.out_channels == 16
    assert isinstance(m.model[2], common.Conv) and isinstance(m.model[3], common.Bottleneck)
    assert m.sources[4] == [-1, 1] and m.model[5].m[0].in_channels == 32
    out = m.eval()(torch.zeros(1, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(1, 2 * 7, 16, 16)] and m.stride.tolist() == [2.0]
    # the prior biases: about 8 objects per 640 x 640 image, class probability about 0.6 / nc
    bias = m.detect.m[0].bias.view(2, 7)
    assert torch.all(bias[:, 4] < -5) and torch.all(bias[:, 5:] < 0)


def test_precision_envelope_and_area():
    curve = E.ClassCurve(conf=np.array([0.9, 0.8, 0.7]), recall=np.array([0.25, 0.25, 0.5]),
                         precision=np.array([1.0, 0.5, 2 / 3]))
    assert np.allclose(curve.envelope(), [1.0, 2 / 3, 2 / 3])
    at = curve.at_recall(np.array([0.0, 0.1, 0.375, 0.5, 0.75]))  # 0 beyond the highest recall
    assert np.allclose(at, [1.0, 1.0, 2 / 3, 2 / 3, 0.0])
    p, r = curve.at_confidence(np.array([0.95, 0.9, 0.75]))
    assert np.allclose(p, [1.0, 1.0, 7 / 12]) and np.allclose(r, [0.0, 0.25, 0.375])
