"""Cross-check of jaxlrp.metrics against Quantus 0.6 on the same inputs.

A small ReLU MLP on flattened images exists twice with the same weights: in PyTorch for Quantus (channels-first
input, permuted to channels-last before flattening) and in JAX for jaxlrp (channels-last). Quantus runs with
`normalise=False, abs=False` unless stated, logits unless `softmax=True`, and a constant baseline 0.0 (a float
baseline draws no random numbers). Random choices are made deterministic:

- faithfulness correlation: Quantus' `np.random.choice` draws are recorded and handed to jaxlrp as `subsets`;
- random logit: two classes, so the "random" other class is fixed;
- MPRT: Quantus re-initialises each torch layer with `reset_parameters()` after `torch.manual_seed(seed + 1)`; the
  same draws are made here once and given to jaxlrp as `random_params`. Both sides explain with gradient x input
  (torch autograd for Quantus, `jax.grad` for jaxlrp), so MPRT compares independently computed explanations.

Needs the compare extra plus Quantus (`.ci/install-compare`).
"""

from __future__ import annotations

import copy
import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

torch = pytest.importorskip("torch",
                            reason="cross-check needs torch (pip install torch==2.13.0, see .ci/install-compare)")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from crosscheck import zennit_twins as zt  # noqa: E402

zt.install_torchvision_standin()  # quantus imports zennit when it is installed, and zennit imports torchvision
quantus = pytest.importorskip(
    "quantus", reason="cross-check needs quantus 0.6 (pip install --no-deps quantus==0.6.0 and the packages listed "
                      "in .ci/install-compare)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlrp import metrics  # noqa: E402

B, C, H, W, HIDDEN, CLASSES = 4, 3, 6, 6, 8, 3
TOL = dict(rtol=1e-4, atol=1e-5)


class TorchMLP(torch.nn.Module):
  def __init__(self, w0, b0, w1, b1):
    super().__init__()
    self.fc0 = torch.nn.Linear(w0.shape[0], w0.shape[1])
    self.fc1 = torch.nn.Linear(w1.shape[0], w1.shape[1])
    with torch.no_grad():
      for layer, w, b in ((self.fc0, w0, b0), (self.fc1, w1, b1)):
        layer.weight.copy_(torch.from_numpy(w.T.copy()))
        layer.bias.copy_(torch.from_numpy(b))

  def forward(self, x):  # [B, C, H, W] -> channels-last, flattened like the JAX twin
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return self.fc1(torch.relu(self.fc0(x)))


def jax_mlp(p, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["fc0"]["w"] + p["fc0"]["b"])
  return h @ p["fc1"]["w"] + p["fc1"]["b"]


def params_of(module: TorchMLP) -> dict:
  return {name: {"w": jnp.asarray(layer.weight.detach().numpy().T), "b": jnp.asarray(layer.bias.detach().numpy())}
          for name, layer in (("fc0", module.fc0), ("fc1", module.fc1))}


@jax.jit
def jax_gxi(p, x, t):
  grad = jax.grad(lambda v: jnp.take_along_axis(jax_mlp(p, v), t[:, None], axis=1).sum())(x)
  return grad * x


def torch_gxi(model, inputs, targets, **kwargs):
  x = torch.tensor(np.asarray(inputs), dtype=torch.float32, requires_grad=True)
  out = model(x)
  out[torch.arange(len(x)), torch.as_tensor(np.asarray(targets))].sum().backward()
  return (x.grad * x).detach().numpy()


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(H * W * C, HIDDEN)).astype(np.float32) * 0.3
  b0 = rng.normal(size=HIDDEN).astype(np.float32) * 0.1
  w1 = rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32)
  b1 = rng.normal(size=CLASSES).astype(np.float32) * 0.1
  model = TorchMLP(w0, b0, w1, b1).eval()
  x_cf = rng.uniform(0, 1, (B, C, H, W)).astype(np.float32)   # Quantus: channels first
  a_cf = rng.normal(size=(B, 1, H, W)).astype(np.float32)     # one relevance value per pixel
  y = np.array([0, 1, 2, 1])
  x = jnp.asarray(x_cf.transpose(0, 2, 3, 1))                 # jaxlrp: channels last
  r = jnp.asarray(a_cf[:, 0])                                  # [B, H, W]: a map without channels
  return model, params_of(model), x_cf, a_cf, y, x, r


def test_twins_agree(case):
  model, p, x_cf, _, _, x, _ = case
  np.testing.assert_allclose(model(torch.from_numpy(x_cf)).detach().numpy(), jax_mlp(p, x), **TOL)


