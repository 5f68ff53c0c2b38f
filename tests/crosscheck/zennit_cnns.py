"""Real CNN twins for the Zennit cross-check: VGG-16-BN and ResNet-50 (Bottleneck v1.5), torch and Flax linen.

Builds on :mod:`tests.crosscheck.zennit_twins` (torchvision stand-in, Zennit import, seeding, layouts, the Zennit
driver); this module adds only what real architectures need:

- BatchNorm. The torch models are in eval mode with randomised running statistics and affine parameters, chosen
  so that some BatchNorm scales ``gamma / sqrt(var + eps)`` are negative (see :func:`randomise_batchnorm_`). Zennit
  needs a canonizer to merge each BatchNorm into the convolution before it; the Flax twins keep their
  ``nn.BatchNorm(use_running_average=True)`` and are handed to jaxlrp unmodified (jaxlrp folds the BatchNorm into
  the convolution's epilogue by itself).
- Residual adds. Zennit has no canonizer for a ResNet written in plain torch, so the torch Bottleneck does its add
  through a ``zennit.layer.Sum`` module (``Sum()(torch.stack([out, identity], dim=-1))``): Zennit's composites give
  ``Sum`` the ``Norm`` rule, as jaxlrp's base map gives a residual ``add``. The BatchNorms are merged by
  ``zennit.canonizers.NamedMergeBatchNorm`` with every (conv, BatchNorm) pair listed explicitly, the projection
  shortcut included (:func:`resnet_merge_pairs`).
- The Flax ResNet follows Flax's ImageNet example (``flax/examples/imagenet/models.py``: ``BottleneckResNetBlock``
  with ``conv_proj``/``norm_proj``, ``nn.relu(residual + y)``, ``jnp.mean`` pooling), with explicit symmetric
  paddings where torch's ``padding=1`` differs from ``'SAME'`` (stride-2 3x3 conv, stem max pool).

Zennit (LGPL) is only *used* here, through its public API. Nothing of its code is copied.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import zennit_twins as zt

INPUT_SHAPE = (2, 3, 64, 64)  # NCHW on the torch side; the JAX side takes NHWC
NUM_CLASSES = zt.NUM_CLASSES
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's and flax.linen.BatchNorm's default

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG_HIDDEN = 256  # classifier: flatten(512 x 2 x 2) -> 256 -> relu -> NUM_CLASSES
RESNET50_STAGES = (3, 4, 6, 3)
RESNET_WIDTH = 64  # torchvision's base width: the full ResNet-50 (Bottleneck v1.5), 23.5 M parameters

PRESETS = ("EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat")
MODELS = ("vgg16_bn", "resnet50")


# --------------------------------------------------------------------------------------------------------------
# torch models
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch_classes():
    """The torch model classes (built lazily: the Bottleneck needs ``zennit.layer.Sum``)."""
    import torch

    zen = zt.import_zennit()
    nn = torch.nn

    class TorchVGG16BN(nn.Module):
        """torchvision's ``vgg16_bn`` features (conv3x3 with bias -> BN -> ReLU, five max pools) and a small
        classifier (flatten at 2 x 2 for a 64 x 64 input -> Linear -> ReLU -> Linear)."""

        def __init__(self, cfg=VGG16_CFG, hidden=VGG_HIDDEN, num_classes=NUM_CLASSES, spatial=2):
            super().__init__()
            layers, c_in = [], 3
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v, eps=BN_EPS), nn.ReLU()]
                    c_in = v
            self.features = nn.Sequential(*layers)
            self.flatten = nn.Flatten()
            self.classifier = nn.Sequential(
                nn.Linear(c_in * spatial * spatial, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )

        def forward(self, x):
            return self.classifier(self.flatten(self.features(x)))

    class TorchBottleneck(nn.Module):
        """ResNet v1.5 Bottleneck (stride on the 3x3 conv); the residual add goes through ``zennit.layer.Sum``.

        Every module is used once and registered in forward order (Zennit hooks modules, not calls).
        """

        expansion = 4

        def __init__(self, inplanes, planes, stride=1):
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
            self.sum = zen.layer.Sum()
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
        """torchvision's ResNet-50 layout (stem conv7x7/2 + BN + ReLU + maxpool3x3/2, stages of Bottlenecks,
        global average pool, fc) with base width ``width``."""

        def __init__(self, stages=RESNET50_STAGES, width=RESNET_WIDTH, num_classes=NUM_CLASSES):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            inplanes = width
            for i, n in enumerate(stages):
                planes = width * 2**i
                blocks = []
                for j in range(n):
                    blocks.append(TorchBottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                    inplanes = planes * TorchBottleneck.expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.n_stages = len(stages)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(inplanes, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(self.n_stages):
                x = getattr(self, f"layer{i + 1}")(x)
            return self.fc(self.flatten(self.avgpool(x)))

    return TorchVGG16BN, TorchBottleneck, TorchResNet50


def _he_normal_(module, gen) -> None:
    import torch

    with torch.no_grad():
        w = module.weight
        w.copy_(torch.randn(w.shape, generator=gen) * (2.0 / w[0].numel()) ** 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)


def randomise_batchnorm_(model, gen, calibration: np.ndarray, negative_fraction: float = 0.25) -> None:
    """Random BatchNorm affine parameters and running statistics, then eval mode.

    ``weight`` (gamma) is ``+-U(0.5, 1.5)`` with about ``negative_fraction`` of each layer's channels negative (so
    those BatchNorm scales ``gamma / sqrt(var + eps)`` are negative), ``bias`` (beta) ``N(0, 0.2)``. The running
    statistics are those of one train-mode pass over ``calibration`` (so activations stay O(1) through 50 layers
    and ReLUs are neither all on nor all off), then perturbed: mean ``+ 0.1 N(0, var)``, var ``x U(0.5, 2)``.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            sign = torch.where(torch.rand(c, generator=gen) < negative_fraction, -1.0, 1.0)
            sign[0] = -1.0  # at least one negative scale in every BatchNorm
            bn.weight.copy_(sign * (0.5 + torch.rand(c, generator=gen)))
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass sets the batch statistics
        model.train()
        model(torch.from_numpy(calibration))
        model.eval()
        for bn in bns:
            c = bn.num_features
            var = bn.running_var.clone()
            bn.running_mean.add_(0.1 * torch.randn(c, generator=gen) * var.sqrt())
            bn.running_var.mul_(0.5 + 1.5 * torch.rand(c, generator=gen))
            bn.momentum = 0.1


