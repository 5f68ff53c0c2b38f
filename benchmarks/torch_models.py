"""Benchmark models in plain PyTorch: the twin of ``benchmarks/models.py``'s ResNet-50, for the Zennit comparison.

``TorchResNet50`` is torchvision's ResNet-50 layout (stem conv7x7/2 + BatchNorm + ReLU + maxpool3x3/2 with
padding 1, 3-4-6-3 Bottleneck v1.5 blocks with the stride on the 3x3 convolution and a conv1x1 + BatchNorm
projection shortcut, global average pool, fully connected layer), written out here because PyPI's torchvision does
not load beside the pinned CPU torch. It computes the same function as the linen ``models.ResNet`` when loaded
with the same variables (``load_flax_variables``; kernels HWIO -> OIHW, dense (in, out) -> (out, in)).

For Zennit, every module is used exactly once and registered in forward order (Zennit hooks modules, and
``SequentialMergeBatchNorm`` pairs each BatchNorm with the conv registered right before it), activations are
``nn.ReLU`` modules, and the residual add is a module: ``sum_module()(torch.stack([out, identity], dim=-1))``.
Pass ``sum_module=zennit.layer.Sum`` so that Zennit's composites give the add their ``Norm`` rule (the
proportional split jaxlrp gives a residual ``add``); the default ``StackSum`` computes the same thing without
importing Zennit.

``TorchVGG`` is the twin of the linen ``models.VGG`` (3x3 convolutions with padding 1 and ReLU, 2x2 max pools, a
flatten, ReLU dense layers); ``load_flax_vgg_variables`` permutes the first dense kernel's rows from the linen
flatten order (h, w, c) to torch's (c, h, w). ``build_twin`` builds and loads either twin from a small spec, which is
how the Zennit worker of ``benchmarks/resnet50.py`` (also used by ``benchmarks/run.py``) is told which network to run.

Nothing here imports JAX (the Zennit side of ``benchmarks/resnet50.py`` runs in a process of its own).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

RESNET50_STAGES = (3, 4, 6, 3)
BN_EPS = 1e-5


class StackSum(nn.Module):
    """``input.sum(dim=-1)``: the same computation as ``zennit.layer.Sum``, without Zennit."""

    def forward(self, input):  # noqa: A002 - torch's naming
        return torch.sum(input, dim=-1)


class Bottleneck(nn.Module):
    """ResNet v1.5 Bottleneck: conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(x4)-BN, (+ shortcut), ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, sum_module: Callable[[], nn.Module] = StackSum):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out, eps=BN_EPS)
            )
        self.sum = sum_module()
        self.relu3 = nn.ReLU()

    def forward(self, x):
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.sum(torch.stack([out, identity], dim=-1))
        return self.relu3(out)


class TorchResNet50(nn.Module):
    """ResNet-50 (torchvision layout, v1.5 bottlenecks) for NCHW inputs; call ``.eval()`` for inference."""

    def __init__(self, stages: Sequence[int] = RESNET50_STAGES, width: int = 64, num_classes: int = 1000,
                 sum_module: Callable[[], nn.Module] = StackSum):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        self.n_stages = len(stages)
        for i, n in enumerate(stages):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1,
                                         sum_module=sum_module))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))

    def blocks(self) -> list[Bottleneck]:
        return [m for m in self.modules() if isinstance(m, Bottleneck)]


def _copy_(dst: torch.Tensor, value) -> None:
    value = torch.from_numpy(np.array(value, dtype=np.float32, copy=True, order="C"))
    if tuple(dst.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch: torch {tuple(dst.shape)} vs flax {tuple(value.shape)}")
    dst.copy_(value)


def _conv_(conv: nn.Conv2d, p: Mapping) -> None:
    _copy_(conv.weight, np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)))  # HWIO -> OIHW


def _bn_(bn: nn.BatchNorm2d, p: Mapping, s: Mapping) -> None:
    _copy_(bn.weight, p["scale"])
    _copy_(bn.bias, p["bias"])
    _copy_(bn.running_mean, s["mean"])
    _copy_(bn.running_var, s["var"])