def test_pixel_flipping_curve(case):
  model, p, x_cf, a_cf, y, x, r = case
  metric = quantus.PixelFlipping(features_in_step=3, perturb_baseline=0.0, normalise=False,
                                 disable_warnings=True)
  # With 3 channels Quantus flips elements (a broadcast over channels, ties broken by its argsort); with one channel
  # elements are pixels. Compare on the first channel only: x[..., :1] and a 1-channel model.
  x1_cf = np.ascontiguousarray(x_cf[:, :1])
  w0 = model.fc0.weight.detach().numpy().T.reshape(H, W, C, HIDDEN)[:, :, :1].reshape(-1, HIDDEN)
  model1 = TorchMLP(w0.copy(), model.fc0.bias.detach().numpy(), model.fc1.weight.detach().numpy().T.copy(),
                    model.fc1.bias.detach().numpy()).eval()
  q = np.asarray(metric(model=model1, x_batch=x1_cf, y_batch=y, a_batch=a_cf, channel_first=True, softmax=True))
  ours = metrics.perturbation_curve(jax_mlp, x[..., :1], r, y, params=params_of(model1), per_step=3,
                                    output_fn=jax.nn.softmax)
  assert q.shape == (B, H * W // 3)
  np.testing.assert_allclose(ours[:, 1:], q, **TOL)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation(case, order):
  model, p, x_cf, a_cf, y, x, r = case
  metric = quantus.RegionPerturbation(patch_size=2, order=order, regions_evaluation=6, perturb_baseline=0.0,
                                      normalise=False, disable_warnings=True)
  q = np.asarray(metric(model=model, x_batch=x_cf, y_batch=y, a_batch=a_cf, channel_first=True, softmax=False))
  curve = metrics.perturbation_curve(jax_mlp, x, r, y, params=p, order=order, patch=2, steps=6, per_step=1)
  np.testing.assert_allclose(curve[:, :1] - curve[:, 1:], q, **TOL)  # Quantus reports the drops


def test_selectivity_curve(case):
  model, p, x_cf, a_cf, y, x, r = case
  metric = quantus.Selectivity(patch_size=3, perturb_baseline=0.0, normalise=False, disable_warnings=True)
  q = np.asarray(metric(model=model, x_batch=x_cf, y_batch=y, a_batch=a_cf, channel_first=True, softmax=False))
  curve = metrics.perturbation_curve(jax_mlp, x, r, y, params=p, patch=3)
  np.testing.assert_allclose(curve[:, 1:], q, **TOL)
  # jaxlrp's selectivity is the trapezoid over the curve including its start, scaled to [0, 1]
  full = np.concatenate([np.asarray(curve[:, :1]), q], axis=1)
  np.testing.assert_allclose(metrics.selectivity(jax_mlp, x, r, y, params=p, patch=3),
                             np.trapezoid(full, axis=1) / (full.shape[1] - 1), **TOL)


def test_faithfulness_correlation(case, monkeypatch):
  model, p, x_cf, a_cf, y, x, r = case
  x1_cf = np.ascontiguousarray(x_cf[:, :1])  # one channel: Quantus' features are then pixels
  w0 = model.fc0.weight.detach().numpy().T.reshape(H, W, C, HIDDEN)[:, :, :1].reshape(-1, HIDDEN)
  model1 = TorchMLP(w0.copy(), model.fc0.bias.detach().numpy(), model.fc1.weight.detach().numpy().T.copy(),
                    model.fc1.bias.detach().numpy()).eval()
  drawn = []
  choice = np.random.choice

  def recording_choice(*args, **kwargs):
    out = choice(*args, **kwargs)
    drawn.append(np.asarray(out))
    return out

  monkeypatch.setattr(np.random, "choice", recording_choice)
  runs, size = 12, 5
  metric = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=size, perturb_baseline=0.0, normalise=False,
                                           return_aggregate=False, disable_warnings=True)
  q = np.asarray(metric(model=model1, x_batch=x1_cf, y_batch=y, a_batch=a_cf, channel_first=True, softmax=False))
  assert len(drawn) == runs * B  # per run, one draw per sample
  subsets = np.stack(drawn).reshape(runs, B, size).transpose(1, 0, 2)
  ours = metrics.faithfulness_correlation(jax_mlp, x[..., :1], r, y, params=params_of(model1), subsets=subsets)
  np.testing.assert_allclose(ours, q, **TOL)


