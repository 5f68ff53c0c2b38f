"""`attribute_dataset`: explain a whole data set batch by batch into a resumable zarr store.

The store is a zarr v3 group holding three arrays with the sample axis first: `relevance` (like the inputs),
`output` (`[N, classes]`) and `target` (`[N]`), plus a `jaxlrp` attribute with the run's configuration and the
indices of finished batches. Why zarr v3:

- chunked and resizable: each batch lands in its own chunk files, so writing batch i never rewrites batch j, and
  the arrays grow as batches arrive from an iterable of unknown length;
- append- and resume-friendly: chunks are separate objects and metadata writes are atomic (write and rename), so
  a killed run leaves whole batches or batches not marked finished, never a corrupt file;
- a well-kept open standard that xarray, dask, NumPy users (`zarr.open_group(path)["relevance"][:]`) and other
  languages read directly, on local disk or object stores.

HDF5 (h5py) keeps everything in one file behind a file lock: one writer at a time, a crash mid-write can corrupt
the whole file, and it is awkward on object stores. TensorStore writes zarr too and is faster for huge parallel
writes, but it is a heavier dependency with a lower-level API; zarr-python is the reference implementation.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlrp._attribute import attribute
from jaxlrp._composites import Composite
from jaxlrp._core import with_array_params

__all__ = ["attribute_dataset"]

_FORMAT = 1
_ARRAYS = ("relevance", "output", "target")
_CHUNK_BYTES = 1 << 24  # 16 MiB chunks: large enough for fast reads, small enough to write without copies piling up


def _import_zarr():
  try:
    import zarr
  except ImportError as e:
    raise ImportError("attribute_dataset writes a zarr v3 store and needs zarr>=3 (Python>=3.11): "
                      "pip install 'jaxlrp[dataset]' (or pip install zarr tqdm).") from e
  if int(zarr.__version__.split(".")[0]) < 3:
    raise ImportError(f"attribute_dataset needs zarr>=3 (the v3 format); found zarr {zarr.__version__}.")
  return zarr


def _progress_bar(progress, total, initial):
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError as e:
    raise ImportError("progress=True needs tqdm: pip install 'jaxlrp[dataset]', or pass progress=False.") from e
  return tqdm(total=total, initial=initial, unit="batch", desc="attribute_dataset")


def _fingerprint(params) -> str | None:
  """A hash of the parameter values and tree, so that resuming with other weights is refused."""
  if params is None:
    return None
  leaves, tree = jax.tree_util.tree_flatten(params)
  h = hashlib.sha256(str(tree).encode())
  for leaf in leaves:
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def _composite_key(composite) -> str:
  # Object addresses (a predicate without a name, say) differ between processes but not between configurations.
  return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(composite))


def _target_key(target) -> str:
  if isinstance(target, str):
    return target
  if isinstance(target, (int, np.integer)):
    return f"class {int(target)}"
  a = np.asarray(target)
  return f"array{a.shape} sha256:{hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]}"


def _check_target_spec(target, is_array_dataset, n_rows):
  if isinstance(target, str):
    if target not in ("argmax", "label"):
      raise ValueError(f"target must be an int, an int array with one class per sample, 'argmax' (explain the "
                       f"predicted class) or 'label' (take it from each batch); got {target!r}.")
    if target == "label" and is_array_dataset:
      raise ValueError("target='label' takes the class from each batch's (x, label) pair or dict, but the data set "
                       "is a plain array; pass the labels as target=labels (one int per sample).")
    return target
  if isinstance(target, (int, np.integer)):
    return int(target)
  a = np.asarray(target)
  if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"target must be an int, 'argmax', 'label' or a 1-D int array with one class per sample; got "
                     f"an array of shape {a.shape} and dtype {a.dtype}.")
  if n_rows is not None and len(a) != n_rows:
    raise ValueError(f"target has {len(a)} entries but the data set has {n_rows} samples.")
  return a.astype(np.int32)


def _split(item, keys):
  """(x, label or None) from a batch: an array, an (x, label, ...) tuple or list, or a dict."""
  if isinstance(item, Mapping):
    if keys[0] not in item:
      raise KeyError(f"A dict batch has no input key {keys[0]!r} (its keys: {sorted(item)}); pass keys=(input_key, "
                     f"label_key), e.g. keys=('image', 'label').")
    return np.asarray(item[keys[0]]), (np.asarray(item[keys[1]]) if keys[1] in item else None)
  if isinstance(item, (tuple, list)):
    return np.asarray(item[0]), (np.asarray(item[1]) if len(item) > 1 else None)
  return np.asarray(item), None


def _pad(a, size):
  # Repeat the last row: real data keeps the padded rows' numerics ordinary (zeros could hit a stabiliser corner).
  n = a.shape[0]
  return a if n == size else np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])


def _chunk_rows(batch_size, row_bytes):
  # A divisor of the batch size, so that no chunk is shared by two batches (no read-modify-write across batches).
  fits = max(1, _CHUNK_BYTES // max(row_bytes, 1))
  return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fits)


def _intervals_add(intervals, i):
  """Adds batch i to sorted, disjoint [start, stop) intervals (compact: a sequential run is one interval)."""
  out = sorted([*map(list, intervals), [i, i + 1]])
  merged = [out[0]]
  for a, b in out[1:]:
    if a <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], b)
    else:
      merged.append([a, b])
  return merged


def _make_step(f, composite, has_params, argmax, strict):
  """One jitted function of (params, x, target), traced and compiled once for the fixed padded batch shape.

  It is exactly `attribute`'s program, so results equal direct `attribute` calls bit for bit. With `argmax` the
  target comes from a separately jitted forward: fusing that forward into the attribution changes XLA's fusion
  choices and with them the output's last bits.
  """
  attribution = jax.jit(lambda params, x, target: _attribution(f, composite, has_params, strict, params, x, target))
  if not argmax:
    return attribution
  forward = jax.jit(lambda params, x: jnp.argmax(f(params, x) if has_params else f(x), axis=-1).astype(jnp.int32))
  return lambda params, x, target: attribution(params, x, forward(params, x))  # no host round trip between them


def _attribution(f, composite, has_params, strict, params, x, target):
  res = attribute(f, x, composite, target=target, params=params if has_params else None, strict=strict)
  return res.relevance, res.output, res.target.astype(jnp.int32)


def _store_rows(arrays, start, rows):
  """Writes one batch's rows; returns only once zarr has stored every chunk (the synchronous API blocks)."""
  stop = start + rows[0].shape[0]
  for name, a in zip(_ARRAYS, rows):
    arr = arrays[name]
    if arr.shape[0] < stop:
      arr.resize((stop, *arr.shape[1:]))
    arr[start:stop] = a


