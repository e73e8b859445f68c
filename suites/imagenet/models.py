"""Models of the ImageNet suite: zoo lookup, class heads, float weights, the teacher, QAT preparation."""
from __future__ import annotations

import copy
import difflib
import logging

import torch
import torch.nn as nn
import torch.utils.data

from suites.imagenet.cli import SuiteError

logger = logging.getLogger("imagenet")


def list_archs(zoo: str) -> list[str]:
    if zoo == "timm":
        import timm
        return list(timm.list_models())
    import torchvision.models as models
    return sorted(models.list_models(module=models))


def check_arch(arch: str, zoo: str, what: str = "--arch") -> None:
    names = list_archs(zoo)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see the {zoo} model list"
        raise SuiteError(f"unknown {what} '{arch}' for --model-zoo {zoo}{hint}")


def create_model(arch: str, zoo: str, num_classes: int, pretrained: bool) -> nn.Module:
    if zoo == "timm":
        import timm
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    import torchvision.models as models
    if arch == "mobilenet_v2" and pretrained:
        from suites.common.assets import install_torchvision_weights
        install_torchvision_weights()
    weights = None
    if pretrained:  # mobilenet_v2: the V1 file is the one shipped offline (suites.common.assets)
        weights = "IMAGENET1K_V1" if arch == "mobilenet_v2" else "DEFAULT"
    model = models.get_model(arch, weights=weights)
    if num_classes != _num_outputs(model):
        replace_head(model, num_classes)
    return model


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    for attr in ("fc", "classifier", "head", "heads"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Linear):
            return model, attr, m
        if isinstance(m, nn.Sequential):
            for i in reversed(range(len(m))):
                if isinstance(m[i], nn.Linear):
                    return m, str(i), m[i]
    return None


def _num_outputs(model: nn.Module) -> int | None:
    h = _head(model)
    return h[2].out_features if h else None


def replace_head(model: nn.Module, num_classes: int) -> None:
    h = _head(model)
    if h is None:
        raise SuiteError(f"cannot find the classifier of {type(model).__name__} to resize it to {num_classes} "
                         "classes")
    parent, attr, lin = h
    new = nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None)
    if isinstance(parent, nn.Sequential):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def read_checkpoint(path: str, what: str):
    """The checkpoint as saved (torch.load(weights_only=True) through the core's load_checkpoint), or a
    SuiteError naming the flag for a missing, empty, truncated or foreign file."""
    from ts_qat_pytorch.utils.utils import load_checkpoint
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise SuiteError(f"{what}: {exc}") from exc


def read_state_dict(path: str, what: str, ckpt=None) -> dict:
    from ts_qat_pytorch.utils.utils import strip_module_prefix
    if ckpt is None:
        ckpt = read_checkpoint(path, what)
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state")
                                             for k, v in ckpt.items()):
        raise SuiteError(f"{what}: '{path}' is not a state_dict (a dict of tensors)")
    return strip_module_prefix(ckpt)