def bn_scales(model) -> np.ndarray:
    """All BatchNorm scales ``gamma / sqrt(var + eps)`` of a torch model, concatenated."""
    import torch

    return np.concatenate([
        (m.weight / (m.running_var + m.eps).sqrt()).detach().numpy()
        for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ])


def make_torch_model(kind: str, seed: int):
    """Seeded torch model in eval mode: ``"vgg16_bn"`` or ``"resnet50"``."""
    import torch

    vgg_cls, _, resnet_cls = _torch_classes()
    model = {"vgg16_bn": vgg_cls, "resnet50": resnet_cls}[kind]()  # its default init is all overwritten below
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            _he_normal_(m, gen)
    calibration = zt.make_input((8, *INPUT_SHAPE[1:]), seed + 1000)
    randomise_batchnorm_(model, gen, calibration)
    return model


# --------------------------------------------------------------------------------------------------------------
# Zennit canonizers (built from Zennit's public pieces)
# --------------------------------------------------------------------------------------------------------------

def resnet_merge_pairs(model) -> list[tuple[tuple[str, ...], str]]:
    """Every (conv, BatchNorm) pair of :class:`TorchResNet50` by module name, projection shortcuts included."""
    _, bottleneck_cls, _ = _torch_classes()
    pairs = [(("conv1",), "bn1")]
    for name, m in model.named_modules():
        if isinstance(m, bottleneck_cls):
            pairs += [((f"{name}.conv{k}",), f"{name}.bn{k}") for k in (1, 2, 3)]
            if m.downsample is not None:
                pairs.append(((f"{name}.downsample.0",), f"{name}.downsample.1"))
    return pairs


