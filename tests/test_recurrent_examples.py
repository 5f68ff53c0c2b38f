"""The recurrent examples recover what was planted: LRP's top-relevance position is the planted token (an LSTM on
token embeddings) or lies inside the implanted DNA motif (a conv + LSTM net) on >= 95% of >= 200 held-out, correctly
classified positives. Quick mode (a shorter training run); each example also writes its PNG."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repository root: examples.*
from examples import dna_motif, planted_signal  # noqa: E402


def test_planted_signal_lrp_finds_the_planted_token(tmp_path):
  out = tmp_path / "planted_signal.png"
  res = planted_signal.main(["--quick", "--out", str(out)])
  assert res["accuracy"] >= 0.95
  assert res["explained"] >= 200
  assert res["lrp"] >= 0.95
  assert 0.0 <= res["grad_x_input"] <= 1.0
  assert out.stat().st_size > 1000


def test_dna_motif_lrp_finds_the_motif(tmp_path):
  out = tmp_path / "dna_motif.png"
  res = dna_motif.main(["--quick", "--out", str(out)])
  assert res["accuracy"] >= 0.9
  assert res["explained"] >= 200
  assert res["EpsilonPlus"] >= 0.95
  assert res["EpsilonGammaBox"] >= 0.95
  assert 0.0 <= res["gradient x input"] <= 1.0
  assert out.stat().st_size > 1000
