"""jaxlrp.metrics against plain NumPy loops (written here, independently of the implementation) and hand-computed
cases.

The model is a small ReLU MLP on the flattened input, evaluated with NumPy in the references and with jax.numpy in
the metrics (same weights). Each reference perturbs one sample at a time, region by region, step by step.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from jaxlrp import _incremental, metrics

RTOL, ATOL = 1e-5, 1e-5
IMAGE_SHAPE = (3, 6, 6, 2)  # [B, H, W, C]
TABULAR_SHAPE = (3, 7)
CLASSES = 3


# ---- the model: NumPy and JAX twins ------------------------------------------------------------------------------

def make_params(features: int, seed: int = 0, hidden: int = 5) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {
      "Dense_0": {"kernel": rng.normal(size=(features, hidden)).astype(np.float32),
                  "bias": rng.normal(size=hidden).astype(np.float32) * 0.1},
      "Dense_1": {"kernel": rng.normal(size=(hidden, CLASSES)).astype(np.float32),
                  "bias": rng.normal(size=CLASSES).astype(np.float32) * 0.1},
  }}


def mlp_jax(p, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["params"]["Dense_0"]["kernel"] + p["params"]["Dense_0"]["bias"])
  return h @ p["params"]["Dense_1"]["kernel"] + p["params"]["Dense_1"]["bias"]


def mlp_np(p, x):
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  q = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in p["params"].items()}
  h = np.maximum(x @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"], 0.0)
  return h @ q["Dense_1"]["kernel"] + q["Dense_1"]["bias"]


def softmax_np(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ---- NumPy references -----------------------------------------------------------------------------------------------

def ref_regions(sample_shape, patch):
  """{region index: list of element index tuples} for one sample, and the number of regions."""
  regions: dict[int, list] = {}
  if len(sample_shape) == 1:
    for d in range(sample_shape[0]):
      regions.setdefault(d // patch, []).append((d,))
    return regions, math.ceil(sample_shape[0] / patch)
  h_size, w_size, c_size = sample_shape
  cols = math.ceil(w_size / patch)
  for h in range(h_size):
    for w in range(w_size):
      for c in range(c_size):
        regions.setdefault((h // patch) * cols + w // patch, []).append((h, w, c))
  return regions, math.ceil(h_size / patch) * cols


def ref_region_sums(r_sample, regions):
  """Sum of relevance per region; a channel-less map counts each pixel once."""
  sums = {}
  for g, elems in regions.items():
    seen = set()
    total = 0.0
    for e in elems:
      idx = e if r_sample.ndim == len(e) else e[:-1]
      if idx not in seen:
        seen.add(idx)
        total += float(r_sample[idx])
    sums[g] = total
  return sums


def ref_curve(p, x, r, target, *, patch, order, counts, baseline, output=lambda z: z, model=mlp_np):
  """One sample at a time, one step at a time: copy, overwrite the first n_k regions, evaluate `model(p, x)`."""
  x = np.asarray(x, np.float64)
  out = np.zeros((x.shape[0], len(counts)))
  for b in range(x.shape[0]):
    regions, _ = ref_regions(x.shape[1:], patch)
    sums = ref_region_sums(np.asarray(r[b], np.float64), regions)
    sign = -1.0 if order == "morf" else 1.0
    sequence = sorted(regions, key=lambda g: (sign * sums[g], g))  # ties: lower index first
    for k, count in enumerate(counts):
      xp = x[b].copy()
      for g in sequence[:count]:
        for e in regions[g]:
          xp[e] = baseline[b][e]
      out[b, k] = output(model(p, xp[None]))[0, target[b]]
  return out


def ref_baseline(x, kind, sigma=1.0):
  x = np.asarray(x, np.float64)
  if not isinstance(kind, str):
    return np.broadcast_to(np.asarray(kind, np.float64), x.shape)
  if kind == "zeros":
    return np.zeros_like(x)
  if kind == "mean":
    return np.stack([np.full(s.shape, s.mean()) for s in x])
  if kind == "blur":
    return np.stack([scipy.ndimage.gaussian_filter(s, sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
                     for s in x])
  raise ValueError(kind)


def ref_aopc(curve):
  return np.array([np.mean([c[0] - c[k] for k in range(len(c))]) for c in curve])


def ref_auc(curve):
  return np.array([sum((c[k] + c[k + 1]) / 2 for k in range(len(c) - 1)) / (len(c) - 1) for c in curve])


def ref_gini(r):
  out = []
  for s in np.abs(np.asarray(r, np.float64)).reshape(len(r), -1):
    n = len(s)
    # mean absolute difference form: G = sum_ij |a_i - a_j| / (2 n sum a)
    out.append(sum(abs(a - b) for a in s for b in s) / (2 * n * s.sum()) if s.sum() > 0 else 0.0)
  return np.array(out)


def ref_entropy(r):
  out = []
  for s in np.abs(np.asarray(r, np.float64)).reshape(len(r), -1):
    p = s / s.sum()
    out.append(-sum(v * math.log(v) for v in p if v > 0))
  return np.array(out)


# ---- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_case():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, IMAGE_SHAPE).astype(np.float32)
  r = rng.normal(size=IMAGE_SHAPE).astype(np.float32)
  t = np.array([0, 2, 1])
  return make_params(int(np.prod(IMAGE_SHAPE[1:]))), x, r, t


@pytest.fixture(scope="module")
def tabular_case():
  rng = np.random.default_rng(2)
  x = rng.normal(size=TABULAR_SHAPE).astype(np.float32)
  r = rng.normal(size=TABULAR_SHAPE).astype(np.float32)
  t = np.array([1, 0, 2])
  return make_params(TABULAR_SHAPE[1], seed=3), x, r, t


# ---- hand-computed cases --------------------------------------------------------------------------------------------

def _sum_model(x):
  return x.reshape(x.shape[0], -1).sum(-1, keepdims=True)


def test_hand_computed_pixel_flipping_aopc_selectivity():
  x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0), [[10, 6, 3, 1, 0]])
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0, order="lerf"), [[10, 9, 7, 4, 0]])
  # AOPC = (0 + 4 + 7 + 9 + 10) / 5; selectivity = (8 + 4.5 + 2 + 0.5) / 4
  np.testing.assert_allclose(metrics.aopc(_sum_model, x, x, 0), [6.0])
  np.testing.assert_allclose(metrics.selectivity(_sum_model, x, x, 0), [3.75])
  # two per step, mean baseline 2.5: [10, 10 - 7 + 5, 10]
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0, per_step=2, baseline="mean"),
                             [[10, 8, 10]])


def test_hand_computed_regions_and_schedules():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  # 2x2 blocks sum to 10, 18, 42, 50 (row-major); most relevant first
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0, patch=2), [[120, 70, 28, 10, 0]])
  # 3x3 blocks on 4x4: block sizes 9, 3, 3, 1; sums 45, 21, 39, 15 -> order 0, 2, 1, 3
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0, patch=3), [[120, 75, 36, 15, 0]])
  # steps only: floor(k * 16 / 3) = 0, 5, 10, 16 pixels removed, least relevant first (values 0..)
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0, order="lerf", steps=3),
                             [[120, 120 - 10, 120 - 45, 0]])
  # both: a partial curve of 2 steps of 3 pixels
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, x, 0, steps=2, per_step=3),
                             [[120, 120 - 42, 120 - 42 - 33]])


def test_ties_remove_lower_index_first():
  x = jnp.array([[1.0, 10.0, 100.0, 1000.0]])
  r = jnp.array([[1.0, 2.0, 2.0, 1.0]])  # regions 1 and 2 tie, then 0 and 3
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, r, 0), [[1111, 1101, 1001, 1000, 0]])
  np.testing.assert_allclose(metrics.perturbation_curve(_sum_model, x, r, 0, order="lerf"),
                             [[1111, 1110, 110, 100, 0]])


def test_hand_computed_complexity_and_localisation():
  r = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(metrics.gini(r), [0.0, 0.75, 0.0], atol=1e-7)
  np.testing.assert_allclose(metrics.entropy(r), [math.log(4), 0.0, math.log(4)], rtol=1e-6)
  r = jnp.array([[3.0, 1.0, -2.0, 0.0], [1.0, 2.0, 2.0, 0.5]])
  mask = jnp.array([[True, False, True, False], [False, False, True, True]])
  np.testing.assert_allclose(metrics.relevance_mass(r, mask), [3 / 4, 2.5 / 5.5], rtol=1e-6)
  np.testing.assert_allclose(metrics.relevance_mass(r, mask, positive=False), [1 / 2, 2.5 / 5.5], rtol=1e-6)
  # top-2: sample 0 -> elements 0, 1 (one inside); sample 1 -> elements 1, 2 (tie at 2: lower index first)
  np.testing.assert_allclose(metrics.relevance_rank(r, mask), [0.5, 0.5])
  np.testing.assert_allclose(metrics.relevance_rank(jnp.array([[4.0, 3.0, 2.0, 1.0]]), mask[:1]), [0.5])  # not 3rd
  # maxima: element 0; elements 1 and 2 tie and 2 is inside -> a hit
  np.testing.assert_allclose(metrics.pointing_game(r, mask), [1.0, 1.0])
  np.testing.assert_allclose(metrics.pointing_game(r, ~mask), [0.0, 1.0])
  empty = jnp.zeros_like(mask)
  assert np.isnan(np.asarray(metrics.relevance_rank(r, empty))).all()


# ---- perturbation curves against the NumPy loop ------------------------------------------------------------------

@pytest.mark.parametrize("order,patch,baseline,channels", [
    ("morf", 1, "zeros", True),
    ("lerf", 4, "mean", True),      # 6x6 in 4x4 blocks: edge blocks of 4x2, 2x4, 2x2
    ("morf", 2, "blur", False),     # a channel-less relevance map [B, H, W]
    ("morf", 3, "value", True),     # an array baseline broadcast over the batch
])
def test_image_curve_matches_numpy_loop(image_case, order, patch, baseline, channels):
  p, x, r, t = image_case
  if not channels:
    r = r.sum(-1)
  value = np.linspace(-1, 1, 72, dtype=np.float32).reshape(6, 6, 2) if baseline == "value" else None
  base_arg = value if baseline == "value" else baseline
  n = math.ceil(6 / patch) ** 2
  steps = min(n, 9)
  per_step = max(1, n // steps) if patch == 1 else None
  if per_step is not None:
    counts = [min(k * per_step, n) for k in range(steps + 1)]
  else:
    counts = [k * n // steps for k in range(steps + 1)]
  got = metrics.perturbation_curve(mlp_jax, x, r, t, params=p, order=order, patch=patch, steps=steps,
                                   per_step=per_step, baseline=base_arg, blur_sigma=1.2)
  ref_base = ref_baseline(x, value if baseline == "value" else baseline, sigma=1.2)
  want = ref_curve(p, x, r, t, patch=patch, order=order, counts=counts, baseline=ref_base)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_tabular_curve_softmax_aopc_selectivity(tabular_case):
  p, x, r, t = tabular_case
  got = metrics.perturbation_curve(mlp_jax, x, r, t, params=p, output_fn=jax.nn.softmax)
  want = ref_curve(p, x, r, t, patch=1, order="morf", counts=list(range(8)), baseline=ref_baseline(x, "zeros"),
                   output=softmax_np)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics.aopc(mlp_jax, x, r, t, params=p, output_fn=jax.nn.softmax), ref_aopc(want),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics.selectivity(mlp_jax, x, r, t, params=p, output_fn=jax.nn.softmax),
                             ref_auc(want), rtol=RTOL, atol=ATOL)
  # the closure form and chunked steps (lax.map) give the same curve
  closure = metrics.perturbation_curve(lambda xx: jax.nn.softmax(mlp_jax(p, xx)), x, r, t, chunk_size=3)
  np.testing.assert_allclose(closure, want, rtol=RTOL, atol=ATOL)


def test_uniform_baseline_is_one_fixed_draw_in_range():
  # The model reads the input itself: class i is element i, so the curve of target i shows what element i becomes.
  x = jnp.asarray(np.random.default_rng(4).uniform(2.0, 5.0, (4, 6)).astype(np.float32))
  r = jnp.tile(jnp.arange(6.0, 0.0, -1.0), (4, 1))  # element 0 is removed first
  curve = np.asarray(metrics.perturbation_curve(lambda v: v, x, r, 0, baseline="uniform", key=jax.random.key(1)))
  np.testing.assert_allclose(curve[:, 0], x[:, 0])
  np.testing.assert_allclose(curve[:, 1:], np.repeat(curve[:, 1:2], 6, axis=1))  # the same noise at every step
  lo, hi = np.asarray(x).min(1), np.asarray(x).max(1)
  assert ((curve[:, 1] >= lo) & (curve[:, 1] <= hi)).all() and (curve[:, 1] != curve[:, 0]).all()
  fixed = np.asarray(metrics.perturbation_curve(lambda v: v, x, r, 0, baseline="uniform", key=jax.random.key(1),
                                                uniform_range=(-1.0, -0.5)))
  assert ((fixed[:, 1] >= -1.0) & (fixed[:, 1] <= -0.5)).all()


def test_random_order_is_a_permutation_per_sample():
  x = jnp.ones((5, 8))
  w = 2.0 ** jnp.arange(8)  # every subset of features has its own sum: the curve identifies the order
  model = lambda v: (v * w).sum(-1, keepdims=True)  # noqa: E731
  curve = np.asarray(metrics.perturbation_curve(model, x, x, 0, order="random", key=jax.random.key(2)))
  removed = -np.diff(curve, axis=1)  # the weight of the feature removed at each step
  orders = np.log2(removed).round().astype(int)
  assert all(sorted(o) == list(range(8)) for o in orders)
  assert len({tuple(o) for o in orders}) > 1  # samples get different orders


def test_vmap_over_candidate_relevance(image_case):
  p, x, r, t = image_case
  candidates = np.stack([r, -r, np.abs(r)])
  metrics._unused_key.cache_clear()  # regression: the placeholder key first made inside a trace must not leak
  score = jax.jit(jax.vmap(lambda rr: metrics.aopc(mlp_jax, x, rr, t, params=p, patch=2, steps=4)))
  got = score(candidates)
  for k, c in enumerate(candidates):
    curve = ref_curve(p, x, c, t, patch=2, order="morf", counts=[0, 2, 4, 6, 9], baseline=ref_baseline(x, "zeros"))
    np.testing.assert_allclose(got[k], ref_aopc(curve), rtol=RTOL, atol=ATOL)


def test_argument_errors(tabular_case):
  p, x, r, t = tabular_case
  with pytest.raises(ValueError, match="order"):
    metrics.perturbation_curve(mlp_jax, x, r, t, params=p, order="best")
  with pytest.raises(ValueError, match="relevance must have the shape"):
    metrics.perturbation_curve(mlp_jax, x, r[:, :3], t, params=p)
  with pytest.raises(ValueError, match="blur"):
    metrics.perturbation_curve(mlp_jax, x, r, t, params=p, baseline="blur")
  with pytest.raises(ValueError, match="key"):
    metrics.perturbation_curve(mlp_jax, x, r, t, params=p, baseline="uniform")
  with pytest.raises(ValueError, match="key"):
    metrics.faithfulness_correlation(mlp_jax, x, r, t, params=p)


# ---- faithfulness correlation --------------------------------------------------------------------------------------

def test_faithfulness_correlation_matches_numpy_loop(image_case):
  p, x, r, t = image_case
  patch, n, m, num = 2, 9, 3, 6
  rng = np.random.default_rng(5)
  subsets = np.stack([np.stack([rng.choice(n, m, replace=False) for _ in range(num)]) for _ in range(len(x))])
  got = metrics.faithfulness_correlation(mlp_jax, x, r, t, params=p, subsets=subsets, patch=patch, baseline="mean")
  base = ref_baseline(x, "mean")
  want = []
  for b in range(len(x)):
    regions, _ = ref_regions(x.shape[1:], patch)
    sums = ref_region_sums(r[b], regions)
    full = mlp_np(p, x[b][None])[0, t[b]]
    rel, drop = [], []
    for s in subsets[b]:
      xp = np.asarray(x[b], np.float64).copy()
      for g in s:
        for e in regions[g]:
          xp[e] = base[b][e]
      rel.append(sum(sums[g] for g in s))
      drop.append(full - mlp_np(p, xp[None])[0, t[b]])
    want.append(np.corrcoef(rel, drop)[0, 1])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_faithfulness_correlation_random_subsets():
  # Linear model: the drop of S is sum_S w_i x_i. Over uniformly random m-subsets of n features,
  # corr(sum_S a, sum_S b) = corr_i(a_i, b_i) for any m (the covariance of subset sums is m (n - m) / (n (n - 1))
  # times that of the items), so with many subsets the metric estimates the feature-level Pearson correlation.
  rng = np.random.default_rng(6)
  w = rng.normal(size=(10, 1)).astype(np.float32)
  x = rng.normal(size=(2, 10)).astype(np.float32)
  r = x * w[:, 0] + rng.normal(size=(2, 10)).astype(np.float32)  # a noisy explanation
  model = lambda v: v @ w  # noqa: E731
  got = np.asarray(metrics.faithfulness_correlation(model, x, r, 0, key=jax.random.key(3), num_subsets=3000,
                                                    subset_size=4))
  want = [np.corrcoef(r[b], x[b] * w[:, 0])[0, 1] for b in range(2)]
  np.testing.assert_allclose(got, want, atol=0.06)
  exact = metrics.faithfulness_correlation(model, x, x * w[:, 0], 0, key=jax.random.key(3), num_subsets=20)
  np.testing.assert_allclose(exact, 1.0, atol=1e-5)


# ---- similarities, complexity, localisation against NumPy / SciPy --------------------------------------------------

def test_similarities_match_scipy():
  rng = np.random.default_rng(7)
  a = rng.integers(0, 4, (3, 2, 5)).astype(np.float32)  # integers: ties
  b = rng.normal(size=(3, 2, 5)).astype(np.float32)
  fa, fb = a.reshape(3, -1), b.reshape(3, -1)
  np.testing.assert_allclose(metrics.spearman(a, b), [scipy.stats.spearmanr(u, v)[0] for u, v in zip(fa, fb)],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics.pearson(a, b), [scipy.stats.pearsonr(u, v)[0] for u, v in zip(fa, fb)],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics.cosine(a, b), [u @ v / np.linalg.norm(u) / np.linalg.norm(v)
                                                   for u, v in zip(fa, fb)], rtol=1e-5)


def test_complexity_and_localisation_match_numpy(image_case):
  _, _, r, _ = image_case
  np.testing.assert_allclose(metrics.gini(r), ref_gini(r), rtol=1e-5)
  np.testing.assert_allclose(metrics.entropy(r), ref_entropy(r), rtol=1e-5)
  rng = np.random.default_rng(8)
  mask = rng.uniform(size=r.shape) < 0.3
  rows = [(s.ravel(), k.ravel()) for s, k in zip(np.asarray(r, np.float64), mask)]
  np.testing.assert_allclose(metrics.relevance_mass(r, mask),
                             [np.clip(s, 0, None)[k].sum() / np.clip(s, 0, None).sum() for s, k in rows], rtol=1e-5)
  np.testing.assert_allclose(metrics.relevance_mass(r, mask, positive=False),
                             [s[k].sum() / s.sum() for s, k in rows], rtol=1e-4)
  np.testing.assert_allclose(metrics.relevance_rank(r, mask),
                             [np.isin(np.argsort(-s)[:k.sum()], np.flatnonzero(k)).mean() for s, k in rows])
  np.testing.assert_allclose(metrics.pointing_game(r, mask), [float(k[np.argmax(s)]) for s, k in rows])
  # a pixel mask [B, H, W, 1] broadcasts over channels
  pixel = mask[..., :1]
  np.testing.assert_allclose(metrics.relevance_mass(r, pixel),
                             metrics.relevance_mass(r, np.broadcast_to(pixel, r.shape)), rtol=1e-6)


# ---- randomisation checks ------------------------------------------------------------------------------------------

@jax.jit
def gxi(p, x, t):
  """Gradient x input of the MLP's target logit, as the explanation under test."""
  grad = jax.grad(lambda v: jnp.take_along_axis(mlp_jax(p, v), t[:, None], axis=1).sum())(x)
  return grad * x


