"""Intermediate relevance (`lrp_vjp(..., layers=...)`), concept-conditional relevance (CRP) and relevance
maximisation, checked against independent computations: the truncated network explained on its own, LRP-0
conservation, and brute-force top-k."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), use_bias=False, name="conv1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(4, use_bias=False, name="head")(x.reshape(x.shape[0], -1))


class Upper(nn.Module):
  """Net above conv1's output: explained on its own, fed with that output."""

  @nn.compact
  def __call__(self, v):
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(nn.relu(v)))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(4, use_bias=False, name="head")(x.reshape(x.shape[0], -1))


NET = Net()
X = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 2)), jnp.float32)
PARAMS = NET.init(jax.random.key(1), X)
APPLY = NET.apply
COMPOSITES = {
    "zero": jaxlrp.Composite(("linear", jaxlrp.Zero())),
    "gamma": jaxlrp.Composite(("conv", jaxlrp.Gamma(0.25)), ("dense", jaxlrp.Epsilon(0.01))),
    "alphabeta": jaxlrp.Composite(("conv", jaxlrp.AlphaBeta()), ("dense", jaxlrp.Epsilon())),
}
SEED = jax.nn.one_hot(jnp.array([0, 2, 3]), 4)


@pytest.mark.parametrize("name", COMPOSITES)
def test_intermediate_relevance_equals_the_truncated_network_explained_from_there(name):
  comp = COMPOSITES[name]
  out, vjp = jaxlrp.lrp_vjp(APPLY, comp, PARAMS, X, argnums=1, layers={"conv1": jaxlrp.Path("*conv1*")})
  r_x, layers = vjp(SEED)
  v = nn.Conv(6, (3, 3), use_bias=False).apply({"params": PARAMS["params"]["conv1"]}, X)
  upper_params = {"params": {k: PARAMS["params"][k] for k in ("conv2", "head")}}
  g = jaxlrp.lrp(Upper().apply, comp, argnums=1)
  expected = jax.grad(lambda v: (g(upper_params, v) * SEED).sum())(v)
  scale = float(jnp.abs(expected).max())
  assert float(jnp.abs(layers["conv1"] - expected).max()) <= 1e-5 * scale
  # the input relevance is the plain lrp result
  g_full = jaxlrp.lrp(APPLY, comp, argnums=1)
  np.testing.assert_allclose(r_x, jax.grad(lambda x: (g_full(PARAMS, x) * SEED).sum())(X), atol=1e-6 * scale)
  np.testing.assert_array_equal(out, APPLY(PARAMS, X))


def test_lrp0_relevance_sums_to_the_score_at_every_layer():
  layers = {"conv1": jaxlrp.Path("*conv1*"), "conv2": jaxlrp.Path("*conv2*"), "pool": "avg_pool"}
  out, vjp = jaxlrp.lrp_vjp(APPLY, COMPOSITES["zero"], PARAMS, X, argnums=1, layers=layers)
  r_x, r_layers = vjp(SEED)
  score = (out * SEED).sum(1)
  for r in [r_x, *r_layers.values()]:
    np.testing.assert_allclose(r.reshape(3, -1).sum(1), score, rtol=1e-5)


