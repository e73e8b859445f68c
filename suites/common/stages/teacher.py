"""Stage 4 of the pipeline: the distillation teacher (where it comes from, ``cfg.teacher``, was decided when the
config was resolved: --teacher-path, a copy of the float model, or the zoo's --teacher-arch), checked against the
student's outputs on the example input."""
from __future__ import annotations

import copy

import torch
from torch import nn

from suites.common.checkpoints import load_float_weights
from suites.common.stages.float_model import layout
from suites.common.suite import SuiteError
from suites.common.training import on_device


def build_teacher(run, suite, student_float: nn.Module) -> nn.Module | None:
    cfg = run.config
    source = cfg.teacher
    if not cfg.distill_method or source is None:
        return None
    if source == "float":
        teacher, arch = copy.deepcopy(student_float), cfg.arch
    else:
        arch = cfg.teacher_arch
        teacher = suite.build_model(cfg, arch, pretrained=source == "zoo")
        if source == "path":
            load_float_weights(teacher, cfg.teacher_path, "--teacher-path", cfg.num_classes)
    teacher = teacher.to(run.device, memory_format=layout(suite)).eval()  # forward only: the faster layout
    x = on_device(run.data.example, run.device)
    was_training = student_float.training
    with torch.no_grad():
        out, want = teacher(*x), student_float.eval()(*x)
    student_float.train(was_training)
    shapes = [tuple(t.shape[1:]) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    wanted = [tuple(t.shape[1:]) for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if shapes != wanted:  # outputs may be tensors, tuples or dicts (segmentation: {"out": ...})
        out = next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        nc = cfg.num_classes
        if nc:
            raise SuiteError(f"teacher {arch} predicts {out.shape[-1]} classes but -nc/--num-classes is {nc}; give "
                             f"--teacher-path with a {nc}-class teacher")
        raise SuiteError(f"teacher {arch} outputs {shapes} per example, the student {wanted}; give --teacher-path "
                         "with a teacher of the student's outputs")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return run.stage_end("teacher", teacher)