def test_mprt_layers_follow_the_forward_pass():
  # Names sort the wrong way round; a BatchNorm-like statistic (collection "batch_stats") must not be randomised
  # (a random variance would be negative: NaN).
  rng = np.random.default_rng(10)
  variables = {"params": {"z_in": {"kernel": rng.normal(size=(7, 5)).astype(np.float32)},
                          "a_out": {"kernel": rng.normal(size=(5, 3)).astype(np.float32)}},
               "batch_stats": {"z_in": {"var": rng.uniform(0.5, 2.0, 5).astype(np.float32)}}}

  def explain(v, x, t):
    def f(xx):
      h = jax.nn.relu(xx @ v["params"]["z_in"]["kernel"]) / jnp.sqrt(v["batch_stats"]["z_in"]["var"])
      return jnp.take_along_axis(h @ v["params"]["a_out"]["kernel"], t[:, None], axis=1).sum()
    return jax.grad(f)(x) * x

  x = rng.normal(size=(4, 7)).astype(np.float32)
  res = metrics.mprt(explain, variables, x, 1, key=jax.random.key(0))
  assert res.layers == ("params/a_out", "params/z_in")
  assert res.similarity.shape == (4, 2) and np.isfinite(np.asarray(res.similarity)).all()
  globbed = metrics.mprt(explain, variables, x, 1, key=jax.random.key(0), layers=["*a_out*", "*/kernel"])
  assert globbed.layers == ("*a_out*", "*/kernel")
  with pytest.raises(ValueError, match="matches no parameter"):
    metrics.mprt(explain, variables, x, 1, key=jax.random.key(0), layers=["*Conv*"])