def attribute_dataset(f: Callable, dataset, composite: Composite, *, target, out, params=None,
                      batch_size: int | None = None, keys: tuple[str, str] = ("x", "target"), devices=None,
                      progress: bool = True, overwrite: bool = False, strict: bool = True):
  """Explains every sample of a data set with `jaxlrp.attribute`, writing the results to a zarr v3 store.

  Batches are streamed: one is computed on the devices while the previous one is written. The attribution is one
  `jax.jit` function of `(params, x, target)`, compiled once: a smaller last batch is padded to the batch size
  (repeating its last row) and the padding is dropped before writing. With several local devices each batch is
  split over a 1-D mesh of `devices` along the batch axis (`NamedSharding`) and `params` are replicated; the batch
  size must then be divisible by the number of devices. Each batch's results equal `jaxlrp.attribute` on that
  batch bit for bit; those of the padded last batch equal `attribute` on the padded batch, and may differ from an
  unpadded call in the last bits (XLA may pick other kernels for another batch size, e.g. CPU convolutions).

  The store (a zarr v3 group, see the module docstring for why zarr) holds `relevance` `[N, ...]` (like the
  inputs), `output` `[N, classes]` and `target` `[N]`; rows not yet computed read as NaN (target -1). Read it with
  `zarr.open_group(out)` or `xarray.open_zarr(out)`.

  Resuming: calling again with the same arguments after an interruption (an exception, Ctrl-C, a killed process)
  skips the finished batches and computes only the rest. A batch is recorded as finished in the store's
  attributes only after its rows are written, so an interrupted batch is recomputed, never half-kept. The contract:
  **the data set must yield the same batches in the same order on every run** (no reshuffling between runs); an
  iterable is iterated afresh from its start and the items of finished batches are read but not computed (for an
  array data set they are not read at all). A store made with a different configuration (batch size, per-sample
  shape or dtype, composite, target, parameter values) is refused rather than mixed; pass `overwrite=True` or
  another `out` to start over.

  Args:
    f: the model, `f(x)`, or `f(params, x)` when `params` is given; returns `[batch, classes]`.
    dataset: a NumPy or JAX array `[N, ...]` (split into batches of `batch_size`), or any iterable of batches
      yielding arrays, `(x, label, ...)` tuples or dicts (grain and `tf.data` `as_numpy_iterator()` style).
      Every batch but the last must have `batch_size` rows.
    composite: a `jaxlrp.Composite`.
    target: the class to explain: an int; an int array with one class per sample of the data set; `"argmax"`
      (the predicted class; costs one extra forward); or `"label"` (the second item of a tuple batch, or
      `batch[keys[1]]` of a dict batch).
    out: where to write: a path (a directory `*.zarr`), a zarr store, or an open `zarr.Group`.
    params: optional parameters, passed as `f`'s first argument (replicated over the devices).
    batch_size: rows per batch. Required for an array data set; for an iterable it defaults to the first batch's
      size.
    keys: `(input key, label key)` for dict batches.
    devices: the devices to shard each batch over; default `jax.local_devices()`.
    progress: show a tqdm progress bar.
    overwrite: discard an existing store at `out` instead of resuming it.
    strict: see `jaxlrp.lrp`.

  Returns:
    The zarr group.

  Example:
    >>> import tempfile, jax.numpy as jnp, numpy as np, jaxlrp
    >>> from jaxlrp._dataset import attribute_dataset
    >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    >>> path = tempfile.mkdtemp() + "/relevance.zarr"
    >>> x = np.ones((5, 2), np.float32)
    >>> store = attribute_dataset(lambda x: x @ w, x, jaxlrp.EpsilonPlus(), target=0, out=path, batch_size=2,
    ...                           progress=False)
    >>> store["relevance"][:]  # five samples from three batches (the last one padded to two rows, then trimmed)
    array([[0.9999997, 1.9999994],
           [0.9999997, 1.9999994],
           [0.9999997, 1.9999994],
           [0.9999997, 1.9999994],
           [0.9999997, 1.9999994]], dtype=float32)
    >>> store.attrs["jaxlrp"]["done"]  # finished batches as [start, stop) ranges; calling again computes nothing
    [[0, 3]]
  """
  zarr = _import_zarr()
  if not isinstance(composite, Composite):
    raise TypeError(f"attribute_dataset needs a jaxlrp.Composite (e.g. jaxlrp.EpsilonPlusFlat()); got {composite!r}.")
  is_array = isinstance(dataset, (np.ndarray, jax.Array))
  n_rows = int(dataset.shape[0]) if is_array else None
  target = _check_target_spec(target, is_array, n_rows)
  if is_array and batch_size is None:
    raise ValueError("batch_size is required when the data set is an array (it fixes the compiled shape and the "
                     "store's layout).")
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
  devs = list(devices) if devices is not None else jax.local_devices()
  if batch_size is not None and batch_size % len(devs):
    raise ValueError(_divisibility_message(batch_size, len(devs)))

  if isinstance(out, zarr.Group):
    group = out
    if overwrite:
      for name in _ARRAYS:
        if name in group:
          del group[name]
      if "jaxlrp" in group.attrs:
        del group.attrs["jaxlrp"]
  else:
    group = zarr.open_group(out, mode="w" if overwrite else "a", zarr_format=3)
  state = dict(group.attrs.get("jaxlrp", {}))
  if not state and any(name in group for name in _ARRAYS):
    raise ValueError(f"The zarr group at {out!r} already holds {[n for n in _ARRAYS if n in group]} but was not "
                     f"written by attribute_dataset; pass another out, or overwrite=True to replace them.")

  done = [list(r) for r in state.get("done", [])]
  finished = {i for a, b in done for i in range(a, b)}
  # Items: (batch index, x, label). An array is sliced directly, so finished batches are never read (x is None;
  # batch 0 is read all the same: it checks the configuration).
  if is_array:
    bs = int(batch_size)
    n_batches = math.ceil(n_rows / bs)
    items = ((i, None if i in finished and i else np.asarray(dataset[i * bs:(i + 1) * bs]), None)
             for i in range(n_batches))
  else:
    try:
      n_batches = len(dataset)
    except TypeError:
      n_batches = None
    items = ((i, *_split(item, keys)) for i, item in enumerate(dataset))

  has_params = params is not None
  f, params = with_array_params(f, params)  # an Equinox module passed whole
  base_config = {"composite": _composite_key(composite), "target": _target_key(target),
                 "params": _fingerprint(params), "strict": bool(strict)}
  bar = None
  arrays = {name: group[name] for name in _ARRAYS if name in group}
  step = data_sharding = None
  pending = None  # (batch index, rows, device results) computed but not yet written
  short_batch = None  # index of a batch with fewer rows than batch_size: it must be the last one

  def write(p):
    nonlocal done
    i, n, results = p
    rows = [np.asarray(a)[:n] for a in jax.device_get(results)]
    if not arrays:
      _create_arrays(group, arrays, rows, bs)
    _store_rows(arrays, i * bs, rows)
    # Marked finished only now that the rows are stored: an interruption before this line recomputes the batch.
    done = _intervals_add(done, i)
    group.attrs["jaxlrp"] = {**group.attrs["jaxlrp"], "done": done}
    if bar is not None:
      bar.update(1)

  try:
    for i, x, label in items:
      if step is None:  # the first item fixes the batch size and sample shape
        bs = _validate_config(group, state, base_config, x, batch_size, len(devs), out)
        state = dict(group.attrs["jaxlrp"])
        if state.get("complete"):
          break  # everything was written by an earlier run
        step = _make_step(f, composite, has_params, isinstance(target, str) and target == "argmax", strict)
        params_dev, data_sharding = _place(params, devs)
        bar = _progress_bar(progress, n_batches, len(finished))
      if x is None:
        continue
      n = _check_batch(i, x, bs, state["config"], short_batch)
      if n < bs:
        short_batch = i
      if i in finished:
        continue
      t = _batch_target(target, label, i, n, bs)
      xd = jax.device_put(_pad(x, bs), data_sharding)
      td = jax.device_put(_pad(t, bs), data_sharding)
      results = step(params_dev, xd, td)  # dispatched asynchronously: the previous batch is written meanwhile
      if pending is not None:
        p, pending = pending, None
        write(p)
      pending = (i, n, results)
    else:
      if step is None:
        raise ValueError("The data set yielded no batches.")
      if pending is not None:
        p, pending = pending, None
        write(p)
      group.attrs["jaxlrp"] = {**group.attrs["jaxlrp"], "complete": True}
  except BaseException:
    # The iterator (or the model) failed after the previous batch was computed: keep that batch, then re-raise.
    if pending is not None:
      try:
        write(pending)
      except Exception:  # noqa: BLE001 - the original error is the one to report
        pass
    raise
  finally:
    if bar is not None:
      bar.close()
  return group


