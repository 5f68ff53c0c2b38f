"""`attribute(..., layers=...)`: intermediate relevance from the same backward pass, against `lrp_vjp`, against the
truncated network explained from its input, with K targets, under LRP-0, jit and vmap; errors and the jit cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import _attribute

RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# A small CNN written by hand, so that its upper part (the truncated network) can be written by hand too.
def lower_conv2(p, x):
  """x -> the output of the second conv (with its bias): the value `layers` reads out at Path("k2")."""
  h = jax.nn.relu(_conv(x, p["k1"]) + p["c1"])
  return _conv(h, p["k2"]) + p["c2"]


def upper_from_conv2(p, z):
  """The truncated network: the second conv's output -> logits."""
  h = jax.nn.relu(z)
  h = h.reshape(h.shape[0], 4, 2, 4, 2, h.shape[-1]).mean(axis=(2, 4))  # 2x2 average pooling
  return upper_from_dense1(p, h.reshape(h.shape[0], -1) @ p["w1"] + p["b1"])


def upper_from_dense1(p, z):
  """The truncated network: the first dense layer's output -> logits."""
  return jax.nn.relu(z) @ p["w2"] + p["b2"]


def cnn(p, x):
  return upper_from_conv2(p, lower_conv2(p, x))


PARAMS = {
    "k1": _normal(3, 3, 2, 4, scale=0.5), "c1": _normal(4, scale=0.1),
    "k2": _normal(3, 3, 4, 5, scale=0.3), "c2": _normal(5, scale=0.1),
    "w1": _normal(4 * 4 * 5, 12, scale=0.2), "b1": _normal(12, scale=0.1),
    "w2": _normal(12, 6, scale=0.3), "b2": _normal(6, scale=0.1),
}
X = jnp.asarray(RNG.uniform(size=(3, 8, 8, 2)), jnp.float32)
# No position-dependent rules (Flat / ZBox on the first layer): the truncated network gets the same rules above
# the layer as the full network.
COMP = jaxlrp.Composite(("conv", jaxlrp.ZPlus()), ("dense", jaxlrp.Epsilon(0.1)))
LAYERS = {"conv2": jaxlrp.Path("k2"), "dense1": jaxlrp.Path("w1")}


def reference(f, comp, p, x, layers, cotangents):
  """`lrp_vjp`'s input and layer relevance for each of the cotangents `[K, *out.shape]` (jitted: eager is slow)."""
  def pull(p, x, cots):
    _, vjp = jaxlrp.lrp_vjp(f, comp, p, x, argnums=1, layers=layers)
    return jax.vmap(vjp)(cots)
  return jax.jit(pull)(p, x, cotangents)


def assert_close(actual, expected, tol=1e-5):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=tol * max(scale, 1e-30))


@pytest.fixture(scope="module")
def single():
  """One class per sample, both layers."""
  target = jnp.array([0, 3, 5])
  return target, jaxlrp.attribute(cnn, X, COMP, target=target, params=PARAMS, layers=LAYERS)


def test_layer_relevance_equals_lrp_vjp(single):
  target, res = single
  r_x, r_layers = jax.tree_util.tree_map(lambda r: r[0],
                                         reference(cnn, COMP, PARAMS, X, LAYERS, jax.nn.one_hot(target, 6)[None]))
  assert set(res.layers) == {"conv2", "dense1"}
  assert res.layers["conv2"].shape == (3, 8, 8, 5) and res.layers["dense1"].shape == (3, 12)
  for label in LAYERS:
    assert_close(res.layers[label], r_layers[label], tol=1e-6)
  assert_close(res.relevance, r_x, tol=1e-6)
  # Asking for layers leaves the input relevance as it was.
  assert_close(res.relevance, jaxlrp.attribute(cnn, X, COMP, target=target, params=PARAMS).relevance, tol=1e-6)


@pytest.mark.parametrize("label, lower, upper", [("conv2", lower_conv2, upper_from_conv2),
                                                 ("dense1", None, upper_from_dense1)])
def test_layer_relevance_equals_the_truncated_network_explained_at_its_input(single, label, lower, upper):
  target, res = single
  if lower is None:
    h = jax.nn.relu(lower_conv2(PARAMS, X))
    h = h.reshape(3, 4, 2, 4, 2, 5).mean(axis=(2, 4))
    z = h.reshape(3, -1) @ PARAMS["w1"] + PARAMS["b1"]
  else:
    z = lower(PARAMS, X)
  truncated = jaxlrp.attribute(upper, z, COMP, target=target, params=PARAMS)
  assert_close(res.layers[label], truncated.relevance)
  assert float(jnp.abs(res.layers[label]).max()) > 0


def test_k_targets_equal_k_separate_calls():
  target = jnp.array([[0, 5, 2], [1, 1, 3], [4, 2, 0]])  # [B=3, K=3], repeats allowed
  layers = [jaxlrp.Path("k2"), jaxlrp.Path("w1")]  # a list: labelled 0, 1
  res = jaxlrp.attribute(cnn, X, COMP, target=target, params=PARAMS, layers=layers)
  assert sorted(res.layers) == [0, 1]
  assert res.layers[0].shape == (3, 3, 8, 8, 5) and res.layers[1].shape == (3, 3, 12)
  for k in range(3):
    one = jaxlrp.attribute(cnn, X, COMP, target=target[:, k], params=PARAMS, layers=layers)
    assert_close(res.relevance[:, k], one.relevance, tol=1e-6)
    for label in (0, 1):
      assert_close(res.layers[label][:, k], one.layers[label], tol=1e-6)


