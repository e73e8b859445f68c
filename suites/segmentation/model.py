"""The segmentation networks: LR-ASPP (Howard et al., "Searching for MobileNetV3", as torchvision builds it for
mobilenet_v3_large) on torchvision's mobilenet_v2 with its real ImageNet weights, and torchvision's own
segmentation models (``torchvision.models.segmentation``).

Every model returns a dict ``{"out": logits}`` (and ``"aux"`` where torchvision adds one). The LR-ASPP models
return their logits at 1/8 of the input resolution: upsampling to the input size and the argmax are outside the
traced (and exported) network, in the suite's loss and metric, as yolov5's decoding is. Torchvision's models
upsample inside their forward; the suite accepts both.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# ours: name -> the stride of the low-level branch
LRASPP_ARCHS = {"lraspp_mobilenet_v2": 8, "lraspp_mobilenet_v2_s4": 4}
LOW_FEATURES = {8: 7, 4: 4}  # mobilenet_v2.features[:7]: 32 channels at stride 8; features[:4]: 24 at stride 4
DILATED_FROM = 14            # features[14:18] run at stride 16 with dilation 2 (the high-level branch, 1280 ch)


class LRASPPHead(nn.Module):
    """torchvision.models.segmentation.lraspp.LRASPPHead: the high-level branch (1x1 conv + BN + ReLU) gated by a
    sigmoid of its global average (squeeze-and-excitation style), upsampled to the low-level branch's size; one
    classifier on each branch, summed."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128,
                 up: float = 2.0):
        super().__init__()
        self.up = up
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                 nn.BatchNorm2d(inter_channels), nn.ReLU(inplace=True))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, scale_factor=self.up, mode="bilinear", align_corners=False)  # stride 16 -> the low's
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPPMobileNetV2(nn.Module):
    """mobilenet_v2's features as the backbone (output stride 16: the last stage dilated, as torchvision's
    segmentation backbones are), the LR-ASPP head; ``{"out": N x C x H/8 x W/8 logits}``."""

    def __init__(self, num_classes: int, backbone: nn.Module | None = None, low_stride: int = 8):
        super().__init__()
        import torchvision
        features = (backbone or torchvision.models.mobilenet_v2()).features
        dilate(features[DILATED_FROM:])
        self.low = features[:LOW_FEATURES[low_stride]]
        self.high = features[LOW_FEATURES[low_stride]:]
        self.classifier = LRASPPHead(self.low[-1].out_channels, self.high[-1].out_channels, num_classes,
                                     up=16 / low_stride)

    def forward(self, x: torch.Tensor) -> dict:
        low = self.low(x)
        return OrderedDict(out=self.classifier(low, self.high(low)))


def dilate(blocks: nn.Module, rate: int = 2) -> None:
    """Stride 1 and dilation ``rate`` for the 3x3 convolutions of ``blocks`` (DeepLab's output stride 16): the
    receptive field of the ImageNet weights is kept at twice the resolution."""
    for m in blocks.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            m.stride, m.dilation, m.padding = (1, 1), (rate, rate), (rate, rate)


def torchvision_archs() -> list[str]:
    import torchvision.models as models
    return sorted(models.list_models(module=models.segmentation))


def create_model(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    """``arch`` with ``num_classes`` outputs. Ours (lraspp_mobilenet_v2) with ``pretrained``: the ImageNet
    backbone (the offline asset, suites.common.assets) and a random head. Torchvision's with ``pretrained``: its
    COCO-VOC weights when ``num_classes`` is 21, else its ImageNet backbone (torchvision's weights API: needs
    the internet or its hub cache)."""
    import torchvision
    if arch in LRASPP_ARCHS:
        backbone = None
        if pretrained:
            from suites.common.assets import install_torchvision_weights
            install_torchvision_weights()
            backbone = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
        return LRASPPMobileNetV2(num_classes, backbone, LRASPP_ARCHS[arch])
    kw: dict = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if pretrained:
        kw.update(weights="DEFAULT") if num_classes == 21 else kw.update(weights_backbone="DEFAULT")
    return torchvision.models.get_model(arch, **kw)