def _divisibility_message(batch_size, n_devices):
  lo = batch_size - batch_size % n_devices
  return (f"batch_size={batch_size} is not divisible by the {n_devices} devices the batch is sharded over; use a "
          f"multiple of {n_devices} (e.g. {lo or n_devices} or {lo + n_devices}), or pass devices=[...] with fewer "
          f"devices.")


def _validate_config(group, state, base_config, x, batch_size, n_devices, out):
  """Checks the first batch against `batch_size` and the store's configuration; records the configuration."""
  if x.ndim < 1 or x.shape[0] < 1:
    raise ValueError(f"A batch must be an array [batch, ...] with at least one row; got shape {x.shape}.")
  bs = int(batch_size) if batch_size is not None else int(x.shape[0])
  if bs % n_devices:
    raise ValueError(_divisibility_message(bs, n_devices))
  config = {**base_config, "batch_size": bs, "sample_shape": list(x.shape[1:]), "dtype": str(x.dtype)}
  if not state:
    group.attrs["jaxlrp"] = {"format": _FORMAT, "config": config, "done": [], "complete": False}
    return bs
  old = state.get("config", {})
  diff = [f"{k}: store has {old.get(k)!r}, this run has {v!r}" for k, v in config.items() if old.get(k) != v]
  if diff:
    raise ValueError(f"The store at {out!r} was made with a different configuration, so its batches cannot be "
                     f"resumed:\n  " + "\n  ".join(diff) + "\nPass overwrite=True to start over, or another out.")
  return bs