def test_layer_relevance_composes_with_jit():
  layers = {"conv2": jaxlrp.Path("*conv2*")}

  def fn(x):
    return jaxlrp.lrp_vjp(APPLY, COMPOSITES["gamma"], PARAMS, x, argnums=1, layers=layers)[1](SEED)

  eager, jitted = fn(X), jax.jit(fn)(X)
  np.testing.assert_allclose(jitted[1]["conv2"], eager[1]["conv2"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", COMPOSITES)
def test_concept_relevances_of_all_channels_sum_to_the_unconditional_relevance(name):
  comp = COMPOSITES[name]
  crp = jaxlrp.conditional_relevance(APPLY, X, comp, layer=jaxlrp.Path("*conv2*"), params=PARAMS,
                                     target=jnp.array([0, 2, 3]))
  assert crp.relevance.shape == (8, *X.shape) and crp.channel_relevance.shape == (3, 8)
  g = jaxlrp.lrp(APPLY, comp, argnums=1)
  full = jax.grad(lambda x: (g(PARAMS, x) * SEED).sum())(X)
  scale = float(jnp.abs(full).max())
  assert float(jnp.abs(crp.relevance.sum(0) - full).max()) <= 1e-5 * scale
  # each concept's input relevance is the relevance arriving at its channel, propagated down: under LRP-0
  # (conserving) its sum equals that channel's relevance
  if name == "zero":
    np.testing.assert_allclose(crp.relevance.reshape(8, 3, -1).sum(-1).T, crp.channel_relevance, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(crp.channel_relevance).max()))


def test_conditional_relevance_of_one_channel_matches_a_masked_network():
  """Masking a channel's relevance equals explaining the network with that channel's contribution only."""
  comp = COMPOSITES["zero"]
  crp = jaxlrp.conditional_relevance(APPLY, X, comp, layer=jaxlrp.Path("*conv1*"), params=PARAMS, target=0,
                                     channels=[4])
  # Under LRP-0 on a bias-free net, R(x | c) = x * d(v_c-relevance)/dx with v_c's relevance propagated as
  # gradient x input below the layer: R_v[..., c] * x * grad(v_c)/v_c, summed over positions.
  v = nn.Conv(6, (3, 3), use_bias=False).apply({"params": PARAMS["params"]["conv1"]}, X)
  rv = crp.layer_relevance[..., 4]
  ratio = jnp.where(v[..., 4] != 0, rv / jnp.where(v[..., 4] != 0, v[..., 4], 1.0), 0.0)
  conv = lambda x: nn.Conv(6, (3, 3), use_bias=False).apply({"params": PARAMS["params"]["conv1"]}, x)[..., 4]  # noqa
  expected = X * jax.grad(lambda x: (conv(x) * jax.lax.stop_gradient(ratio)).sum())(X)
  np.testing.assert_allclose(crp.relevance[0], expected, atol=1e-5 * float(jnp.abs(expected).max()))


def test_relevance_maximization_finds_the_brute_force_top_k():
  rng = np.random.default_rng(3)
  data = [np.asarray(rng.normal(size=(4, 8, 8, 2)), np.float32) for _ in range(3)]
  comp = COMPOSITES["gamma"]
  idx, score = jaxlrp.relevance_maximization(APPLY, data, comp, layer=jaxlrp.Path("*conv2*"), params=PARAMS,
                                             k=3, target=1)
  allx = jnp.concatenate(data)
  seed = jax.nn.one_hot(jnp.full((12,), 1), 4)
  _, vjp = jaxlrp.lrp_vjp(APPLY, comp, PARAMS, allx, argnums=1, layers={"c": jaxlrp.Path("*conv2*")})
  per_channel = np.asarray(vjp(seed)[1]["c"].sum(axis=(1, 2)))  # [12, 8]
  expected = np.argsort(-per_channel.T, axis=1, kind="stable")[:, :3]
  np.testing.assert_array_equal(idx, expected)
  np.testing.assert_allclose(score, np.take_along_axis(per_channel.T, expected, 1), rtol=1e-5, atol=1e-6)


def test_layer_selector_errors_name_the_ops():
  with pytest.raises(ValueError, match=r"(?s)matches 2 ops.*exactly one.*conv"):
    jaxlrp.lrp_vjp(APPLY, COMPOSITES["zero"], PARAMS, X, argnums=1, layers={"c": "conv"})
  with pytest.raises(ValueError, match="matches no op"):
    jaxlrp.conditional_relevance(APPLY, X, COMPOSITES["zero"], layer=jaxlrp.Path("*nope*"), params=PARAMS)
  with pytest.raises(TypeError, match="non-empty dict"):
    jaxlrp.lrp_vjp(APPLY, COMPOSITES["zero"], PARAMS, X, argnums=1, layers=["conv"])
