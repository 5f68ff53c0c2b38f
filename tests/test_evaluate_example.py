"""examples/evaluate.py in quick mode (shorter training, 200 evaluation digits, fewer methods): on the digits, under
the example's main perturbation baseline (each image's mean), AOPC(MoRF) orders EpsilonPlusFlat and EpsilonGammaBox
above the gradient and the gradient above random relevance, as paired differences over the same images with a
margin; MPRT similarities fall far below 1 once the top layer is randomised; the gamma that jaxlrp.tune picks on the
tuning split scores at least as well as the default on the evaluation split; the PNG and the Markdown table are
written."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root: examples.*
from examples import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("evaluate")
  return evaluate.main(["--quick", "--out-dir", str(out)]), out


def test_aopc_morf_orders_lrp_above_gradient_above_random(quick):
  res, _ = quick
  assert res["n_eval"]["digits"] >= 200
  checks = {label: (m, se) for label, m, se in res["ordering"]["digits"]}
  assert set(checks) == {"EpsilonPlusFlat - Gradient", "EpsilonGammaBox - Gradient", "Gradient - random"}
  for label in ("EpsilonPlusFlat - Gradient", "EpsilonGammaBox - Gradient"):
    m, se = checks[label]
    assert m > 1.0 and m > 5 * se, (label, m, se)  # logit units; the scores start near 20
  m, se = checks["Gradient - random"]
  assert m > 2 * se, (m, se)
  # the paired differences are differences of the per-method means
  aopc = res["aopc_morf"]["digits"]
  np.testing.assert_allclose(checks["EpsilonGammaBox - Gradient"][0],
                             aopc["EpsilonGammaBox"][0] - aopc["Gradient"][0], rtol=1e-6, atol=1e-6)


def test_mprt_relevance_changes_as_layers_are_randomised(quick):
  res, _ = quick
  assert set(res["mprt"]) == {"EpsilonGammaBox"}
  for name, similarity in res["mprt"].items():
    assert similarity.shape == (4,)  # Dense_1, Dense_0, Conv_1, Conv_0
    assert np.all(np.abs(similarity) < 0.5), (name, similarity)  # 1.0 would be an unchanged explanation


def test_tuned_gamma_at_least_as_good_as_default_on_held_out_split(quick):
  res, _ = quick
  for name in ("digits", "breast cancer"):
    tn = res["tune"][name]
    result = tn["result"]
    assert result.best_index == int(np.argmax(result.mean))
    assert tn["tune_scores"].shape[0] == len(tn["values"]) == tn["eval_scores"].shape[0]
    mean, _ = tn["eval_diff"]
    assert mean >= 0.0, (name, tn["chosen"], tn["default"], mean)
    np.testing.assert_allclose(mean, tn["eval_scores"][tn["chosen_index"]].mean()
                               - tn["eval_scores"][tn["default_index"]].mean(), rtol=1e-5, atol=1e-6)


def test_files_are_written(quick):
  res, out = quick
  assert res["plot"] == out / "evaluate_curves.png" and res["table"] == out / "evaluate.md"
  assert res["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["plot"].stat().st_size > 20_000
  table = res["table"].read_text()
  assert "| EpsilonGammaBox |" in table and "| random |" in table and "Tuned gamma" in table