def test_all_targets_chunked_and_a_callable_target():
  res = jaxlrp.attribute(cnn, X, COMP, target="all", params=PARAMS, layers=jaxlrp.Path("w1"), target_batch_size=4)
  assert res.layers[0].shape == (3, 6, 12)
  # Seeds: class 0, class 5, and the contrast class 1 - class 2.
  cots = jnp.stack([jax.nn.one_hot(jnp.full(3, 0), 6), jax.nn.one_hot(jnp.full(3, 5), 6),
                    jnp.zeros((3, 6)).at[:, 1].set(1.0).at[:, 2].set(-1.0)])
  expected = reference(cnn, COMP, PARAMS, X, {"d": jaxlrp.Path("w1")}, cots)[1]["d"]
  assert_close(res.layers[0][:, 0], expected[0], tol=1e-6)
  assert_close(res.layers[0][:, 5], expected[1], tol=1e-6)
  contrast = jaxlrp.attribute(cnn, X, COMP, target=lambda out: out[:, 1] - out[:, 2], params=PARAMS,
                              layers={"d": jaxlrp.Path("w1")})
  assert_close(contrast.layers["d"], expected[2], tol=1e-6)


def test_lrp0_every_layer_sums_to_the_score():
  # A bias-free ReLU net under LRP-0: every layer (and the input) carries the whole score.
  p = {k: v for k, v in PARAMS.items() if k.startswith(("k", "w"))}
  def net(p, x):
    h = jax.nn.relu(_conv(jax.nn.relu(_conv(x, p["k1"])), p["k2"]))
    h = h.reshape(h.shape[0], 4, 2, 4, 2, h.shape[-1]).mean(axis=(2, 4)).reshape(h.shape[0], -1)
    return jax.nn.relu(h @ p["w1"]) @ p["w2"]
  lrp0 = jaxlrp.Composite(("linear", jaxlrp.Epsilon(0.0)))
  layers = {"conv1": jaxlrp.Path("k1"), "conv2": jaxlrp.Path("k2"), "dense1": jaxlrp.Path("w1"),
            "dense2": jaxlrp.Path("w2")}
  res = jaxlrp.attribute(net, X, lrp0, target=jnp.array([[0, 2], [1, 4], [5, 3]]), params=p, layers=layers)
  score = np.asarray(res.score)  # [B, K]
  assert np.abs(score).min() > 1e-3
  sums = {"input": res.relevance.sum(axis=(2, 3, 4))}
  sums.update({label: r.reshape(3, 2, -1).sum(-1) for label, r in res.layers.items()})
  for label, total in sums.items():
    np.testing.assert_allclose(np.asarray(total), score, rtol=1e-4, atol=1e-5 * np.abs(score).max(), err_msg=label)
  np.testing.assert_allclose(np.asarray(res.layers["dense2"]), np.asarray(res.score)[..., None]
                             * np.asarray(jax.nn.one_hot(res.target, 6)), rtol=1e-6, atol=1e-6)


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_linen_model_under_jit_and_vmap():
  model = SmallCNN()
  # Random parameters in the model's structure (model.init costs seconds: its random initialisers compile).
  shapes = jax.eval_shape(model.init, jax.random.key(0), X)
  params = jax.tree_util.tree_map(lambda a: _normal(*a.shape, scale=0.3), shapes)
  layers = {"conv1": jaxlrp.Path("*Conv_1*")}
  comp = jaxlrp.EpsilonPlusFlat()
  target = jnp.array([[1, 4], [0, 0], [2, 3]])
  expected = jnp.moveaxis(reference(model.apply, comp, params, X, layers, jax.nn.one_hot(target.T, 5))[1]["conv1"],
                          0, 1)
  jitted = jax.jit(lambda x, t: jaxlrp.attribute(model.apply, x, comp, target=t, params=params, layers=layers))(
      X, target)
  assert jitted.layers["conv1"].shape == (3, 2, 8, 8, 6)
  assert_close(jitted.layers["conv1"], expected, tol=1e-6)
  per_sample = jax.vmap(lambda x, t: jaxlrp.attribute(model.apply, x[None], comp, target=t[None], params=params,
                                                      layers=layers).layers["conv1"][0])(X, target)
  assert_close(per_sample, expected, tol=1e-5)

def test_layer_selectors_are_part_of_the_compile_key():
  a = jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers={"l": jaxlrp.Path("k1")})
  b = jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers={"l": jaxlrp.Path("k2")})
  assert a.layers["l"].shape == (3, 8, 8, 4) and b.layers["l"].shape == (3, 8, 8, 5)
  n_entries = len(_attribute._compiled)
  jaxlrp.attribute(cnn, X, COMP, target=1, params=PARAMS, layers={"l": jaxlrp.Path("k2")})  # cached
  assert len(_attribute._compiled) == n_entries
  assert jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS).layers is None


def test_layer_errors():
  with pytest.raises(TypeError, match="needs a jaxlrp.Composite.*GradientXInput"):
    jaxlrp.attribute(cnn, X, jaxlrp.GradientXInput(), target=0, params=PARAMS, layers=[jaxlrp.Path("k1")])
  with pytest.raises(ValueError, match="matches 2 ops"):
    jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers=["conv"])
  with pytest.raises(ValueError, match="matches no op"):
    jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers={"x": jaxlrp.Path("nope", allow_empty=True)})
  with pytest.raises(ValueError, match="layers is empty"):
    jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers=[])
  with pytest.raises(TypeError, match="one sortable type"):
    jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers={0: jaxlrp.Path("k1"), "b": jaxlrp.Path("k2")})
  with pytest.raises(TypeError, match="a list of selectors or a dict"):
    jaxlrp.attribute(cnn, X, COMP, target=0, params=PARAMS, layers=3)
