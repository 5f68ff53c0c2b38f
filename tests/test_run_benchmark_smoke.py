"""Smoke test of ``benchmarks/run.py`` (the benchmark entry point) on tiny shapes, one round, without Zennit/LXT:
the JSON, Markdown and PNG are written with the expected workloads, methods and rows, the ratios are numbers and
each figure is marked against its goal as the goal says. Plus the pieces with an independent reference: workload
selection, the goal bookkeeping on hand-made timings, and the torch VGG twin (``torch_models.TorchVGG``, the Zennit
side of the VGG-16 workloads) against the linen VGG on the same weights. The benchmark makes no timing assertions."""

import json
import math
import pathlib
import re
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import run  # noqa: E402

CNN_METHODS = ["forward", "grad", "Epsilon", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"]
LSTM_METHODS = ["forward", "grad", "Epsilon", "Gamma", "Alpha2Beta1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "run"
  report = run.main(["--tiny", "--only", "vgg16,lstm", "--no-compare", "--repeats", "1", "--min-seconds", "0",
                     "--quiet", "--out", str(out)])
  return report, out


def test_workload_selection():
  all_ = run.workloads((1, 8, 32))
  assert [w.key for w in all_] == ["vgg16-b1", "vgg16-b8", "vgg16-b32", "resnet50-b1", "resnet50-b8", "resnet50-b32",
                                   "minilm-b8-l128", "lstm-b8-t128"]
  assert all(w.size == 224 for w in all_[:6]) and (all_[6].size, all_[7].size) == (128, 128)
  picked = run.select(all_, ("resnet50", "minilm-b8-l128"))
  assert [w.key for w in picked] == ["resnet50-b1", "resnet50-b8", "resnet50-b32", "minilm-b8-l128"]
  assert [w.key for w in run.select(all_, ("vgg16-b8",))] == ["vgg16-b8"]
  with pytest.raises(ValueError, match="unknown workloads"):
    run.select(all_, ("vgg19",))
  args = run.parse_args(["--quick", "--out", "/dev/null/x"])
  assert [w.key for w in args.workloads] == ["vgg16-b1", "resnet50-b1", "minilm-b8-l128", "lstm-b8-t128"]
  assert args.repeats == 3
  # Fast workloads get more rounds: enough to fill min_seconds, at most 50, never fewer than asked for.
  assert run.rounds_for(7, 20.0, 0.5) == 40 and run.rounds_for(7, 20.0, 10.0) == 7
  assert run.rounds_for(3, 20.0, 0.1) == 50 and run.rounds_for(7, 0.0, 0.01) == 7


def test_goal_bookkeeping_on_hand_made_timings():
  mem = lambda total: {"memory_bytes": {"total": total}}  # noqa: E731
  results = {"grad": mem(100), "Epsilon": mem(140), "EpsilonPlusFlat": mem(120), "Gamma": mem(90)}
  times = {"grad": [1.0, 2.0, 3.0], "Epsilon": [2.3, 2.1, 2.2], "EpsilonPlusFlat": [2.9, 3.0, 5.0],
           "Gamma": [9.0, 9.0, 9.0]}
  run.finish_results(results, times, {k: list(v) for k, v in times.items()})
  # medians: grad 2.0, Epsilon 2.2 (1.10x: at its goal), EpsilonPlusFlat 3.0 (1.5x: at its goal), Gamma 4.5x (no goal)
  assert results["Epsilon"]["ratio"] == pytest.approx(1.1) and results["Epsilon"]["within_time_goal"] is True
  assert results["EpsilonPlusFlat"]["ratio"] == pytest.approx(1.5)
  assert results["EpsilonPlusFlat"]["max_s"] == 5.0 and results["EpsilonPlusFlat"]["within_time_goal"] is True
  assert results["Gamma"]["time_goal"] is None and results["Gamma"]["within_time_goal"] is None
  assert results["Epsilon"]["memory_ratio"] == 1.4 and results["Epsilon"]["within_memory_goal"] is False
  assert results["Gamma"]["within_memory_goal"] is True and results["grad"]["within_memory_goal"] is None
  reference = {"results": {"grad": {"median_s": 1.0, "ratio": 1.0}, "Epsilon": {"median_s": 4.4, "ratio": 4.4},
                           "EpsilonPlusFlat": {"median_s": 2.0, "ratio": 2.0}}}
  run.compare_with_reference(results, reference)
  assert results["Epsilon"]["speedup_vs_reference"] == pytest.approx(2.0)
  assert results["Epsilon"]["faster_than_reference"] is True
  assert results["EpsilonPlusFlat"]["faster_than_reference"] is False
  assert "faster_than_reference" not in results["grad"] and "speedup_vs_reference" not in results["Gamma"]


def test_outputs_written_with_expected_rows(tiny_run):
  report, out = tiny_run
  saved = json.loads(out.with_suffix(".json").read_text())
  assert list(saved["workloads"]) == ["vgg16-b2", "lstm-b2-t6"]
  assert saved["machine"]["platform"] and saved["machine"]["device_kind"]
  vgg, lstm = saved["workloads"]["vgg16-b2"], saved["workloads"]["lstm-b2-t6"]
  # EpsilonPlusFlat on the LSTM is timed where the core places Flat inside the scan body, else listed as n/a.
  flat_timed = "EpsilonPlusFlat" in lstm["results"]
  assert list(vgg["results"]) == CNN_METHODS
  assert list(lstm["results"]) == LSTM_METHODS + (["EpsilonPlusFlat"] if flat_timed else [])
  assert vgg["reference"] is None and vgg["reference_skipped"] == "--no-compare"
  for part in (vgg, lstm):
    for name, r in part["results"].items():
      assert len(r["times_s"]) == part["rounds"] == 1 and r["median_s"] > 0, name
      assert math.isfinite(r["ratio"]) and math.isfinite(r["memory_ratio"]) and r["compile_s"] >= 0, name
      if r["time_goal"] is not None:
        assert r["within_time_goal"] == (r["ratio"] <= r["time_goal"]), name
      if name not in ("forward", "grad"):
        assert r["sanity"]["finite"] and r["within_memory_goal"] == (r["memory_ratio"] <= 1.3), name
    assert part["results"]["grad"]["ratio"] == 1.0
  assert vgg["results"]["EpsilonGammaBox"]["time_goal"] == 2.0 and lstm["results"]["Epsilon"]["time_goal"] == 1.1
  # On the dense-only LSTM the non-Flat presets put Epsilon on every layer: the same rules as Epsilon.
  assert lstm["same_rules_as"] == {"EpsilonPlus": "Epsilon", "EpsilonGammaBox": "Epsilon",
                                   "EpsilonAlpha2Beta1": "Epsilon"}
  if flat_timed:
    assert lstm["different"] == ["EpsilonPlusFlat"] and not lstm["not_applicable"]
    assert lstm["results"]["EpsilonPlusFlat"]["time_goal"] == 1.5
  else:
    assert list(lstm["not_applicable"]) == ["EpsilonPlusFlat"]
    assert lstm["not_applicable"]["EpsilonPlusFlat"].startswith("RulePlacementError")

  md = out.with_suffix(".md").read_text()
  assert md.strip() == report["markdown"].strip()
  table = _table_after(md, "| time / grad |")
  assert table["header"] == ["VGG-16 b2, 32px", "LSTM b2, 6 steps"]
  rows = table["rows"]
  assert list(rows) == ["forward", "Epsilon", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "Gamma",
                        "Alpha2Beta1", "EpsilonPlus"]
  assert rows["EpsilonGammaBox"][1] == "= Epsilon" and (flat_timed or rows["EpsilonPlusFlat"][1] == "n/a")
  assert rows["EpsilonPlus"] == ["", "= Epsilon"] and rows["Gamma"][0] == ""
  for name, cells in rows.items():
    for cell, part in zip(cells, (vgg, lstm)):
      if name not in part["results"]:
        continue
      m = re.fullmatch(r"(\d+\.\d\d)x( ok| \*\*over\*\*)?", cell)
      assert m, (name, cell)
      r = part["results"][name]
      assert float(m.group(1)) == pytest.approx(r["ratio"], abs=0.006)
      assert (m.group(2) or "") == ("" if r["time_goal"] is None else (" ok" if r["within_time_goal"] else " **over**"))
  assert "| memory / grad |" in md and "Details:" in md and "| VGG-16 b2, 32px | EpsilonAlpha2Beta1 |" in md

  png = out.with_suffix(".png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  # --render rewrites the tables and the plot from the JSON alone.
  out.with_suffix(".md").unlink()
  out.with_suffix(".png").unlink()
  run.main(["--render", str(out.with_suffix(".json")), "--quiet"])
  assert out.with_suffix(".md").read_text() == md and out.with_suffix(".png").exists()


def _table_after(md: str, head: str) -> dict:
  lines = md[md.index(head):].split("\n")
  header = [c.strip() for c in lines[0].strip("|").split("|")][1:]
  rows = {}
  for line in lines[2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return {"header": header, "rows": rows}


def test_torch_vgg_twin_computes_the_linen_vgg():
  torch = pytest.importorskip("torch")
  import jax

  from benchmarks import models, torch_models

  model = models.VGG(features=(4, "M", 8, "M"), hidden=(16,), num_classes=5)
  variables, x = models.init(model, 3, batch=2, size=32)
  twin = torch_models.build_twin({"model": "vgg", "features": [4, "M", 8, "M"], "hidden": [16], "size": 32},
                                 jax.tree_util.tree_map(np.asarray, variables), num_classes=5)
  with torch.no_grad():
    out = twin(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
  expected = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
