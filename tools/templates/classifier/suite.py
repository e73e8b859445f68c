"""The classifier suite: a torchvision classifier fine-tuned for QAT on your ImageFolder (``--data DIR``: train/ and
val/ class folders), or, without --data, on a small embedded default (Fashion-MNIST as 3-channel images) so that
every session runs at once. The pipeline is suites/common/runner.py; this file is the model, data and metric."""
import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms as T

from suites.common.meters import accuracy
from suites.common.subsets import val_subset
from suites.common.suite import Data, Suite, SuiteError

EMBEDDED = dict(arch="resnet18", num_classes=10, image_size=64, epochs=1, batch_size=32, lr=1e-4, optim="adam",
                train_images=1280, calib_batches=4, distill_method="kd", float_epochs=1, float_images=2560,
                float_lr=1e-3, val_images=1000, val_batch_size=100, print_freq=20)
GENERAL = dict(EMBEDDED, num_classes=1000, image_size=224, epochs=10, train_images=None, val_images=None,
               distill_method=None, workers=4)
SMOKE = dict(float_images=64, train_images=64, val_images=64, calib_batches=1, batch_size=16, print_freq=2)
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


class FashionImages(torch.utils.data.Dataset):
    """Fashion-MNIST items as normalised 3-channel ``size`` x ``size`` images."""

    def __init__(self, x, y, size: int):
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i].float().div(255).expand(1, 3, -1, -1)
        return (F.interpolate(img, size=self.size, mode="bilinear")[0] - MEAN) / STD, int(self.y[i])


def scores(pairs) -> dict:
    out, target = torch.cat([o.float() for o, _ in pairs]), torch.cat([t for _, t in pairs])
    top1, top5 = accuracy(out, target, topk=(1, 5))
    return {"top1": round(float(top1[0]), 3), "top5": round(float(top5[0]), 3)}


class ClassifierSuite(Suite):
    name = "classifier"
    recipes = {"embedded": EMBEDDED, "general": GENERAL}
    smoke = SMOKE
    summary = "top-1 {top1:.3f} top-5 {top5:.3f}"

    def add_arguments(self, p) -> None:
        p.add_argument("-a", "--arch", default=None, help="a torchvision classifier (resnet18)")
        p.add_argument("-nc", "--num-classes", type=int, default=None, help="classes (1000; embedded 10)")
        p.add_argument("--image-size", type=int, default=None, help="input resolution (224; embedded 64)")

    def check(self, flags) -> dict:
        if flags.arch not in torchvision.models.list_models(module=torchvision.models):
            raise SuiteError(f"unknown --arch '{flags.arch}': see torchvision.models.list_models()")
        return {"embedded_weights": False}  # no download: the embedded default trains from scratch

    def datasets(self, cfg) -> Data:
        size = cfg.image_size
        if cfg.embedded:
            from suites.common.assets import load_fashion_mnist
            fm = load_fashion_mnist()
            train, val = FashionImages(*fm["train"], size), FashionImages(*fm["test"], size)
            calib = train
        else:
            norm = [T.ToTensor(), T.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist())]
            folder = torchvision.datasets.ImageFolder
            train = folder(os.path.join(cfg.data, "train"), T.Compose([T.RandomResizedCrop(size), *norm]))
            calib = folder(os.path.join(cfg.data, "train"), T.Compose([T.Resize(size), T.CenterCrop(size), *norm]))
            val = folder(os.path.join(cfg.data, "val"), T.Compose([T.Resize(size), T.CenterCrop(size), *norm]))
        return Data(train, calib, val_subset(val, cfg.val_images, cfg.seed), name=cfg.data or "fashion-mnist",
                    example=torch.randn(1, 3, size, size), facts={"num_classes": cfg.num_classes},
                    checkpoint={"num_classes": cfg.num_classes}, cache_key={"image_size": size})

    def build_model(self, cfg, arch: str, pretrained: bool) -> nn.Module:
        model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)
        name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        if head.out_features != cfg.num_classes:  # a new head for your classes
            model.set_submodule(name, nn.Linear(head.in_features, cfg.num_classes))
        return model

    @torch.no_grad()
    def evaluate(self, model, loader, run, prefix: str) -> dict:
        return scores([(model.eval()(x.to(run.device)).cpu(), y) for x, y in loader])

    def evaluate_onnx(self, session, loader, run, prefix: str) -> dict:
        from ts_qat_pytorch.onnx.verify import run_in_batches
        batch = run.config.onnx_batch
        return scores([(torch.from_numpy(run_in_batches(session, x.numpy(), batch)[0]), y) for x, y in loader])


SUITE = ClassifierSuite()