def check_shapes(model: nn.Module, sd: dict, path: str, num_classes: int, what: str, partial: bool = False) -> None:
    """Clear errors for a checkpoint that does not fit the model (number of classes named first)."""
    own = model.state_dict()
    head = _head(model)
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            if own[k].dim() >= 1 and own[k].shape[0] == num_classes and v.shape[0] != num_classes and (
                    head is None or own[k].shape[1:] == v.shape[1:]):
                raise SuiteError(f"{what} '{path}' has {v.shape[0]} classes but -nc/--num-classes is "
                                 f"{num_classes} (tensor '{k}': {tuple(v.shape)} vs {tuple(own[k].shape)})")
            raise SuiteError(f"{what} '{path}' does not fit the model: '{k}' is {tuple(v.shape)} in the file "
                             f"and {tuple(own[k].shape)} in the model")
    if partial:
        return
    missing = [k for k in own if k not in sd and not k.endswith(("._extra_state", "num_batches_tracked"))]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise SuiteError(f"{what} '{path}' does not match the architecture: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def load_float_weights(model: nn.Module, path: str, num_classes: int, what: str) -> None:
    sd = read_state_dict(path, what)
    if any(".weight_fake_quant." in k or k.endswith("_fake_quant.scale") for k in sd):
        raise SuiteError(f"{what} '{path}' is a QAT checkpoint; resume it with --resume")
    check_shapes(model, sd, path, num_classes, what)
    model.load_state_dict(sd, strict=False)


def zoo_num_classes(arch: str, zoo: str) -> int | None:
    """Classes the zoo's pretrained weights of ``arch`` predict (1000 for ImageNet-1k), None when unknown.
    Reads the weights' metadata only: nothing is downloaded or built."""
    try:
        if zoo == "timm":
            import timm
            cfg = timm.models.get_pretrained_cfg(arch)
            return int(cfg.num_classes) if cfg is not None and cfg.num_classes else None
        import torchvision.models as models
        return len(models.get_model_weights(arch).DEFAULT.meta["categories"])
    except Exception:  # noqa: BLE001 - unknown arch / no pretrained weights: the later checks speak
        return None


def choose_teacher(args) -> str | None:
    """Where the distillation teacher comes from, decided before long work: 'float' (a copy of the float model the
    student starts from), 'path' (--teacher-path), 'zoo' (--teacher-arch with the zoo's pretrained weights) or
    None (no distillation). A zoo teacher whose pretrained head predicts another number of classes than -nc
    would get a new, random head: then the fine-tuned float model of --model-path is the teacher (as in the
    embedded default, logged), and without one it is an error."""
    if not args.distill_method or args.not_qat or args.evaluate:
        return None
    if args.teacher_path:
        return "path"
    if args.embedded:
        return "float"
    zoo_nc = zoo_num_classes(args.teacher_arch, args.model_zoo)
    if zoo_nc is None or zoo_nc == args.num_classes:
        return "zoo"
    if args.model_path:
        logger.warning("distillation teacher: the float model of --model-path '%s' (%d classes), not --teacher-arch "
                       "%s: the zoo's pretrained %s predicts %d classes and a new %d-class head would be random; give "
                       "--teacher-path for another teacher", args.model_path, args.num_classes, args.teacher_arch,
                       args.teacher_arch, zoo_nc, args.num_classes)
        return "float"
    raise SuiteError(f"--distill-method {args.distill_method} with -nc/--num-classes {args.num_classes}: the "
                     f"pretrained --teacher-arch {args.teacher_arch} predicts {zoo_nc} classes, and a new "
                     f"{args.num_classes}-class head would be random; give --teacher-path (a {args.num_classes}-class "
                     f"teacher), --model-path (fine-tuned float weights, which then teach), or --distill-method none")


def build_teacher(args, student_float: nn.Module) -> nn.Module | None:
    source = args.teacher_source if hasattr(args, "teacher_source") else choose_teacher(args)
    if not args.distill_method or source is None:
        return None
    if source == "float":
        teacher = copy.deepcopy(student_float)
    else:
        teacher = create_model(args.teacher_arch, args.model_zoo, args.num_classes,
                               pretrained=not args.teacher_path)
        if args.teacher_path:
            load_float_weights(teacher, args.teacher_path, args.num_classes, "--teacher-path")
    teacher = teacher.to(args.device, memory_format=torch.channels_last).eval()  # forward only: the faster layout
    with torch.no_grad():
        out = teacher(torch.zeros(1, 3, args.image_size, args.image_size, device=args.device))
    if out.shape[-1] != args.num_classes:
        raise SuiteError(f"teacher {args.teacher_arch} predicts {out.shape[-1]} classes but -nc/--num-classes is "
                         f"{args.num_classes}; give --teacher-path with a {args.num_classes}-class teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def prepare(model, args):
    from ts_qat_pytorch.prepare_by_platform import BackendType, prepare_by_platform
    cfg = None
    if args.backend == "Experimental":
        w, a = args.w_bit or 8, args.a_bit or 8
        cfg = {"extra_qconfig_dict": {"w_qscheme": {"bit": w}, "a_qscheme": {"bit": a}}}
        keep = 8 if getattr(args, "first_last_bit", None) is None else args.first_last_bit
        if keep and min(w, a) < keep:
            # mixed precision as in the low-bit QAT literature: the image and the logits keep 8 bits
            ends = first_last_layers(model)
            cfg["module_qconfig"] = {n: {"w_qscheme": {"bit": keep}, "a_qscheme": {"bit": keep}} for n in ends}
    return prepare_by_platform(model, BackendType(args.backend), cfg)


def first_last_layers(model: nn.Module) -> list[str]:
    """Names of the first and the last conv / linear layer, in module order (execution order for the zoos'
    classifiers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return list(dict.fromkeys([names[0], names[-1]])) if names else []
