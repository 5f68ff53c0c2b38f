"""Twin models in plain PyTorch and Flax linen, and a black-box driver for Zennit 1.0.

Zennit (LGPL) is only *used* here, at test time, through its public API: composites, rules and the
``Gradient`` attributor. Nothing of its code is copied.

What this module provides:

- :func:`install_torchvision_standin`: ``import zennit`` imports torchvision (``zennit.torchvision`` needs
  ``torchvision.models.resnet.Bottleneck/BasicBlock``, ``zennit.types`` needs ``torchvision.ops.FrozenBatchNorm2d``).
  PyPI's torchvision does not load beside the CPU torch build we pin, so when the real one is not importable we
  register a minimal stand-in with just those names.
- :func:`import_zennit`: the above, then ``import zennit`` (and its submodules), returned as a namespace.
- Seeded torch models (:class:`TorchCNN`, :class:`TorchMLP`) with random weights and random mixed-sign biases,
  their Flax linen twins (:class:`FlaxCNN`, :class:`FlaxMLP`) and the weight conversion (:func:`flax_params`).
- :func:`zennit_relevance`: Zennit's relevance for a composite, with the output relevance seeded as
  ``one_hot(target) * output`` (the score), i.e. what jaxlrp computes with cotangent ``one_hot(target)``.
- :data:`CASES`: the composites compared, as pairs of factories (Zennit side, jaxlrp side).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import importlib.machinery
import types
from typing import Callable

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# torchvision stand-in
# --------------------------------------------------------------------------------------------------------------

STANDIN_FLAG = "__jaxlrp_standin__"


def _real_torchvision_importable() -> bool:
    if "torchvision" in sys.modules:
        return True
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError ("operator torchvision::nms does not exist")
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install_torchvision_standin() -> bool:
    """Register a minimal ``torchvision`` in ``sys.modules`` unless a real one imports.

    Returns True when the stand-in is (now or already) installed, False when the real torchvision is used.
    """
    if _real_torchvision_importable():
        return bool(getattr(sys.modules["torchvision"], STANDIN_FLAG, False))

    import torch

    def module(name: str, doc: str) -> types.ModuleType:
        mod = types.ModuleType(name, doc)
        # A spec, so that importlib.util.find_spec("torchvision") (transformers does this) does not fail.
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        setattr(mod, STANDIN_FLAG, True)
        sys.modules[name] = mod
        return mod

    tv = module("torchvision", "Stand-in for torchvision (jaxlrp cross-check tests): only what zennit imports.")
    tv.__version__ = "0.0.0+jaxlrp-standin"
    models = module("torchvision.models", "Stand-in torchvision.models.")
    resnet = module("torchvision.models.resnet", "Stand-in torchvision.models.resnet.")
    ops = module("torchvision.ops", "Stand-in torchvision.ops.")

    class _StandIn(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(
                f"{type(self).__name__} is a stand-in class for zennit's imports; torchvision is not installed"
            )

    class BasicBlock(_StandIn):
        expansion = 1

    class Bottleneck(_StandIn):
        expansion = 4

    class FrozenBatchNorm2d(_StandIn):
        pass

    for cls, mod in ((BasicBlock, resnet), (Bottleneck, resnet), (FrozenBatchNorm2d, ops)):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)

    tv.models, tv.ops, models.resnet = models, ops, resnet
    return True


def import_zennit() -> types.SimpleNamespace:
    """Import zennit (installing the torchvision stand-in first if needed); return its submodules."""
    install_torchvision_standin()
    import zennit
    import zennit.attribution
    import zennit.composites
    import zennit.core
    import zennit.layer
    import zennit.rules
    import zennit.types

    return types.SimpleNamespace(
        zennit=zennit,
        attribution=zennit.attribution,
        composites=zennit.composites,
        rules=zennit.rules,
        types=zennit.types,
        layer=zennit.layer,
    )


# --------------------------------------------------------------------------------------------------------------
# Seeded torch models
# --------------------------------------------------------------------------------------------------------------

CNN_INPUT_SHAPE = (2, 3, 16, 16)  # NCHW on the torch side; the JAX side takes NHWC
MLP_INPUT_SHAPE = (4, 20)
NUM_CLASSES = 10


def _torch():
    import torch

    return torch


def _randomise_(module, generator, bias_scale: float) -> None:
    """He-scaled normal weights and normal biases of mixed sign (so ReLUs are neither all on nor all off)."""
    torch = _torch()
    with torch.no_grad():
        w = module.weight
        fan_in = w[0].numel()
        w.copy_(torch.randn(w.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        b = module.bias
        b.copy_(torch.randn(b.shape, generator=generator) * bias_scale)


def make_torch_cnn(seed: int = 0):
    """conv(3->8)/relu/maxpool2/conv(8->16)/relu/avgpool2/flatten/linear(256->32)/relu/linear(32->10)."""
    torch = _torch()
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )
    gen = torch.Generator().manual_seed(seed)
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            _randomise_(layer, gen, bias_scale=0.5)
    return model.eval()


def make_torch_mlp(seed: int = 0):
    """linear(20->32)/relu/linear(32->32)/relu/linear(32->10)."""
    torch = _torch()
    nn = torch.nn
    model = nn.Sequential(
        nn.Linear(MLP_INPUT_SHAPE[1], 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )
    gen = torch.Generator().manual_seed(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            _randomise_(layer, gen, bias_scale=0.5)
    return model.eval()


def make_input(shape, seed: int = 1) -> np.ndarray:
    """Mixed-sign float32 input (standard normal)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Flax linen twins
