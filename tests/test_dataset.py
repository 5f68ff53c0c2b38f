"""attribute_dataset: equality with attribute, one compilation, resuming, config checks, sharding over devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

import jaxlrp  # noqa: E402
from jaxlrp import _dataset  # noqa: E402
from jaxlrp._dataset import attribute_dataset  # noqa: E402

RNG = np.random.default_rng(0)
N, D, C = 21, 6, 4
X = RNG.normal(size=(N, D)).astype(np.float32)
X[:, 0] = np.arange(N)  # the first feature names the sample: lets the tests see which batches were computed
LABELS = RNG.integers(0, C, size=N).astype(np.int32)
PARAMS = {"w1": RNG.normal(size=(D, 8)).astype(np.float32) / 3, "b1": np.full(8, 0.1, np.float32),
          "w2": RNG.normal(size=(8, C)).astype(np.float32) / 3, "b2": np.zeros(C, np.float32)}


def mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def cnn(p, x):
  y = jax.lax.conv_general_dilated(x[..., None], p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  return jax.nn.relu(y).mean(axis=1) @ p["w"]


CNN_PARAMS = {"k": RNG.normal(size=(3, 1, 5)).astype(np.float32), "w": RNG.normal(size=(5, C)).astype(np.float32)}


def read(group):
  return {k: group[k][:] for k in ("relevance", "output", "target")}


def run(path, dataset=X, **kw):
  n = len(dataset) if isinstance(dataset, np.ndarray) else N
  kw = {"target": LABELS[:n], "params": PARAMS, "batch_size": 4, "progress": False, **kw}
  return attribute_dataset(mlp, dataset, jaxlrp.EpsilonPlus(), out=str(path), **kw)


def assert_stores_equal(a, b):
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture
def computed(monkeypatch):
  """Records the sample ids of the rows each call of the compiled step computed (one list per batch)."""
  calls = []
  make_step = _dataset._make_step

  def counting(*args):
    step = make_step(*args)

    def wrapped(params, x, target):
      calls.append(np.asarray(x)[:, 0].astype(int).tolist())
      return step(params, x, target)
    wrapped.jitted = step
    return wrapped
  monkeypatch.setattr(_dataset, "_make_step", counting)
  return calls


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_equals_direct_attribute(tmp_path, computed, model):
  f, params, target = (mlp, PARAMS, LABELS) if model == "mlp" else (cnn, CNN_PARAMS, "argmax")
  g = attribute_dataset(f, X, jaxlrp.EpsilonPlus(), target=target, params=params, out=str(tmp_path / "s.zarr"),
                        batch_size=8, progress=False)
  got = read(g)
  assert got["relevance"].shape == (N, D) and got["output"].shape == (N, C) and got["target"].dtype == np.int32
  for s in range(0, N, 8):
    x = X[s:s + 8]
    t = LABELS[s:s + 8] if model == "mlp" else np.argmax(f(params, x), axis=1)
    n = len(x)
    # The last batch (5 rows) runs padded to 8 by repeating its last row; compare with attribute on the same rows.
    res = jaxlrp.attribute(f, np.concatenate([x, np.repeat(x[-1:], 8 - n, 0)]), jaxlrp.EpsilonPlus(),
                           target=np.concatenate([t, np.repeat(t[-1:], 8 - n)]), params=params)
    np.testing.assert_array_equal(got["relevance"][s:s + 8], res.relevance[:n])
    np.testing.assert_array_equal(got["output"][s:s + 8], res.output[:n])
    np.testing.assert_array_equal(got["target"][s:s + 8], res.target[:n])
    # Unpadded, XLA's CPU convolution picks another kernel for 5 rows: equal up to float32 rounding only.
    res = jaxlrp.attribute(f, x, jaxlrp.EpsilonPlus(), target=t, params=params)
    np.testing.assert_allclose(got["relevance"][s:s + 8], res.relevance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["output"][s:s + 8], res.output, rtol=1e-5, atol=1e-6)
  assert [len(c) for c in computed] == [8, 8, 8]  # the last batch padded to the batch size: one shape


def test_one_trace_and_one_compilation(tmp_path, computed, monkeypatch):
  traces, steps = [], []
  attribute, make_step = _dataset.attribute, _dataset._make_step
  monkeypatch.setattr(_dataset, "attribute", lambda *a, **k: traces.append(1) or attribute(*a, **k))
  monkeypatch.setattr(_dataset, "_make_step", lambda *a: steps.append(make_step(*a)) or steps[-1])
  run(tmp_path / "s.zarr")  # six batches, the last one of one row
  assert len(computed) == 6
  assert len(traces) == 1  # attribute runs only while tracing: the later batches and the short one reuse it
  assert steps[-1].jitted._cache_size() == 1  # one entry in the jit cache: one compilation


def test_iterables_of_arrays_tuples_and_dicts(tmp_path):
  ref = read(run(tmp_path / "ref.zarr"))
  batches = [slice(s, s + 4) for s in range(0, N, 4)]
  gen = (X[b] for b in batches)
  assert_stores_equal(read(run(tmp_path / "gen.zarr", gen, batch_size=None)), ref)
  pairs = [(X[b], LABELS[b]) for b in batches]
  assert_stores_equal(read(run(tmp_path / "pairs.zarr", pairs, target="label", batch_size=None)), ref)
  dicts = [{"image": X[b], "label": LABELS[b]} for b in batches]
  g = run(tmp_path / "dicts.zarr", dicts, target="label", keys=("image", "label"), progress=True)
  assert_stores_equal(read(g), ref)
  assert g.attrs["jaxlrp"]["done"] == [[0, 6]] and g.attrs["jaxlrp"]["complete"]
  assert g["relevance"].chunks == (4, D)  # one chunk per batch: writing a batch never touches another


class Interrupted(Exception):
  pass


def batches(stop_after=None):
  for k, s in enumerate(range(0, N, 4)):
    if k == stop_after:
      raise Interrupted(f"data loader died before batch {k}")
    yield X[s:s + 4], LABELS[s:s + 4]


def test_resume_after_interruption_computes_each_batch_once(tmp_path, computed):
  ref = read(run(tmp_path / "ref.zarr", batches(), target="label"))
  computed.clear()
  path = tmp_path / "resumed.zarr"
  with pytest.raises(Interrupted):
    run(path, batches(stop_after=3), target="label")
  g = zarr.open_group(str(path))
  assert g.attrs["jaxlrp"]["done"] == [[0, 3]] and not g.attrs["jaxlrp"]["complete"]
  run(path, batches(), target="label")  # a fresh iterator over the same batches
  assert_stores_equal(read(zarr.open_group(str(path))), ref)
  first_ids = sorted(c[0] for c in computed)
  assert first_ids == list(range(0, N, 4))  # every batch computed exactly once over the two runs
  computed.clear()
  run(path, batches(), target="label")  # a finished store: nothing to compute
  assert computed == []


def test_a_batch_whose_write_failed_is_recomputed(tmp_path, computed, monkeypatch):
  ref = read(run(tmp_path / "ref.zarr"))
  store_rows = _dataset._store_rows

  def failing(arrays, start, rows):
    if start == 8:
      raise OSError("disk full")
    store_rows(arrays, start, rows)
  monkeypatch.setattr(_dataset, "_store_rows", failing)
  path = tmp_path / "s.zarr"
  with pytest.raises(OSError, match="disk full"):
    run(path)
  assert zarr.open_group(str(path)).attrs["jaxlrp"]["done"] == [[0, 2]]  # batch 2 never marked finished
  monkeypatch.setattr(_dataset, "_store_rows", store_rows)
  computed.clear()
  run(path)
  assert_stores_equal(read(zarr.open_group(str(path))), ref)
  assert sorted(c[0] for c in computed) == [8, 12, 16, 20]


def test_mismatched_store_is_refused(tmp_path):
  path = tmp_path / "s.zarr"
  run(path, X[:8])
  with pytest.raises(ValueError, match=r"(?s)different configuration.*batch_size: store has 4, this run has 8"):
    run(path, X[:8], batch_size=8)
  with pytest.raises(ValueError, match=r"composite: store has .Composite.*ZPlus.*this run has .Composite.*AlphaBeta"):
    attribute_dataset(mlp, X[:8], jaxlrp.EpsilonAlpha2Beta1(), target=LABELS[:8], params=PARAMS, out=str(path),
                      batch_size=4, progress=False)
  with pytest.raises(ValueError, match=r"sample_shape: store has \[6\], this run has \[5\]"):
    run(path, X[:8, :5], params={**PARAMS, "w1": PARAMS["w1"][:5]})
  with pytest.raises(ValueError, match="params: store has"):
    run(path, X[:8], params={**PARAMS, "b2": PARAMS["b2"] + 1})
  g = run(path, X[:8], batch_size=8, overwrite=True)
  assert g.attrs["jaxlrp"]["config"]["batch_size"] == 8


def test_input_errors(tmp_path):
  with pytest.raises(ValueError, match="batch_size is required"):
    run(tmp_path / "a.zarr", batch_size=None)
  with pytest.raises(ValueError, match="only the last batch may be smaller"):
    run(tmp_path / "b.zarr", [X[:4], X[4:6], X[6:10]], batch_size=None)
  with pytest.raises(ValueError, match="target='label' takes the class"):
    run(tmp_path / "c.zarr", target="label")
  with pytest.raises(ValueError, match=r"not divisible by the 3 devices.*multiple of 3 \(e.g. 3 or 6\)"):
    run(tmp_path / "d.zarr", devices=jax.local_devices() * 3)


SHARDED = """
import json, sys
import numpy as np, jax, jaxlrp
sys.path.insert(0, {tests!r})
import test_dataset as t
from jaxlrp import _dataset
from jaxlrp._dataset import attribute_dataset
seen = []
make_step = _dataset._make_step
def spy(*a):
  step = make_step(*a)
  def wrapped(p, x, tgt):
    seen.append(len(x.sharding.device_set))
    return step(p, x, tgt)
  return wrapped
