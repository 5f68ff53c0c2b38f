"""The transformer examples end to end, in quick mode: a ViT on 8x8 digits (``examples/vit.py``) and a GPT-style
causal LM on associative recall (``examples/gpt.py``), both explained with AttnLRP and CP-LRP.

Thresholds were measured on a 2-core CPU (JAX 0.10.2): ViT quick mode reaches 84 % test accuracy, and zeroing the
4 most relevant pixels lowers the logit 3.4x (AttnLRP), 2.6x (CP-LRP) and 3.0x (AttnLRP+Gamma) as much as zeroing
4 random ink pixels (median relevance sum / logit 0.20, 0.48, 0.21); in the GPT's quick mode (seeds 0-2) the most
relevant token is the fact holding the answer in 93-98 % of 256 held-out sequences with AttnLRP and CP-LRP
(gradient x input: 9-12 %).
"""

import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root: examples.*
from examples import gpt, vit  # noqa: E402

ATTENTION_KINDS = {"bilinear": 2, "softmax": 2, "gate": 2, "norm": 5}  # two blocks: 2 LayerNorms each + final


def _count(rows, kind):
  return sum(r.kind == kind for r in rows)


def test_vit_example(tmp_path):
  out = vit.main(["--quick", "--out", str(tmp_path / "vit.png")])
  assert (tmp_path / "vit.png").stat().st_size > 1000
  assert out["accuracy"] > 0.75
  rows = out["rules"]
  assert {k: _count(rows, k) for k in ATTENTION_KINDS} == ATTENTION_KINDS
  assert _count(rows, "conv") == 1 and _count(rows, "dense") == 13  # patches; q, k, v, out, 2 MLP per block; head
  assert all(r.rule is not None for r in rows)
  blank = out["x"] == 0
  for name, res in out["results"].items():
    relevance = res["relevance"]
    assert np.isfinite(relevance).all(), name
    # The first layer sees the pixels, so blank pixels get exactly nothing.
    assert np.all(relevance[blank] == 0), name
    # Faithfulness: removing the most relevant pixels hurts the explained logit far more than random ink pixels.
    assert res["flip_top"] > 1.5 * res["flip_random"] > 0, (name, res["flip_top"], res["flip_random"])
    # Biases, the CLS token and LayerNorm shifts absorb part of the logit, but the sign and scale are kept.
    assert 0.05 < np.median(res["ratio"]) < 1.5, name


def test_gpt_example(tmp_path):
  out = gpt.main(["--quick", "--out", str(tmp_path / "gpt.html"), "--png", str(tmp_path / "gpt.png")])
  page = (tmp_path / "gpt.html").read_text(encoding="utf-8")
  assert page.startswith("<!DOCTYPE html>") and page.count('class="jaxlrp-text-heatmap"') == 6
  assert (tmp_path / "gpt.png").stat().st_size > 1000
  assert out["accuracy"] > 0.95
  assert {k: _count(out["rules"], k) for k in ATTENTION_KINDS} == ATTENTION_KINDS
  relevance, source = out["relevance"], out["source"]
  assert relevance.shape == (256, gpt.LENGTH) and np.isfinite(relevance).all()
  # The most relevant token is the fact that holds the answer (measured 93-98 %), far above chance (1/8) and
  # gradient x input (about 10 %).
  assert out["hits"] >= 0.85 and out["cp_hits"] >= 0.85, (out["hits"], out["cp_hits"])
  assert out["gi_hits"] < out["hits"] - 0.3
  # The heatmaps show the explained sequences' tokens and relevance.
  first = out["heatmaps"][0]
  assert first.tokens == tuple(gpt.tokens(gpt.sample(np.random.default_rng(1), 256)[0][0]))
  np.testing.assert_allclose(first.relevance, relevance[0], rtol=1e-6)