def test_mprt_matches_cascading_loop(tabular_case):
  p, x, r, t = tabular_case
  rand = make_params(TABULAR_SHAPE[1], seed=9)
  res = metrics.mprt(gxi, p, x, t, random_params=rand)
  assert res.layers == ("params/Dense_1", "params/Dense_0")
  got = res.similarity
  assert got.shape == (len(x), 2)
  original = np.asarray(gxi(p, jnp.asarray(x), jnp.asarray(t)))
  stage = {"params": dict(p["params"])}
  for level, layer in enumerate(["Dense_1", "Dense_0"]):  # top first, cumulative
    stage["params"][layer] = rand["params"][layer]
    e = np.asarray(gxi(stage, jnp.asarray(x), jnp.asarray(t)))
    want = [scipy.stats.spearmanr(o.ravel(), s.ravel())[0] for o, s in zip(original, e)]
    np.testing.assert_allclose(got[:, level], want, rtol=1e-5, atol=1e-6)
  # drawn random parameters: deterministic per key, same result in chunks, and the explanation changes
  a = metrics.mprt(gxi, p, x, t, key=jax.random.key(0), similarity="pearson").similarity
  b = metrics.mprt(gxi, p, x, t, key=jax.random.key(0), similarity="pearson", chunk_size=2).similarity  # vmapped
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(a) < 0.999)


