"""The suite's hook for tools/analyze_suite.py: the trained QAT model, a few batches, and the suite's metric.

    q, batches, evaluate = load("checkpoint", val_images=2000)
"""
from __future__ import annotations

import torch

from suites.imagenet.cli import build_parser, resolve_args
from suites.imagenet.engine import loader, make_datasets
from suites.imagenet.models import create_model, prepare
from suites.imagenet.stages import checkpoint_paths
from ts_qat_pytorch.utils.utils import load_qat_checkpoint


def load(output_dir: str = "checkpoint", val_images: int = 2000, extra_args: tuple[str, ...] = ()):
    args = resolve_args(build_parser().parse_args(
        ["--output-dir", output_dir, "--val-images", str(val_images), *extra_args]))
    ckpt = checkpoint_paths(args)["ckpt"]
    model = create_model(args.arch, args.model_zoo, args.num_classes, pretrained=False)
    q = prepare(model, args)
    load_qat_checkpoint(ckpt, q)
    q.eval()
    _, val, _ = make_datasets(args)
    val_loader = loader(val, args.batch_size, 0)
    batches = [x for x, _ in val_loader]

    @torch.no_grad()
    def evaluate(m) -> float:
        """top-1 (%) on the held-out slice."""
        correct = total = 0
        for x, y in val_loader:
            correct += int((m(x).argmax(1) == y).sum())
            total += len(y)
        return 100.0 * correct / total

    return q, batches, evaluate


def deploy_pair(output_dir: str = "checkpoint"):
    """(float model with the trained weights, the exported int8 ONNX path, an input batch of its size)."""
    import onnx
    args = resolve_args(build_parser().parse_args(["--output-dir", output_dir]))
    paths = checkpoint_paths(args)
    model = create_model(args.arch, args.model_zoo, args.num_classes, pretrained=False)
    model.load_state_dict(torch.load(paths["float"], map_location="cpu", weights_only=True))
    dims = onnx.load(paths["onnx"]).graph.input[0].type.tensor_type.shape.dim
    x = torch.randn(*[d.dim_value for d in dims])
    return model.eval(), paths["onnx"], x
