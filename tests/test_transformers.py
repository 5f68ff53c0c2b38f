"""Transformer structures: products of two data values, softmax, LayerNorm/RMSNorm, AttnLRP and CP-LRP.

Each rule is checked against a hand-derived reference on a small function.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp

RNG = np.random.default_rng(3)


def _normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


X = _normal(2, 5, 8)
WQ, WK, WV, WO = (_normal(8, 8) * 0.5 for _ in range(4))
CAUSAL = jnp.tril(jnp.ones((5, 5), bool))[None]


def attention(p, x, mask=None):
  q, k, v = x @ p[0], x @ p[1], x @ p[2]
  scores = jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(8.0)
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), v) @ p[3]


def kinds(f, *args, comp=None):
  rows = jaxlrp.show_rules(f, comp or jaxlrp.AttnLRP(), *args, argnums=1, print_table=False)
  return [r.kind for r in rows]


def test_attention_structures_are_recognised_in_einsum_and_linen_code():
  assert kinds(attention, (WQ, WK, WV, WO), X) == ["dense"] * 3 + ["bilinear", "softmax", "gate", "dense"]

  class MHA(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x, x)

  mha = MHA()
  params = mha.init(jax.random.PRNGKey(0), X)
  found = kinds(mha.apply, params, X)
  assert found.count("bilinear") == 1 and found.count("softmax") == 1 and found.count("gate") == 1


def test_uniform_rule_gives_each_factor_half():
  a, b = _normal(8, 6), _normal(8, 6)
  f = lambda p, x: (x @ p[0]) * (x @ p[1])  # noqa: E731 - bias-free, homogeneous of degree 2
  x = X[:, 0]
  g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Zero()), ("bilinear", jaxlrp.Uniform())), argnums=1)
  r = jax.grad(lambda x: g((a, b), x).sum())(x)
  # Each factor gets half its gradient x input share; the halves add up to the output.
  np.testing.assert_allclose(r, 0.5 * x * jax.grad(lambda x: f((a, b), x).sum())(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r.sum(), f((a, b), x).sum(), rtol=1e-5)


def test_softmax_gets_the_taylor_rule_at_x():
  f = lambda w, x: jax.nn.softmax(x @ w, axis=-1)  # noqa: E731
  w = _normal(8, 8)
  c = _normal(2, 5, 8)
  g = jaxlrp.lrp(f, jaxlrp.Composite(("dense", jaxlrp.Zero())), argnums=1)
  _, vjp = jax.vjp(lambda x: g(w, x), X)
  (r,) = vjp(c)
  # Reference: R_s = s * c; R_z = z * (R_s - s * sum(R_s)); then LRP-0 through z = x @ w.
  z = X @ w
  s = jax.nn.softmax(z, axis=-1)
  rs = s * c
  rz = z * (rs - s * rs.sum(-1, keepdims=True))
  expected = X * ((rz / z) @ w.T)
  np.testing.assert_allclose(r, expected, rtol=1e-4, atol=1e-5 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norms_hold_the_standard_deviation_constant(norm):
  module = nn.LayerNorm(use_bias=False, use_scale=False) if norm == "layer" else nn.RMSNorm(use_scale=False)
  params = module.init(jax.random.PRNGKey(0), X)
  assert "norm" in kinds(module.apply, params, X)
  g = jaxlrp.lrp(module.apply, jaxlrp.AttnLRP(), argnums=1)
  c = _normal(*X.shape)
  _, vjp = jax.vjp(lambda x: g(params, x), X)
  (r,) = vjp(c)
  eps = 1e-6
  if norm == "layer":
    mean = X.mean(-1, keepdims=True)
    std = jnp.sqrt(((X - mean) ** 2).mean(-1, keepdims=True) + eps)
    gc = c / std
    expected = X * (gc - gc.mean(-1, keepdims=True))  # the centring stays differentiable
  else:
    std = jnp.sqrt((X * X).mean(-1, keepdims=True) + eps)
    expected = X * c / std
  np.testing.assert_allclose(r, expected, rtol=1e-4, atol=1e-5)
  # Conservation through the normalisation (no bias): the relevance of y = (x - mean) / std is kept.
  np.testing.assert_allclose(r.sum(), (module.apply(params, X) * c).sum(), rtol=1e-4)


def test_cplrp_sends_no_relevance_through_queries_and_keys():
  p = (WQ, WK, WV, WO)
  g = jaxlrp.lrp(lambda p, x: attention(p, x, CAUSAL), jaxlrp.CPLRP(), argnums=1)
  r = jax.grad(lambda x: g(p, x)[:, -1, 0].sum())(X)
  # With the attention weights frozen the block is linear in x: LRP with Epsilon(1e-6) is gradient x input.
  weights = jax.nn.softmax(jnp.where(CAUSAL, jnp.einsum("bqd,bkd->bqk", X @ WQ, X @ WK) / jnp.sqrt(8.0),
                                     -jnp.inf), axis=-1)
  frozen = lambda x: (jnp.einsum("bqk,bkd->bqd", weights, x @ WV) @ WO)[:, -1, 0].sum()  # noqa: E731
  expected = X * jax.grad(frozen)(X)
  np.testing.assert_allclose(r, expected, rtol=1e-3, atol=1e-5 * float(jnp.abs(expected).max()))


def test_attnlrp_on_a_masked_block_is_finite_and_jit_equals_eager():
  p = (WQ, WK, WV, WO)
  g = jaxlrp.lrp(lambda p, x: attention(p, x, CAUSAL), jaxlrp.AttnLRP(), argnums=1)
  grad = lambda x: jax.grad(lambda x: g(p, x)[:, -1, 0].sum())(x)  # noqa: E731
  r = grad(X)
  assert bool(jnp.isfinite(r).all())
  np.testing.assert_allclose(jax.jit(grad)(X), r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()))
  np.testing.assert_array_equal(g(p, X), attention(p, X, CAUSAL))


def test_products_without_a_rule_raise_when_relevance_reaches_them():
  a, b = _normal(8, 6), _normal(8, 6)
  f = lambda p, x: (x @ p[0]) * (x @ p[1])  # noqa: E731
  g = jaxlrp.lrp(f, jaxlrp.EpsilonPlus(), argnums=1)
  with pytest.raises(jaxlrp.UnsupportedOpError, match=r"(?s)assigns no rule.*jaxlrp.Uniform\(\)"):
    jax.grad(lambda x: g((a, b), x).sum())(X[:, 0])


def rotary(x, base=10000.0):
  """Rotary position embedding (RoFormer), rotate-half form: a position-dependent linear map of x."""
  t, d = x.shape[-2], x.shape[-1]
  freq = base ** (-jnp.arange(0, d, 2) / d)
  angle = jnp.arange(t)[:, None] * freq[None]
  cos, sin = jnp.cos(jnp.concatenate([angle, angle], -1)), jnp.sin(jnp.concatenate([angle, angle], -1))
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def test_rotary_embeddings_are_linear_maps_of_the_data():
  """With the attention weights frozen (CP-LRP) a RoPE block is linear in x: relevance is gradient x input."""
  p = (WQ, WK, WV, WO)

  def block(p, x):
    q, k, v = rotary(x @ p[0]), rotary(x @ p[1]), rotary(x @ p[2])
    w = jax.nn.softmax(jnp.where(CAUSAL, jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(8.0), -jnp.inf), axis=-1)
    return jnp.einsum("bqk,bkd->bqd", w, v) @ p[3]

  g = jaxlrp.lrp(block, jaxlrp.CPLRP(), argnums=1)
  r = jax.grad(lambda x: g(p, x)[:, -1, 0].sum())(X)
  q, k = rotary(X @ WQ), rotary(X @ WK)
  weights = jax.nn.softmax(jnp.where(CAUSAL, jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(8.0), -jnp.inf), axis=-1)
  frozen = lambda x: (jnp.einsum("bqk,bkd->bqd", weights, rotary(x @ WV)) @ WO)[:, -1, 0].sum()  # noqa: E731
  expected = X * jax.grad(frozen)(X)
  np.testing.assert_allclose(r, expected, rtol=1e-3, atol=1e-5 * float(jnp.abs(expected).max()))
  np.testing.assert_allclose(r.sum(), frozen(X), rtol=1e-4)  # bias-free and linear: conserved


def test_one_hot_tokens_times_table_explain_like_the_word_embeddings():
  """Explaining one-hot tokens (`onehot @ table + positions`) gives each token the relevance of its word embedding;
  the position embeddings act as a bias of that layer."""
  vocab, table, pos = 11, _normal(11, 8) * 0.5, _normal(5, 8) * 0.1
  tokens = jnp.asarray(RNG.integers(0, vocab, size=(2, 5)))
  onehot = jax.nn.one_hot(tokens, vocab)
  p = (WQ, WK, WV, WO)
  g1 = jaxlrp.lrp(lambda t, oh: attention(p, oh @ t + pos, CAUSAL), jaxlrp.AttnLRP(), argnums=1)
  r_onehot = jax.grad(lambda oh: g1(table, oh)[:, -1, 0].sum())(onehot)
  assert float(jnp.abs(r_onehot * (1 - onehot)).max()) == 0.0  # only the present tokens carry relevance
  g2 = jaxlrp.lrp(lambda w, q: attention(p, w + q, CAUSAL), jaxlrp.AttnLRP(), argnums=(0, 1))
  positions = jnp.broadcast_to(pos, (2, 5, 8))
  r_word, _ = jax.grad(lambda w, q: g2(w, q)[:, -1, 0].sum(), argnums=(0, 1))(table[tokens], positions)
  np.testing.assert_allclose(r_onehot.sum(-1), r_word.sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mask", ["one_hot", "where"])
def test_masked_router_weights_are_a_gate(mask):
  # Top-1 mixture of experts: softmax router weights, masked to the chosen expert, weight the experts' outputs.
  # The masked weights are still a gate: CP-LRP sends all relevance to the experts (bias-free: sum R == logit;
  # as a bilinear product, half of it went into the router).
  r, w, fc = _normal(8, 3), _normal(3, 8, 8) * 0.5, _normal(8, 2)
  x = _normal(4, 8)

  def moe(x):
    gate = jax.nn.softmax(x @ r, -1)
    keep = jax.lax.stop_gradient(jax.nn.one_hot(jnp.argmax(gate, -1), 3))
    gate = gate * keep if mask == "one_hot" else jnp.where(keep > 0, gate, 0.0)
    return jnp.einsum("bed,be->bd", jnp.einsum("bi,eio->beo", x, w), gate) @ fc

  rows = jaxlrp.show_rules(lambda _, x: moe(x), jaxlrp.CPLRP(), 0, x, argnums=1, print_table=False)
  assert "gate" in [row.kind for row in rows] and "bilinear" not in [row.kind for row in rows]
  g = jaxlrp.lrp(lambda _, x: moe(x), jaxlrp.CPLRP(), argnums=1)
  rel = jax.grad(lambda x: g(0, x)[:, 0].sum())(x)
  np.testing.assert_allclose(rel.sum(1), moe(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_top_k_router_weights_are_a_gate():
  # Top-2 routing with jax.lax.top_k: the chosen weights are copies of softmax outputs (a gate) and the experts'
  # outputs are gathered at the chosen indices. CP-LRP sends all relevance to the experts: sum R == logit.
  r, w, fc = _normal(8, 4), _normal(4, 8, 8) * 0.5, _normal(8, 2)
  x = _normal(4, 8)

  def moe(x):
    weights, chosen = jax.lax.top_k(jax.nn.softmax(x @ r, -1), 2)  # [B, 2] each
    experts = jnp.einsum("bi,eio->beo", x, w)  # [B, E, D]
    picked = jnp.take_along_axis(experts, chosen[..., None], axis=1)  # [B, 2, D]
    return jnp.einsum("bkd,bk->bd", picked, weights) @ fc

  rows = jaxlrp.show_rules(lambda _, x: moe(x), jaxlrp.CPLRP(), 0, x, argnums=1, print_table=False)
  assert "gate" in [row.kind for row in rows] and "bilinear" not in [row.kind for row in rows]
  g = jaxlrp.lrp(lambda _, x: moe(x), jaxlrp.CPLRP(), argnums=1)
  rel = jax.grad(lambda x: g(0, x)[:, 0].sum())(x)
  np.testing.assert_allclose(rel.sum(1), moe(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_a_slice_of_gates_is_a_gate():
  # Gates computed for all steps at once, then indexed per step: sigmoid(x @ wa)[:, t] * (x @ wb)[:, t] is the same
  # gate as (sigmoid(x @ wa) * (x @ wb))[:, t]. CP-LRP holds it constant in both spellings.
  wa, wb = _normal(8, 4), _normal(8, 4)
  x = _normal(3, 8)
  sliced = lambda _, x: jax.nn.sigmoid(x @ wa)[:, 1:3] * (x @ wb)[:, 1:3]  # noqa: E731
  whole = lambda _, x: (jax.nn.sigmoid(x @ wa) * (x @ wb))[:, 1:3]  # noqa: E731
  rel = {name: jax.grad(lambda x: jaxlrp.lrp(f, jaxlrp.CPLRP(), argnums=1)(0, x).sum())(x)
         for name, f in (("sliced", sliced), ("whole", whole))}
  assert "gate" in [r.kind for r in jaxlrp.show_rules(sliced, jaxlrp.CPLRP(), 0, x, argnums=1, print_table=False)]
  np.testing.assert_allclose(rel["sliced"], rel["whole"], rtol=1e-5, atol=1e-6)