def test_random_logit_matches_loop(tabular_case):
  p, x, r, t = tabular_case
  # two classes: the other class is determined
  p2 = {"params": {**p["params"], "Dense_1": {k: v[..., :2] for k, v in p["params"]["Dense_1"].items()}}}
  t2 = np.array([0, 1, 1])
  got = metrics.random_logit(gxi, x, t2, params=p2, num_classes=2, key=jax.random.key(0))
  a, b = gxi(p2, jnp.asarray(x), jnp.asarray(t2)), gxi(p2, jnp.asarray(x), jnp.asarray(1 - t2))
  want = [scipy.stats.spearmanr(np.asarray(u), np.asarray(v))[0] for u, v in zip(a, b)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # three classes: each sample's score is its similarity to one of the two other classes
  got = np.asarray(metrics.random_logit(gxi, x, t, params=p, num_classes=3, key=jax.random.key(1)))
  base = np.asarray(gxi(p, jnp.asarray(x), jnp.asarray(t)))
  for b in range(len(x)):
    others = [c for c in range(3) if c != t[b]]
    sims = [scipy.stats.spearmanr(base[b], np.asarray(gxi(p, jnp.asarray(x), jnp.full(3, c)))[b])[0]
            for c in others]
    assert np.isclose(got[b], sims, rtol=1e-5, atol=1e-6).any(), (b, got[b], sims)


def test_input_invariance_of_gradient_and_lrp_against_numpy():
  # A first dense layer x @ W + b with ReLU, then a head; the shifted model's bias compensates: b' = b - c @ W.
  rng = np.random.default_rng(3)
  w1, b1, w2 = rng.normal(size=(5, 4)), rng.normal(size=4), rng.normal(size=(4, 3))
  c = rng.normal(size=5)
  x = rng.normal(size=(6, 5))
  p = {k: jnp.asarray(v, jnp.float32) for k, v in dict(w1=w1, b1=b1, w2=w2).items()}
  p_shift = dict(p, b1=jnp.asarray(b1 - c @ w1, jnp.float32))
  f = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]  # noqa: E731
  t = np.array([0, 1, 2, 0, 1, 2])

  def grad(p, x, t):
    return jax.grad(lambda x: jnp.take_along_axis(f(p, x), t[:, None], 1).sum())(x)

  gxi = lambda p, x, t: x * grad(p, x, t)  # noqa: E731
  sims = {name: np.asarray(metrics.input_invariance(fn, x, t, shift=c, params=p, shifted_params=p_shift))
          for name, fn in [("grad", grad), ("gxi", gxi)]}
  # NumPy reference: both models have the same hidden pre-activation, so the gradient is the same W1 diag(mask) w2.
  h = x @ w1 + b1
  g = ((h > 0)[:, :, None] * w2[None])[np.arange(6), :, t] @ w1.T  # [B, 5]
  ref_gxi = [np.corrcoef(x[b] * g[b], (x[b] + c) * g[b])[0, 1] for b in range(6)]
  np.testing.assert_allclose(sims["grad"], 1.0, atol=1e-5)
  np.testing.assert_allclose(sims["gxi"], ref_gxi, rtol=1e-4, atol=1e-5)
  assert np.all(sims["gxi"] < 0.999)
  with pytest.raises(ValueError, match="shifted_params"):
    metrics.input_invariance(grad, x, t, shift=c, params=p)