_dataset._make_step = spy
attribute_dataset(t.mlp, t.X, jaxlrp.EpsilonPlus(), target=t.LABELS, params=t.PARAMS, out={out!r}, batch_size=8,
                  progress=False)
try:
  attribute_dataset(t.mlp, t.X, jaxlrp.EpsilonPlus(), target=0, params=t.PARAMS, out={out!r} + "2", batch_size=6)
except ValueError as e:
  err = str(e)
print(json.dumps({{"devices": jax.local_device_count(), "shards": seen, "error": err}}))
"""


def test_sharded_over_four_devices_equals_single_device(tmp_path):
  out = str(tmp_path / "sharded.zarr")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(jaxlrp.__file__)),
                                        os.environ.get("PYTHONPATH", "")])}
  script = textwrap.dedent(SHARDED.format(tests=os.path.dirname(__file__), out=out))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["devices"] == 4 and info["shards"] == [4, 4, 4]  # every batch split over the 4 devices
  assert "batch_size=6 is not divisible by the 4 devices" in info["error"]
  single = read(run(tmp_path / "single.zarr", batch_size=8))
  assert_stores_equal(read(zarr.open_group(out)), single)


KILLED = """
import os, signal, sys
import jaxlrp
sys.path.insert(0, {tests!r})
import test_dataset as t
def killed_after(k):
  for i, b in enumerate(t.batches()):
    if i == k:
      os.kill(os.getpid(), signal.SIGKILL)  # no exception handler runs: as a power cut for the process
    yield b
t.run({out!r}, killed_after(4), target="label")
"""


def test_resume_after_the_process_is_killed(tmp_path, computed):
  ref = read(run(tmp_path / "ref.zarr", batches(), target="label"))
  out = str(tmp_path / "killed.zarr")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(jaxlrp.__file__)),
                                                      os.environ.get("PYTHONPATH", "")])}
  script = textwrap.dedent(KILLED.format(tests=os.path.dirname(__file__), out=out))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr
  done = zarr.open_group(out).attrs["jaxlrp"]["done"]
  assert done == [[0, 3]]  # batch 3 was computed but not yet written when the process died: not marked
  computed.clear()
  run(out, batches(), target="label")
  assert sorted(c[0] for c in computed) == [12, 16, 20]
  assert_stores_equal(read(zarr.open_group(out)), ref)
