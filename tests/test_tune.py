"""jaxlrp.tune against a plain loop: each candidate explained with jaxlrp.attribute and scored by the metric, one
call at a time. Checks grid and random search, structurally different candidates, the best candidate, and the
argument errors, on a tiny linen CNN (two 3x3 convolutions and a dense head on 6x6 inputs)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlrp
from jaxlrp import metrics

RTOL, ATOL = 1e-5, 1e-6


class TinyCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def case():
  model = TinyCNN()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(8, 6, 6, 1)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # NumPy weights: XLA compiles threefry slowly on CPU
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.5, size=s.shape), jnp.float32), shapes)
  target = np.asarray(model.apply(params, x).argmax(-1))
  return model.apply, params, x, target


def aopc8(m, x, r, t):
  return metrics.aopc(m, x, r, t, steps=8)


def loop_scores(f, params, x, target, methods, metric=aopc8):
  """The reference: one attribute call and one metric call per candidate."""
  rows = []
  for method in methods:
    r = jaxlrp.attribute(f, x, method, target=target, params=params).relevance
    rows.append(np.asarray(metric(lambda xx: f(params, xx), x, r, target)))
  return np.stack(rows)


def gamma_box(gamma, epsilon=1e-6):
  return jaxlrp.EpsilonGammaBox(low=0.0, high=1.0, gamma=gamma, epsilon=epsilon)


def test_grid_search_equals_the_loop_and_picks_the_argmax(case):
  f, params, x, target = case
  grid = {"gamma": [0.0, 0.1, 0.5, 2.0], "epsilon": [1e-6, 0.1]}
  res = jaxlrp.tune(f, x, gamma_box, grid=grid, target=target, params=params, metric=aopc8)
  points = [(g, e) for g in grid["gamma"] for e in grid["epsilon"]]  # itertools.product order
  assert res.values == {"gamma": [g for g, _ in points], "epsilon": [e for _, e in points]}
  assert res.structures == 1  # one vmapped program for all 8 candidates
  expected = loop_scores(f, params, x, target, [gamma_box(g, e) for g, e in points])
  np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(res.mean, expected.mean(1), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(res.stderr, expected.std(1, ddof=1) / np.sqrt(len(x)), rtol=1e-4, atol=ATOL)
  assert np.ptp(res.mean) > 1e-4  # the candidates differ: the check below is not a tie
  assert res.best_index == int(np.argmax(expected.mean(1)))
  assert res.best == gamma_box(*points[res.best_index])
  assert res.best.pairs[1][1].gamma == res.best_values["gamma"]
  assert res.table().count("\n") == len(points) + 1


def test_minimising_selectivity_and_chunks(case):
  f, params, x, target = case
  sel = lambda m, xx, r, t: metrics.selectivity(m, xx, r, t, steps=8)  # noqa: E731 - lower is better
  grid = {"gamma": [0.0, 0.25, 1.0]}
  res = jaxlrp.tune(f, x, gamma_box, grid=grid, target=target, params=params, metric=sel, maximize=False,
                    chunk_size=2)  # lax.map over chunks of 2 candidates
  expected = loop_scores(f, params, x, target, [gamma_box(g) for g in grid["gamma"]], sel)
  np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=ATOL)
  assert res.best_index == int(np.argmin(expected.mean(1)))


def test_random_search(case):
  f, params, x, target = case
  grid = {"gamma": lambda k: jax.random.uniform(k, maxval=2.0),
          "epsilon": [1e-6, 1e-2, 0.5]}
  res = jaxlrp.tune(f, x, gamma_box, grid=grid, samples=5, key=jax.random.key(3), target=target, params=params,
                    metric=aopc8)
  gammas, epsilons = res.values["gamma"], res.values["epsilon"]
  assert len(gammas) == 5 and all(isinstance(g, float) and 0.0 <= g < 2.0 for g in gammas)
  assert len(set(gammas)) == 5 and set(epsilons) <= {1e-6, 1e-2, 0.5}
  expected = loop_scores(f, params, x, target, [gamma_box(g, e) for g, e in zip(gammas, epsilons)])
  np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=ATOL)
  again = jaxlrp.tune(f, x, gamma_box, grid=grid, samples=5, key=jax.random.key(3), target=target, params=params,
                      metric=aopc8)
  assert again.values == res.values  # the key decides the draws


def test_structural_candidates_one_program_per_structure(case):
  f, params, x, target = case
  eps = ("dense", jaxlrp.Epsilon())

  def layers(gamma_on, gamma=0.25):
    """Gamma on the conv layers matched by `gamma_on`, Epsilon on the others."""
    return jaxlrp.Composite(eps, ("conv", jaxlrp.Epsilon()), (jaxlrp.Path(gamma_on), jaxlrp.Gamma(gamma)))

  candidates = [layers("params/Conv_0"), layers("params/Conv_*"), layers("params/Conv_0", 1.0),
                jaxlrp.Composite(eps, ("conv", jaxlrp.ZPlus())), layers("params/Conv_*", 1.0)]
  res = jaxlrp.tune(f, x, candidates, target=target, params=params, metric=aopc8)
  assert res.structures == 3 and res.values == {}
  expected = loop_scores(f, params, x, target, candidates)
  np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=ATOL)
  assert res.best_index == int(np.argmax(expected.mean(1)))
  # the same through a candidate function whose grid changes the structure
  grid = {"gamma_on": ["params/Conv_0", "params/Conv_*"], "gamma": [0.25, 1.0]}
  res2 = jaxlrp.tune(f, x, layers, grid=grid, target=target, params=params, metric=aopc8)
  assert res2.structures == 2
  np.testing.assert_allclose(res2.scores, expected[[0, 2, 1, 4]], rtol=RTOL, atol=ATOL)


def test_repeated_candidates_and_attributors(case):
  f, params, x, target = case
  same = [jaxlrp.EpsilonPlusFlat(), jaxlrp.EpsilonPlusFlat()]  # no leaf varies: a batch of identical candidates
  res = jaxlrp.tune(f, x, same, target=target, params=params, metric=aopc8)
  np.testing.assert_allclose(res.scores, loop_scores(f, params, x, target, same), rtol=RTOL, atol=ATOL)
  ig = lambda baseline: jaxlrp.IntegratedGradients(baseline, steps=4)  # noqa: E731 - an attributor's leaf
  res = jaxlrp.tune(f, x, ig, grid={"baseline": [0.0, 0.5]}, target=target, params=params, metric=aopc8)
  expected = loop_scores(f, params, x, target, [ig(0.0), ig(0.5)])
  np.testing.assert_allclose(res.scores, expected, rtol=RTOL, atol=ATOL)


def test_default_metric_is_aopc_morf_16_steps(case):
  f, params, x, target = case
  res = jaxlrp.tune(f, x, [jaxlrp.EpsilonPlusFlat()], target=target, params=params)
  r = jaxlrp.attribute(f, x, jaxlrp.EpsilonPlusFlat(), target=target, params=params).relevance
  np.testing.assert_allclose(res.scores[0], metrics.aopc(f, x, r, target, params=params, steps=16), rtol=RTOL,
                             atol=ATOL)


def test_errors(case):
  f, params, x, target = case
  kw = dict(target=target, params=params, metric=aopc8)
  with pytest.raises(ValueError, match=r"grid\['gamma'\] must be one-dimensional .* shape \(2, 2\)"):
    jaxlrp.tune(f, x, gamma_box, grid={"gamma": np.zeros((2, 2))}, **kw)
  with pytest.raises(ValueError, match=r"grid\['gamma'\] must be a non-empty sequence"):
    jaxlrp.tune(f, x, gamma_box, grid={"gamma": 0.25}, **kw)
  with pytest.raises(ValueError, match=r"grid\['gamma'\] is empty"):
    jaxlrp.tune(f, x, gamma_box, grid={"gamma": []}, **kw)
  with pytest.raises(ValueError, match="only a random search"):
    jaxlrp.tune(f, x, gamma_box, grid={"gamma": lambda k: 0.5}, **kw)
  with pytest.raises(TypeError, match="named like the grid's keys"):
    jaxlrp.tune(f, x, gamma_box, grid={"gama": [0.1]}, **kw)
  with pytest.raises(ValueError, match="needs key"):
    jaxlrp.tune(f, x, gamma_box, grid={"gamma": [0.1]}, samples=3, **kw)
  with pytest.raises(ValueError, match="pass grid="):
    jaxlrp.tune(f, x, gamma_box, **kw)
  with pytest.raises(ValueError, match="go with a candidate function"):
    jaxlrp.tune(f, x, [jaxlrp.EpsilonPlus()], grid={"gamma": [0.1]}, **kw)
  with pytest.raises(TypeError, match=r"candidates\[1\] must be a jaxlrp.Composite"):
    jaxlrp.tune(f, x, [jaxlrp.EpsilonPlus(), jaxlrp.Gamma()], **kw)
  with pytest.raises(TypeError, match="non-empty list"):
    jaxlrp.tune(f, x, [], **kw)
  with pytest.raises(ValueError, match=r"shape \(8,\)"):
    jaxlrp.tune(f, x, [jaxlrp.EpsilonPlus()], target=target[:3], params=params, metric=aopc8)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    jaxlrp.tune(f, x, [jaxlrp.EpsilonPlus()], target=5, params=params, metric=aopc8)
  curve = lambda m, xx, r, t: metrics.perturbation_curve(m, xx, r, t, steps=4)  # noqa: E731 - [B, 5], not [B]
  with pytest.raises(ValueError, match=r"metric must return one floating score per sample, shape \(8,\).*\(8, 5\)"):
    jaxlrp.tune(f, x, [jaxlrp.EpsilonPlus()], target=target, params=params, metric=curve)