# ---- the incremental first dense layer -----------------------------------------------------------------------------

_ORDERS = ("morf", "lerf", "random")


class FlaxMLP(nn.Module):
  """Dense-ReLU-Dense on the flattened input: the parameters of `make_params`, so `mlp_np` is its NumPy twin."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return nn.Dense(CLASSES)(h)


def jnp_mlp(p, x):
  return jnp.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]


def _jnp_params(p):
  d0, d1 = p["params"]["Dense_0"], p["params"]["Dense_1"]
  return {"w1": d0["kernel"], "b1": d0["bias"], "w2": d1["kernel"], "b2": d1["bias"]}


def _split(model, params, x):
  return _incremental.first_dense(jax.make_jaxpr(model)(params, x))


def _both_paths(model, x, r, t, **options):
  fast = metrics.perturbation_curve(model, x, r, t, incremental=True, **options)
  full = metrics.perturbation_curve(model, x, r, t, incremental=False, **options)
  np.testing.assert_allclose(fast, full, rtol=RTOL, atol=ATOL)
  return np.asarray(fast)


@pytest.mark.parametrize("flavour", ["flax", "jnp"])
@pytest.mark.parametrize("order", ["morf", "lerf", "random"])
def test_incremental_mlp_matches_full_model_and_numpy_loop(tabular_case, flavour, order):
  p, x, r, t = tabular_case
  model, params = (FlaxMLP().apply, p) if flavour == "flax" else (jnp_mlp, _jnp_params(p))
  assert _split(model, params, x) is not None  # the shortcut applies
  for i, baseline in enumerate(["zeros", "mean", "uniform"]):
    per_step = 1 if (i + _ORDERS.index(order)) % 2 == 0 else 3  # each order and each baseline sees both (compiles)
    got = _both_paths(model, x, r, t, params=params, order=order, baseline=baseline, per_step=per_step,
                      key=jax.random.key(5), output_fn=jax.nn.softmax)
    if order != "random" and baseline != "uniform":  # deterministic: the NumPy loop as well
      counts = [min(k * per_step, 7) for k in range(math.ceil(7 / per_step) + 1)]
      want = ref_curve(p, x, r, t, patch=1, order=order, counts=counts, baseline=ref_baseline(x, baseline),
                       output=softmax_np)
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_incremental_image_dense_patches():
  rng = np.random.default_rng(11)
  x = rng.uniform(0, 1, (3, 8, 8, 1)).astype(np.float32)
  r = rng.normal(size=x.shape[:-1]).astype(np.float32)  # a channel-less map
  t = np.array([2, 0, 1])
  p = make_params(64, seed=12)
  assert _split(FlaxMLP().apply, p, x) is not None
  for order, baseline, chunk in [("morf", "blur", None), ("lerf", "mean", 2)]:  # chunk 2: lax.map over the copies
    got = _both_paths(FlaxMLP().apply, x, r, t, params=p, order=order, patch=2, baseline=baseline, chunk_size=chunk)
    want = ref_curve(p, x, r, t, patch=2, order=order, counts=list(range(17)), baseline=ref_baseline(x, baseline))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_incremental_uneven_schedules_and_scan_blocks():
  """Steps of different sizes (`steps` alone), a partial curve (`steps` and `per_step`), and scan blocks that do not
  divide the steps (`chunk_size`): the incremental path against the full model and the NumPy loop."""
  rng = np.random.default_rng(21)
  x = rng.normal(size=(4, 10)).astype(np.float32)
  r = rng.normal(size=x.shape).astype(np.float32)
  t = np.array([0, 1, 2, 1])
  p = make_params(10, seed=22)
  cases = [(dict(steps=4), [0, 2, 5, 7, 10]), (dict(steps=3, per_step=2), [0, 2, 4, 6]),
           (dict(per_step=1, chunk_size=3), list(range(11))), (dict(per_step=4, chunk_size=2), [0, 4, 8, 10])]
  for options, counts in cases:
    got = _both_paths(FlaxMLP().apply, x, r, t, params=p, **options)
    want = ref_curve(p, x, r, t, patch=1, order="morf", counts=counts, baseline=ref_baseline(x, "zeros"))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_a_model_trace_is_reused_only_without_closed_over_arrays():
  """An equal hashable function at the same argument types reuses its trace (flax's `apply`, a new bound method
  on each access); a function that reads arrays from its closure is traced again on every call, so that changed
  arrays are seen."""
  rng = np.random.default_rng(23)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  r = rng.normal(size=x.shape).astype(np.float32)
  t = np.array([0, 1, 2])
  p1, p2 = make_params(6, seed=24), make_params(6, seed=25)
  model = FlaxMLP()
  metrics._TRACES.clear()
  a = metrics.perturbation_curve(model.apply, x, r, t, params=p1)
  b = metrics.perturbation_curve(model.apply, x, r, t, params=p2)
  assert len(metrics._TRACES) == 1  # one trace for both calls: parameters are arguments
  for p, got in ((p1, a), (p2, b)):
    want = ref_curve(p, x, r, t, patch=1, order="morf", counts=list(range(7)), baseline=ref_baseline(x, "zeros"))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  state = {"params": p1}
  closure = lambda xx: model.apply(state["params"], xx)  # noqa: E731
  c1 = metrics.perturbation_curve(closure, x, r, t)
  state["params"] = p2
  c2 = metrics.perturbation_curve(closure, x, r, t)
  assert len(metrics._TRACES) == 1  # the closure over arrays was not cached
  np.testing.assert_allclose(c1, a, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(c2, b, rtol=RTOL, atol=ATOL)


def test_incremental_reads_the_contracting_dimensions():
  # The weight transposed ([H, D]), and an image contracted directly over its (permuted) axes: no reshape.
  rng = np.random.default_rng(13)
  w = rng.normal(size=(4, 7)).astype(np.float32)
  v = rng.normal(size=(4, 4, 2, 3)).astype(np.float32)
  for model, shape in [(lambda p, x: jnp.tanh(jnp.einsum("bi,hi->bh", x, p)), (3, 7)),
                       (lambda p, x: jnp.tanh(jnp.einsum("bhwc,whck->bk", x, p)), (3, 4, 4, 2))]:
    params = w if len(shape) == 2 else v
    x = rng.normal(size=shape).astype(np.float32)
    r = rng.normal(size=shape).astype(np.float32)
    assert _split(model, params, x) is not None
    _both_paths(model, x, r, 1, params=params, baseline="mean", per_step=2)


class FlaxCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))


def test_incremental_falls_back_when_the_pattern_does_not_hold(tabular_case, image_case):
  # The input used twice, and a convolution first: no split, and the curve is that of the NumPy loop.
  p, x, r, t = tabular_case
  q = _jnp_params(p)
  twice = lambda p, x: jnp_mlp(p, x) + x.sum(-1, keepdims=True)  # noqa: E731
  twice_np = lambda p, x: mlp_np({"params": {"Dense_0": {"kernel": p["w1"], "bias": p["b1"]},  # noqa: E731
                                             "Dense_1": {"kernel": p["w2"], "bias": p["b2"]}}}, x) + x.sum(-1)[:, None]
  assert _split(twice, q, x) is None
  got = _both_paths(twice, x, r, t, params=q, per_step=2)
  want = ref_curve(q, x, r, t, patch=1, order="morf", counts=[0, 2, 4, 6, 7], baseline=ref_baseline(x, "zeros"),
                   model=twice_np)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  _, xi, ri, ti = image_case
  cnn = FlaxCNN()
  pc = cnn.init(jax.random.key(0), xi)
  assert _split(cnn.apply, pc, xi) is None
  got = _both_paths(cnn.apply, xi, ri, ti, params=pc, patch=2)
  one_at_a_time = lambda p, x: np.asarray(cnn.apply(p, jnp.asarray(x, jnp.float32)), np.float64)  # noqa: E731
  want = ref_curve(pc, xi, ri, ti, patch=2, order="morf", counts=list(range(10)), baseline=ref_baseline(xi, "zeros"),
                   model=one_at_a_time)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_rank_by_comparison_equals_rank_by_sort(order, monkeypatch):
  """Removal positions: the pairwise count (few regions) and the sort (many) both match a NumPy lexsort, ties
  (including 0.0 and -0.0) broken by the lower index."""
  rng = np.random.default_rng(7)
  scores = rng.integers(-3, 4, size=(4, 40)).astype(np.float32) * 0.5  # many ties
  scores[0, :6] = [0.0, -0.0, 0.0, -0.0, 1.0, -0.0]
  keys = -scores if order == "morf" else scores
  want = np.stack([np.argsort(np.lexsort((np.arange(40), k + 0.0))) for k in keys])  # + 0.0: -0.0 -> 0.0
  want_order = np.argsort(want, axis=-1)
  pairwise = metrics._rank(jnp.asarray(scores), order, None)
  np.testing.assert_array_equal(np.asarray(pairwise), want)
  np.testing.assert_array_equal(np.asarray(metrics._removal_order(jnp.asarray(scores), order, None)), want_order)
  monkeypatch.setattr(metrics, "_PAIRWISE_RANK_MAX", 8)
  for bitonic_max in (0, 64):  # XLA's sort, then (on a CPU) the bitonic network; jitted: eager, it is slow
    monkeypatch.setattr(metrics, "_BITONIC_MAX", bitonic_max)
    rank, removal = jax.jit(lambda s: (metrics._rank(s, order, None), metrics._removal_order(s, order, None)))(
        jnp.asarray(scores))
    np.testing.assert_array_equal(np.asarray(rank), want)
    np.testing.assert_array_equal(np.asarray(removal), want_order)


@pytest.mark.parametrize("n", [1, 3, 64, 100, 1000])
def test_bitonic_argsort_is_a_stable_argsort(n):
  """The bitonic network against NumPy's lexsort (ties by index) on any length, padded or not, with ties and
  infinities."""
  rng = np.random.default_rng(n)
  keys = rng.integers(-5, 6, size=(3, n)).astype(np.float32) * 0.25
  keys[0, : n // 2] = rng.normal(size=n // 2)
  keys[1, ::3] = np.inf
  keys[2, 1::4] = -np.inf
  want = np.stack([np.lexsort((np.arange(n), k)) for k in keys])
  np.testing.assert_array_equal(np.asarray(jax.jit(metrics._bitonic_argsort)(jnp.asarray(keys))), want)