@torch.no_grad()
def load_flax_variables(model: TorchResNet50, variables: Mapping) -> TorchResNet50:
    """Copy the linen ``models.ResNet`` variables ``{"params": ..., "batch_stats": ...}`` (NumPy or JAX arrays,
    nested dicts) into ``model``; returns it in eval mode. Every torch parameter and buffer is overwritten."""
    params, stats = variables["params"], variables["batch_stats"]
    _conv_(model.conv1, params["conv_init"])
    _bn_(model.bn1, params["bn_init"], stats["bn_init"])
    blocks = model.blocks()
    n_flax = sum(1 for k in params if k.startswith("BottleneckResNetBlock_"))
    if n_flax != len(blocks):
        raise ValueError(f"{n_flax} Flax blocks vs {len(blocks)} torch blocks")
    for n, blk in enumerate(blocks):
        p, s = params[f"BottleneckResNetBlock_{n}"], stats[f"BottleneckResNetBlock_{n}"]
        for k in range(3):
            _conv_(getattr(blk, f"conv{k + 1}"), p[f"Conv_{k}"])
            _bn_(getattr(blk, f"bn{k + 1}"), p[f"BatchNorm_{k}"], s[f"BatchNorm_{k}"])
        if blk.downsample is not None:
            _conv_(blk.downsample[0], p["conv_proj"])
            _bn_(blk.downsample[1], p["norm_proj"], s["norm_proj"])
        elif "conv_proj" in p:
            raise ValueError(f"Flax block {n} has a projection shortcut, torch block {n} has none")
    _copy_(model.fc.weight, np.asarray(params["Dense_0"]["kernel"]).T)
    _copy_(model.fc.bias, params["Dense_0"]["bias"])
    return model.eval()


# ---- VGG ---------------------------------------------------------------------------------------------------------

VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class TorchVGG(nn.Module):
    """VGG for NCHW inputs of ``size`` x ``size``: ``features`` (conv widths and "M" pools), flatten, ReLU dense
    layers ``hidden``, then the logits (the layout of ``models.VGG``; VGG-16 by default)."""

    def __init__(self, features: Sequence[int | str] = VGG16_FEATURES, hidden: Sequence[int] = (4096, 4096),
                 num_classes: int = 1000, size: int = 224, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, size
        for spec in features:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
                side //= 2
            else:
                layers += [nn.Conv2d(channels, int(spec), 3, padding=1), nn.ReLU()]
                channels = int(spec)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        dense: list[nn.Module] = []
        width = channels * side * side
        for h in hidden:
            dense += [nn.Linear(width, h), nn.ReLU()]
            width = h
        dense.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*dense)
        self.last_feature_shape = (channels, side, side)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


@torch.no_grad()
def load_flax_vgg_variables(model: TorchVGG, variables: Mapping) -> TorchVGG:
    """Copy the linen ``models.VGG`` variables ``{"params": {"Conv_i": ..., "Dense_j": ...}}`` into ``model``; returns
    it in eval mode. The first dense kernel's rows are reordered from (h, w, c) (linen flattens NHWC) to (c, h, w)."""
    params = variables["params"]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    denses = [m for m in model.classifier if isinstance(m, nn.Linear)]
    if len(convs) + len(denses) != len(params):
        raise ValueError(f"{len(params)} Flax layers vs {len(convs)} + {len(denses)} torch layers")
    for i, conv in enumerate(convs):
        _conv_(conv, params[f"Conv_{i}"])
        _copy_(conv.bias, params[f"Conv_{i}"]["bias"])
    c, h, w = model.last_feature_shape
    for j, dense in enumerate(denses):
        kernel = np.asarray(params[f"Dense_{j}"]["kernel"])
        if j == 0:  # rows (h, w, c) -> (c, h, w)
            kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
        _copy_(dense.weight, kernel.T)
        _copy_(dense.bias, params[f"Dense_{j}"]["bias"])
    return model.eval()


def build_twin(spec: Mapping, variables: Mapping, num_classes: int,
               sum_module: Callable[[], nn.Module] = StackSum) -> nn.Module:
    """The torch twin described by ``spec``, loaded with the linen ``variables``, in eval mode.

    ``spec``: ``{"model": "resnet50", "stages": [3, 4, 6, 3], "width": 64}`` (stages and width optional) or
    ``{"model": "vgg", "features": [...], "hidden": [...], "size": 224}`` (all but the name optional).
    """
    name = spec.get("model", "resnet50")
    if name == "resnet50":
        model = TorchResNet50(stages=tuple(spec.get("stages", RESNET50_STAGES)), width=int(spec.get("width", 64)),
                              num_classes=num_classes, sum_module=sum_module)
        return load_flax_variables(model, variables)
    if name == "vgg":
        model = TorchVGG(features=tuple(spec.get("features", VGG16_FEATURES)),
                         hidden=tuple(spec.get("hidden", (4096, 4096))), num_classes=num_classes,
                         size=int(spec.get("size", 224)))
        return load_flax_vgg_variables(model, variables)
    raise ValueError(f"unknown twin model {name!r} (resnet50 or vgg)")