def zennit_canonizers(kind: str, model) -> list:
    """Fresh canonizer instances for one Zennit composite.

    VGG: ``SequentialMergeBatchNorm`` (each BN follows its conv in module order). ResNet: ``NamedMergeBatchNorm``
    with the explicit pairs of :func:`resnet_merge_pairs`; the residual ``Sum`` modules are part of the model.
    """
    zt.import_zennit()  # the torchvision stand-in first
    import zennit.canonizers

    if kind == "vgg16_bn":
        return [zennit.canonizers.SequentialMergeBatchNorm()]
    if kind == "resnet50":
        return [zennit.canonizers.NamedMergeBatchNorm(resnet_merge_pairs(model))]
    raise ValueError(kind)


def zennit_composite(preset: str, x_torch: np.ndarray, canonizers: list | None):
    """Zennit's preset composite ``preset`` with ``canonizers`` (box bounds as in :mod:`zennit_twins`)."""
    import torch

    zen = zt.import_zennit()
    kwargs = {}
    if preset == "EpsilonGammaBox":
        dtype = torch.from_numpy(np.asarray(x_torch[:0])).dtype  # the bounds in the input's precision
        kwargs = dict(low=torch.full(x_torch.shape, zt.BOX_LOW, dtype=dtype),
                      high=torch.full(x_torch.shape, zt.BOX_HIGH, dtype=dtype))
    return getattr(zen.composites, preset)(canonizers=canonizers, **kwargs)


def jaxlrp_composite(preset: str):
    """jaxlrp's preset of the same name and parameters (the factories of :data:`zennit_twins.CASES`)."""
    return zt.CASES_BY_NAME[preset].jaxlrp()


# --------------------------------------------------------------------------------------------------------------
# Flax linen twins
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _flax_classes():
    from functools import partial
    from typing import Any, Callable, Sequence

    import flax.linen as nn
    import jax.numpy as jnp

    ModuleDef = Any

    class FlaxVGG16BN(nn.Module):
        """Twin of ``TorchVGG16BN``: NHWC input; flattens in torch's NCHW order."""

        cfg: Sequence[Any] = VGG16_CFG
        hidden: int = VGG_HIDDEN
        num_classes: int = NUM_CLASSES

        @nn.compact
        def __call__(self, x):
            for v in self.cfg:
                if v == "M":
                    x = nn.max_pool(x, (2, 2), strides=(2, 2))
                else:
                    x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)))(x)
                    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS)(x)
                    x = nn.relu(x)
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.nn.Flatten on NCHW
            x = nn.relu(nn.Dense(self.hidden)(x))
            return nn.Dense(self.num_classes)(x)

    # The ResNet follows flax/examples/imagenet/models.py (BottleneckResNetBlock, ResNet), inference only.
    class BottleneckResNetBlock(nn.Module):
        filters: int
        conv: ModuleDef
        norm: ModuleDef
        act: Callable
        strides: tuple[int, int] = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            y = self.conv(self.filters, (1, 1))(x)
            y = self.norm()(y)
            y = self.act(y)
            y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(y)  # torch's padding=1
            y = self.norm()(y)
            y = self.act(y)
            y = self.conv(self.filters * 4, (1, 1))(y)
            y = self.norm()(y)
            if residual.shape != y.shape:
                residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
                residual = self.norm(name="norm_proj")(residual)
            return self.act(residual + y)

    class ResNet(nn.Module):
        stage_sizes: Sequence[int] = RESNET50_STAGES
        num_filters: int = RESNET_WIDTH
        num_classes: int = NUM_CLASSES
        act: Callable = nn.relu

        @nn.compact
        def __call__(self, x):
            conv = partial(nn.Conv, use_bias=False, padding="VALID")
            norm = partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=BN_EPS)
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
            x = norm(name="bn_init")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # torch's padding=1
            for i, block_size in enumerate(self.stage_sizes):
                for j in range(block_size):
                    strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                    x = BottleneckResNetBlock(
                        self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
                    )(x)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes)(x)

    return FlaxVGG16BN, ResNet


