"""Mixed-precision search: per-layer sensitivity, then the bits per layer an integer linear program picks under one
budget, written as a prepare_by_platform configuration.

    ts-qat-mixed-precision -a resnet18 --weights r18.pth --avg-bits 4 --candidates 2 4 8 --out mp/
    ts-qat-mixed-precision -a timm:vit_tiny_patch16_224 --data images/ --bops 2e9 --out mp/

-a is a torchvision model name (or torchvision:NAME / timm:NAME); --weights a float state_dict (or a checkpoint
holding one under 'state_dict'; a DDP 'module.' prefix is stripped); without it the weights are random, which only
exercises the pipeline. Calibration inputs are the images under --data (any folder tree of .jpg / .jpeg / .png;
resized, center-cropped and ImageNet-normalised) or random tensors. The loss is the cross-entropy against the
float model's own top-1 (no labels needed).

Writes to --out:
    mixed_precision.json     {"backend", "prepare_custom_config_dict": {"module_qconfig": ...}, budget, achieved}:
                             prepare_by_platform(model, cfg["backend"], cfg["prepare_custom_config_dict"])
    layers.csv               layer, params, MACs, chosen bits, sensitivity at the chosen and at the lowest bits
    bits_vs_sensitivity.png  bits per layer (bars) against sensitivity (line, log scale)
and prints the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch


def build_model(arch: str, num_classes: int):
    zoo, _, name = arch.rpartition(":")
    if zoo not in ("", "torchvision", "timm"):
        raise ValueError(f"-a must be NAME, torchvision:NAME or timm:NAME, got {arch!r}")
    if zoo in ("", "torchvision"):
        import torchvision
        if name in torchvision.models.list_models() or zoo == "torchvision":
            return torchvision.models.get_model(name, num_classes=num_classes)
    import timm
    return timm.create_model(name, num_classes=num_classes)


def load_weights(model, path: str) -> None:
    from ts_qat_pytorch.utils.utils import load_checkpoint, strip_module_prefix
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    model.load_state_dict(strip_module_prefix(sd))


def calibration_batches(data: str | None, n: int, batch_size: int, size: int) -> list[torch.Tensor]:
    if not data:
        g = torch.Generator().manual_seed(0)
        return [torch.randn(batch_size, 3, size, size, generator=g) for _ in range(n)]
    from PIL import Image
    from torchvision import transforms
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not files:
        raise ValueError(f"--data {data}: no .jpg / .jpeg / .png files under it")
    tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    images = [tf(Image.open(f).convert("RGB")) for f in files[: n * batch_size]]
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("-a", "--arch", required=True, help="torchvision model name, or torchvision:NAME / timm:NAME")
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--weights", help="float state_dict (default: random weights)")
    g = ap.add_argument_group("data")
    g.add_argument("--data", help="folder of images (default: random tensors)")
    g.add_argument("--batches", type=int, default=4)
    g.add_argument("-b", "--batch-size", type=int, default=8)
    g.add_argument("--image-size", type=int, default=224)
    g = ap.add_argument_group("search")
    g.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 8], help="weight bit widths (2..8)")
    g.add_argument("--act-candidates", type=int, nargs="*", default=[],
                   help="activation bit widths to search too (default: the model-wide 8 bits)")
    g.add_argument("--method", choices=["hessian", "loss"], default="hessian")
    g.add_argument("--n-samples", type=int, default=16, help="Hutchinson vectors per batch (hessian)")
    budget = g.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-bits", type=float, help="parameter-weighted average weight bits")
    budget.add_argument("--size-kib", type=float, help="quantized weights, KiB")
    budget.add_argument("--bops", type=float, help="bit operations per sample (MACs x weight bits x act. bits)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ts_qat_pytorch.mix_precision import allocate_bits, budget_range, layer_costs, layer_sensitivity, report
    from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
    torch.manual_seed(a.seed)
    try:
        model = build_model(a.arch, a.num_classes)
        if a.weights:
            load_weights(model, a.weights)
        else:
            logging.warning("no --weights: random weights, the result only exercises the pipeline")
        model.eval()
        batches = calibration_batches(a.data, a.batches, a.batch_size, a.image_size)
        q = prepare_by_platform(model, "Experimental")
        budget = ({"avg_bits": a.avg_bits} if a.avg_bits is not None else
                  {"size_bits": a.size_kib * 8192} if a.size_kib is not None else {"bops": a.bops})
        costs = layer_costs(q, batches[0])
        lo, hi = budget_range(costs, budget, a.candidates, a.act_candidates or [8])
        if next(iter(budget.values())) < lo:  # refuse before the (long) sensitivity pass
            raise ValueError(f"budget {budget} cannot be met with bits {a.candidates}: the candidates reach {lo:g} "
                             f"at the least and {hi:g} at the most")
        sens = layer_sensitivity(q, batches, a.candidates, a.method, n_samples=a.n_samples,
                                 act_candidates=a.act_candidates)
        alloc = allocate_bits(sens, costs, budget)
        prepare_by_platform(model, alloc.backend, alloc.prepare_custom_config_dict())  # the result prepares
        report.write_outputs(a.out, alloc, sens)
    except ImportError as e:  # the model zoo, PIL for --data, the LP solver, matplotlib for the plot
        print(f"error: {e} (pip install 'ts-qat-pytorch[mixed-precision,imagenet]' installs what this tool uses)",
              file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table(alloc))
    print(f"wrote {os.path.join(a.out, 'mixed_precision.json')}, layers.csv and bits_vs_sensitivity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