def test_complexity(case):
  model, _, x_cf, a_cf, y, _, r = case
  kw = dict(model=model, x_batch=x_cf, y_batch=y, a_batch=a_cf, channel_first=True)
  gini = np.asarray(quantus.Sparseness(normalise=False, disable_warnings=True)(**kw))  # abs=True by default
  entropy = np.asarray(quantus.Complexity(normalise=False, disable_warnings=True)(**kw))
  np.testing.assert_allclose(metrics.gini(r), gini, rtol=1e-5, atol=1e-6)  # Quantus adds 1e-7 to |a|
  np.testing.assert_allclose(metrics.entropy(r), entropy, rtol=1e-5, atol=1e-6)


def test_localisation(case):
  model, _, x_cf, a_cf, y, _, r = case
  rng = np.random.default_rng(1)
  s = np.zeros((B, 1, H, W), bool)
  for b in range(B):  # a random 3x3 box per sample (the planted signal)
    i, j = rng.integers(0, H - 2), rng.integers(0, W - 2)
    s[b, 0, i:i + 3, j:j + 3] = True
  s[1, 0] |= a_cf[1, 0] == a_cf[1, 0].max()  # at least one hit for the pointing game
  kw = dict(model=model, x_batch=x_cf, y_batch=y, s_batch=s.astype(np.float32), channel_first=True)
  mask = jnp.asarray(s[:, 0])
  signed = quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True)(a_batch=a_cf, **kw)
  np.testing.assert_allclose(metrics.relevance_mass(r, mask, positive=False), signed, rtol=1e-4, atol=1e-6)
  positive = quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True)(a_batch=np.maximum(a_cf, 0), **kw)
  np.testing.assert_allclose(metrics.relevance_mass(r, mask), positive, rtol=1e-5, atol=1e-6)
  rank = quantus.RelevanceRankAccuracy(normalise=False, disable_warnings=True)(a_batch=a_cf, **kw)
  np.testing.assert_allclose(metrics.relevance_rank(r, mask), rank, rtol=1e-6)
  hits = np.asarray(quantus.PointingGame(normalise=False, disable_warnings=True)(a_batch=a_cf, **kw), np.float32)
  np.testing.assert_array_equal(metrics.pointing_game(r, mask), hits)
  assert 0 < hits.sum() < B  # both outcomes occur


def test_random_logit_two_classes(case):
  model, p, x_cf, _, _, x, _ = case
  # Two classes: the other class is fixed. Keep the first two outputs of the model.
  model2 = copy.deepcopy(model)
  model2.fc1 = torch.nn.Linear(HIDDEN, 2)
  with torch.no_grad():
    model2.fc1.weight.copy_(model.fc1.weight[:2])
    model2.fc1.bias.copy_(model.fc1.bias[:2])
  p2 = params_of(model2)
  y = np.array([0, 1, 1, 0])
  a_cf = torch_gxi(model2, x_cf, y)
  metric = quantus.RandomLogit(num_classes=2, similarity_func=quantus.similarity_func.correlation_spearman,
                               normalise=False, disable_warnings=True)
  q = np.asarray(metric(model=model2, x_batch=x_cf, y_batch=y, a_batch=a_cf, channel_first=True,
                        explain_func=torch_gxi))
  ours = metrics.random_logit(jax_gxi, x, y, params=p2, num_classes=2, key=jax.random.key(0))
  np.testing.assert_allclose(ours, q, rtol=1e-4, atol=1e-5)


def test_mprt_cascading(case):
  model, p, x_cf, _, y, x, _ = case
  seed = 42
  random_params = copy.deepcopy(p)
  for name in ("fc1", "fc0"):  # the draws Quantus makes: torch.manual_seed(seed + 1) before each reset_parameters()
    layer = copy.deepcopy(getattr(model, name))
    torch.manual_seed(seed + 1)
    layer.reset_parameters()
    random_params[name] = {"w": jnp.asarray(layer.weight.detach().numpy().T),
                           "b": jnp.asarray(layer.bias.detach().numpy())}
  a_cf = torch_gxi(model, x_cf, y)
  metric = quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, layer_order="top_down",
                        seed=seed, abs=False, normalise=False, disable_warnings=True)
  q = metric(model=model, x_batch=x_cf, y_batch=y, a_batch=a_cf, channel_first=True, explain_func=torch_gxi)
  assert list(q) == ["original", "fc1", "fc0"]
  ours = metrics.mprt(jax_gxi, p, x, y, random_params=random_params)
  assert ours.layers == ("fc1", "fc0")
  np.testing.assert_allclose(ours.similarity, np.stack([q["fc1"], q["fc0"]], axis=1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(q["original"], 1.0, atol=1e-6)  # the torch and JAX explanations rank alike