# --------------------------------------------------------------------------------------------------------------

def _linen():
    import flax.linen as nn

    return nn


def _make_flax_classes():
    nn = _linen()
    import jax.numpy as jnp

    class FlaxCNN(nn.Module):
        """Twin of :func:`make_torch_cnn`: NHWC input; flattens in torch's NCHW order."""

        num_classes: int = NUM_CLASSES

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)))(x)
            x = nn.relu(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.nn.Flatten on NCHW
            x = nn.Dense(32)(x)
            x = nn.relu(x)
            return nn.Dense(self.num_classes)(x)

    class FlaxMLP(nn.Module):
        """Twin of :func:`make_torch_mlp`."""

        num_classes: int = NUM_CLASSES

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(self.num_classes)(x)

    return FlaxCNN, FlaxMLP


_FLAX_CLASSES = None


def flax_twin(kind: str):
    """The linen module twin of ``make_torch_<kind>`` ("cnn" or "mlp")."""
    global _FLAX_CLASSES
    if _FLAX_CLASSES is None:
        _FLAX_CLASSES = _make_flax_classes()
    return {"cnn": _FLAX_CLASSES[0], "mlp": _FLAX_CLASSES[1]}[kind]()


def flax_params(torch_model) -> dict:
    """linen params for the twin of a torch ``Sequential`` of Conv2d/Linear layers (in order).

    Conv kernels OIHW -> HWIO; Linear weights (out, in) -> Dense kernels (in, out).
    """
    import jax.numpy as jnp

    torch = _torch()
    params, n_conv, n_dense = {}, 0, 0
    for layer in torch_model:
        if isinstance(layer, torch.nn.Conv2d):
            w = layer.weight.detach().numpy().transpose(2, 3, 1, 0)
            params[f"Conv_{n_conv}"] = {"kernel": jnp.asarray(w), "bias": jnp.asarray(layer.bias.detach().numpy())}
            n_conv += 1
        elif isinstance(layer, torch.nn.Linear):
            w = layer.weight.detach().numpy().T
            params[f"Dense_{n_dense}"] = {"kernel": jnp.asarray(w), "bias": jnp.asarray(layer.bias.detach().numpy())}
            n_dense += 1
    return {"params": params}


def to_jax_layout(x_torch_layout: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC for 4-d arrays; anything else unchanged."""
    return x_torch_layout.transpose(0, 2, 3, 1) if x_torch_layout.ndim == 4 else x_torch_layout


def to_torch_layout(x_jax_layout: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW for 4-d arrays; anything else unchanged."""
    return x_jax_layout.transpose(0, 3, 1, 2) if x_jax_layout.ndim == 4 else x_jax_layout


@dataclasses.dataclass
class Twin:
    """A torch model, its Flax twin and params, and a shared input (torch layout and JAX layout)."""

    kind: str
    torch_model: object
    flax_model: object
    params: dict
    x_torch: np.ndarray
    x_jax: np.ndarray


# Seeds picked so that the CNN's two samples have different argmax (and argmin) classes.
DEFAULT_SEEDS = {"cnn": 5, "mlp": 0}


def make_twin(kind: str, seed: int | None = None) -> Twin:
    """Seeded torch model + Flax twin + params + a mixed-sign input (seed+1)."""
    if seed is None:
        seed = DEFAULT_SEEDS[kind]
    if kind == "cnn":
        tm, shape = make_torch_cnn(seed), CNN_INPUT_SHAPE
    elif kind == "mlp":
        tm, shape = make_torch_mlp(seed), MLP_INPUT_SHAPE
    else:
        raise ValueError(kind)
    x = make_input(shape, seed + 1)
    return Twin(kind, tm, flax_twin(kind), flax_params(tm), x, to_jax_layout(x))


def torch_forward(model, x: np.ndarray) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def pick_targets(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample targets: the argmax, and a fixed non-argmax class (the argmin)."""
    top = logits.argmax(axis=1)
    other = logits.argmin(axis=1)
    assert np.all(top != other)
    return {"argmax": top.astype(np.int32), "other": other.astype(np.int32)}


# --------------------------------------------------------------------------------------------------------------
# Zennit driver
# --------------------------------------------------------------------------------------------------------------

def zennit_relevance(model, x: np.ndarray, composite, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run Zennit with output relevance ``one_hot(target) * output``; return (output, input relevance) as numpy."""
    torch = _torch()
    zen = import_zennit()
    xt = torch.from_numpy(np.ascontiguousarray(x)).clone().requires_grad_(True)
    tgt = torch.from_numpy(np.asarray(target, dtype=np.int64))

    def seed(out):
        return torch.nn.functional.one_hot(tgt, out.shape[1]).to(out.dtype) * out.detach()

    with zen.attribution.Gradient(model=model, composite=composite) as attributor:
        out, rel = attributor(xt, seed)
    return out.detach().numpy(), rel.detach().numpy()


# --------------------------------------------------------------------------------------------------------------
# The compared composites
# --------------------------------------------------------------------------------------------------------------

BOX_LOW, BOX_HIGH = -3.0, 3.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One composite: a Zennit factory (given the torch-layout input) and a jaxlrp factory."""

    name: str
    zennit: Callable[[np.ndarray], object]
    jaxlrp: Callable[[], object]


def _single(zen, rule):
    c = zen.composites
    return c.LayerMapComposite(layer_map=c.layer_map_base() + [(zen.types.Linear, rule)])


def _cases() -> list[Case]:
    def z():
        return import_zennit()

    def jl():
        import jaxlrp

        return jaxlrp

    def box(x):
        torch = _torch()
        return dict(low=torch.full(x.shape, BOX_LOW), high=torch.full(x.shape, BOX_HIGH))

    return [
        Case("EpsilonPlus", lambda x: z().composites.EpsilonPlus(), lambda: jl().EpsilonPlus()),
        Case("EpsilonPlusFlat", lambda x: z().composites.EpsilonPlusFlat(), lambda: jl().EpsilonPlusFlat()),
        Case(
            "EpsilonGammaBox",
            lambda x: z().composites.EpsilonGammaBox(**box(x)),
            lambda: jl().EpsilonGammaBox(low=BOX_LOW, high=BOX_HIGH),
        ),
        Case(
            "EpsilonAlpha2Beta1", lambda x: z().composites.EpsilonAlpha2Beta1(), lambda: jl().EpsilonAlpha2Beta1()
        ),
        Case(
            "EpsilonAlpha2Beta1Flat",
            lambda x: z().composites.EpsilonAlpha2Beta1Flat(),
            lambda: jl().EpsilonAlpha2Beta1Flat(),
        ),
        Case(
            "Epsilon",
            lambda x: _single(z(), z().rules.Epsilon(epsilon=1e-6)),
            lambda: jl().Composite(("linear", jl().Epsilon(epsilon=1e-6))),
        ),
        Case(
            "ZPlus",
            lambda x: _single(z(), z().rules.ZPlus(stabilizer=1e-6)),
            lambda: jl().Composite(("linear", jl().ZPlus(epsilon=1e-6))),
        ),
        Case(
            "AlphaBeta(2,1)",
            lambda x: _single(z(), z().rules.AlphaBeta(alpha=2.0, beta=1.0, stabilizer=1e-6)),
            lambda: jl().Composite(("linear", jl().AlphaBeta(alpha=2.0, beta=1.0, epsilon=1e-6))),
        ),
        Case(
            "Gamma(0.25)",
            lambda x: _single(z(), z().rules.Gamma(gamma=0.25, stabilizer=1e-6)),
            lambda: jl().Composite(("linear", jl().Gamma(gamma=0.25, epsilon=1e-6))),
        ),
    ]


CASES: list[Case] = _cases()
CASES_BY_NAME = {c.name: c for c in CASES}


def max_rel_err(r_jax_torch_layout: np.ndarray, r_ref: np.ndarray) -> float:
    """max|R_jax - R_ref| / max|R_ref|."""
    scale = float(np.max(np.abs(r_ref)))
    return float(np.max(np.abs(np.asarray(r_jax_torch_layout, np.float64) - r_ref))) / max(scale, 1e-30)