def _check_batch(i, x, bs, config, short_batch):
  if short_batch is not None:
    raise ValueError(f"Batch {short_batch} had fewer than batch_size={bs} rows but batch {i} follows it: only the "
                     f"last batch may be smaller (rows are stored at batch_index * batch_size).")
  if list(x.shape[1:]) != config["sample_shape"] or str(x.dtype) != config["dtype"]:
    raise ValueError(f"Batch {i} has shape {x.shape} and dtype {x.dtype}, but the first batch had samples of shape "
                     f"{tuple(config['sample_shape'])} and dtype {config['dtype']}: every batch must match.")
  n = x.shape[0]
  if not 1 <= n <= bs:
    raise ValueError(f"Batch {i} has {n} rows; expected batch_size={bs} (only the last batch may have fewer).")
  return n


def _batch_target(target, label, i, n, bs):
  if isinstance(target, int):
    return np.full((n,), target, np.int32)
  if isinstance(target, np.ndarray):
    return target[i * bs:i * bs + n]
  if target == "label":
    if label is None:
      raise ValueError(f"target='label' but batch {i} carries no label: yield (x, label) pairs or dicts with the "
                       f"label under keys[1].")
    label = np.asarray(label)
    if label.shape != (n,) or not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f"The labels of batch {i} must be ints of shape ({n},); got {label.dtype} {label.shape}.")
    return label.astype(np.int32)
  return np.zeros((n,), np.int32)  # argmax: computed inside the step


def _place(params, devs):
  """Shardings for one batch (split along the batch axis over a 1-D mesh) and the replicated parameters."""
  if len(devs) > 1:
    mesh = Mesh(np.asarray(devs), ("batch",))
    data, replicated = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())
  else:
    data = replicated = jax.sharding.SingleDeviceSharding(devs[0])
  return jax.device_put(params, replicated), data


def _create_arrays(group, arrays, rows, bs):
  for name, a in zip(_ARRAYS, rows):
    floating = np.issubdtype(a.dtype, np.floating)
    row_bytes = a.dtype.itemsize * math.prod(a.shape[1:])
    dims = ("sample", *(f"{name}_{k}" for k in range(1, a.ndim))) if name != "output" else ("sample", "class")
    arrays[name] = group.create_array(
        name, shape=(0, *a.shape[1:]), dtype=a.dtype, chunks=(_chunk_rows(bs, row_bytes), *a.shape[1:]),
        fill_value=np.nan if floating else -1, dimension_names=dims)