def flax_model(kind: str):
    vgg_cls, resnet_cls = _flax_classes()
    return {"vgg16_bn": vgg_cls, "resnet50": resnet_cls}[kind]()


def _conv(m) -> dict:
    import jax.numpy as jnp

    p = {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0))}  # OIHW -> HWIO
    if m.bias is not None:
        p["bias"] = jnp.asarray(m.bias.detach().numpy())
    return p


def _dense(m) -> dict:
    import jax.numpy as jnp

    return {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}


def _bn(m) -> tuple[dict, dict]:
    import jax.numpy as jnp

    def a(t):
        return jnp.asarray(t.detach().numpy())

    return {"scale": a(m.weight), "bias": a(m.bias)}, {"mean": a(m.running_mean), "var": a(m.running_var)}


def flax_variables(kind: str, model) -> dict:
    """``{"params": ..., "batch_stats": ...}`` for the Flax twin of a torch model from :func:`make_torch_model`."""
    import torch

    params, stats = {}, {}

    def put(name_conv, conv, name_bn, bn):
        params[name_conv] = _conv(conv)
        params[name_bn], stats[name_bn] = _bn(bn)

    if kind == "vgg16_bn":
        convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
        bns = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
        for i, (c, b) in enumerate(zip(convs, bns, strict=True)):
            put(f"Conv_{i}", c, f"BatchNorm_{i}", b)
        linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
        for i, lin in enumerate(linears):
            params[f"Dense_{i}"] = _dense(lin)
    elif kind == "resnet50":
        _, bottleneck_cls, _ = _torch_classes()
        put("conv_init", model.conv1, "bn_init", model.bn1)
        blocks = [m for m in model.modules() if isinstance(m, bottleneck_cls)]
        for n, blk in enumerate(blocks):
            p, s = {}, {}
            for k in range(3):
                p[f"Conv_{k}"] = _conv(getattr(blk, f"conv{k + 1}"))
                p[f"BatchNorm_{k}"], s[f"BatchNorm_{k}"] = _bn(getattr(blk, f"bn{k + 1}"))
            if blk.downsample is not None:
                p["conv_proj"] = _conv(blk.downsample[0])
                p["norm_proj"], s["norm_proj"] = _bn(blk.downsample[1])
            params[f"BottleneckResNetBlock_{n}"], stats[f"BottleneckResNetBlock_{n}"] = p, s
        params["Dense_0"] = _dense(model.fc)
    else:
        raise ValueError(kind)
    return {"params": params, "batch_stats": stats}


# --------------------------------------------------------------------------------------------------------------
# Twins
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CNNTwin:
    """A torch model, its Flax twin and variables, and a shared input (torch layout and JAX layout)."""

    kind: str
    torch_model: object
    flax_model: object
    variables: dict
    x_torch: np.ndarray
    x_jax: np.ndarray


# Seeds picked so that the two samples have different argmax classes.
DEFAULT_SEEDS = {"vgg16_bn": 4, "resnet50": 4}


def make_cnn_twin(kind: str, seed: int | None = None) -> CNNTwin:
    """Seeded torch model + Flax twin + variables + a mixed-sign standard-normal input (seed+1)."""
    if seed is None:
        seed = DEFAULT_SEEDS[kind]
    tm = make_torch_model(kind, seed)
    x = zt.make_input(INPUT_SHAPE, seed + 1)
    return CNNTwin(kind, tm, flax_model(kind), flax_variables(kind, tm), x, zt.to_jax_layout(x))
