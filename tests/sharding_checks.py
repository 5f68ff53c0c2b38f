"""Sharded relevance equals single-device relevance: the checks behind ``tests/test_sharding.py``.

Run as a script, in a process of its own: the 8 simulated CPU devices must be requested before JAX is imported,
so this file sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (and ``JAX_PLATFORMS=cpu`` unless set)
itself. It prints one JSON object ``{check: {"ok", "detail" or "error"}}`` as the last line of stdout::

    python tests/sharding_checks.py            # all checks
    python tests/sharding_checks.py dp_resnet  # the checks whose name starts with one of the arguments

Every check explains the same model twice with the unchanged ``jaxlrp.lrp`` transform under ``jax.jit``: once on
unsharded arrays (one device) and once with the batch and/or the parameters placed on a mesh with
``NamedSharding``. The results must agree to 1e-5 of the largest relevance, and data-parallel relevance must come
back sharded over the batch axis like its input. The models:

- a small ResNet (``examples/models/resnet.py``: convolutions, inference BatchNorm, residual adds, projection
  shortcuts, global mean pool), with EpsilonPlusFlat and EpsilonGammaBox;
- a Megatron-style MLP (column-parallel first kernel, row-parallel second) on a 2-D ("data", "model") mesh;
- a pre-LN transformer block written with einsums (heads sharded over "model": Megatron attention), with AttnLRP
  and CP-LRP.

Meshes use ``AxisType.Auto`` (the sharding propagates as XLA decides) except the ``explicit_*`` checks, which use
``jax.make_mesh``'s default explicit axes (shardings are part of the types; a model with a sharded contraction
must then say where its output lives: ``out_sharding=``).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before the first import of jax; never when pytest imports this file (doctest collection)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import pathlib
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # jaxlrp and examples.models from this checkout

import jaxlrp  # noqa: E402
from examples.models import resnet  # noqa: E402

N_DEVICES = 8
RTOL = 1e-5  # of max |R|
BATCH = 8
# The programs are small and many: compile time dominates, and none of the checks depends on XLA's optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
AUTO = (AxisType.Auto, AxisType.Auto)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def relevance_fn(f: Callable, composite: jaxlrp.Composite, target: int) -> Callable:
  """jit(params, x -> relevance of x for class `target`, each sample seeded with its own score)."""
  g = jaxlrp.lrp(f, composite, argnums=1)
  return jax.jit(jax.grad(lambda params, x: g(params, x)[:, target].sum(), argnums=1), compiler_options=FAST_COMPILE)


def place(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
  """`tree` on `mesh`; `specs` is one PartitionSpec for all leaves or a function (key path, leaf) -> PartitionSpec."""
  spec_of = specs if callable(specs) else (lambda path, leaf: specs)
  return jax.tree_util.tree_map_with_path(lambda p, v: jax.device_put(v, NamedSharding(mesh, spec_of(p, v))), tree)


def compare(sharded: jax.Array, reference: jax.Array, batch_axis: str | None = "data") -> dict:
  """Relative difference to the single-device relevance; the batch axis of the result's sharding."""
  err = float(jnp.max(jnp.abs(jax.device_get(sharded) - reference)) / jnp.max(jnp.abs(reference)))
  spec = sharded.sharding.spec if isinstance(sharded.sharding, NamedSharding) else None
  detail = {"rel_err": err, "spec": str(spec), "n_shards": len(sharded.addressable_shards),
            "max_abs": float(jnp.max(jnp.abs(reference)))}
  assert np.isfinite(err) and err <= RTOL, f"sharded relevance differs from single-device: {err:.2e} of max |R|"
  assert detail["max_abs"] > 0, "relevance is all zero"
  if batch_axis is not None:
    assert spec is not None and len(spec) > 0 and spec[0] in (batch_axis, (batch_axis,)), (
        f"relevance is not sharded over {batch_axis!r} along the batch: {spec}")
  return detail


def largest_divisible_axis(path, leaf: jax.Array, axis_name: str, size: int) -> P:
  """FSDP (ZeRO-3) style: shard a parameter's largest axis that `size` divides; replicate small ones."""
  candidates = [a for a in range(leaf.ndim) if leaf.shape[a] % size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: leaf.shape[a])
  return P(*([None] * axis + [axis_name]))


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> jax.Array:
  return jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def small_resnet():
  """A two-stage ResNet (one basic block per stage, the second with a projection shortcut) at width 8."""
  model = resnet.ResNet(stage_sizes=[1, 1], block_cls=resnet.ResNetBlock, num_classes=10, num_filters=8,
                        small_inputs=True)
  model, variables = resnet.init(model, (BATCH, 16, 16, 3), seed=0)
  x = np.random.default_rng(1).normal(0.0, 1.0, (BATCH, 16, 16, 3))
  return (lambda v, x: model.apply(v, x, train=False)), variables, jnp.asarray(np.clip(x, -3, 3), jnp.float32)


def megatron_mlp(explicit: bool = False):
  """A Megatron MLP block and a linear head, relu(relu(x W1 + b1) W2 + b2) W3 + b3. Under tensor parallelism W1
  is split by columns (its output features over "model"), W2 by rows (its input features: each device holds a
  partial sum, reduced over "model"); the small head is replicated."""
  rng = np.random.default_rng(2)
  d, h, c = 16, 64, 8
  params = {"w1": normal(rng, d, h, scale=d**-0.5), "b1": normal(rng, h, scale=0.1),
            "w2": normal(rng, h, h, scale=h**-0.5), "b2": normal(rng, h, scale=0.1),
            "w3": normal(rng, h, c, scale=h**-0.5), "b3": normal(rng, c, scale=0.1)}
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P(),
           "w3": P(), "b3": P()}
  # With explicit axes, the row-parallel product must name its output sharding (the partial sums are reduced).
  kw = {"out_sharding": P("data", None)} if explicit else {}

  def f(p, x):
    h1 = jax.nn.relu(x @ p["w1"] + p["b1"])
    h2 = jax.nn.relu(jnp.matmul(h1, p["w2"], **kw) + p["b2"])
    return h2 @ p["w3"] + p["b3"]

  return f, params, specs, jnp.abs(normal(rng, BATCH * 2, d))


def transformer_block():
  """A pre-LN transformer block on tokens [B, T, D] with einsum multi-head attention and a GELU MLP, mean-pooled
  into a linear head. Tensor-parallel specs shard the heads of Wq/Wk/Wv/Wo and the MLP's hidden features."""
  rng = np.random.default_rng(3)
  d, heads, dh, mlp, c, t = 32, 4, 8, 64, 5, 6
  params = {
      "ln1": {"scale": 1 + normal(rng, d, scale=0.1), "bias": normal(rng, d, scale=0.1)},
      "wq": normal(rng, d, heads, dh, scale=d**-0.5), "wk": normal(rng, d, heads, dh, scale=d**-0.5),
      "wv": normal(rng, d, heads, dh, scale=d**-0.5), "wo": normal(rng, heads, dh, d, scale=d**-0.5),
      "ln2": {"scale": 1 + normal(rng, d, scale=0.1), "bias": normal(rng, d, scale=0.1)},
      "w1": normal(rng, d, mlp, scale=d**-0.5), "b1": normal(rng, mlp, scale=0.1),
      "w2": normal(rng, mlp, d, scale=mlp**-0.5), "b2": normal(rng, d, scale=0.1),
      "head": normal(rng, d, c, scale=d**-0.5),
  }
  specs = {"ln1": {"scale": P(), "bias": P()}, "wq": P(None, "model"), "wk": P(None, "model"),
           "wv": P(None, "model"), "wo": P("model"), "ln2": {"scale": P(), "bias": P()},
           "w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P(), "head": P()}

  def layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  def f(p, x):
    y = layer_norm(p["ln1"], x)
    q, k, v = (jnp.einsum("btd,dhe->bthe", y, p[n]) for n in ("wq", "wk", "wv"))
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(dh)
    attn = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), v)
    x = x + jnp.einsum("bqhe,hed->bqd", attn, p["wo"])
    y = layer_norm(p["ln2"], x)
    x = x + jax.nn.gelu(y @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return x.mean(1) @ p["head"]

  return f, params, specs, normal(rng, BATCH, t, d)


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------

RESNET_PRESETS = {"EpsilonPlusFlat": jaxlrp.EpsilonPlusFlat(), "EpsilonGammaBox": jaxlrp.EpsilonGammaBox(-3.0, 3.0)}
TRANSFORMER_PRESETS = {"AttnLRP": jaxlrp.AttnLRP(), "CPLRP": jaxlrp.CPLRP()}
MLP_COMPOSITES = {"Epsilon": jaxlrp.Composite(("dense", jaxlrp.Epsilon())),
                  "ZPlus": jaxlrp.Composite(("dense", jaxlrp.ZPlus())),
                  "Gamma": jaxlrp.Composite(("dense", jaxlrp.Gamma(0.25)))}
_CACHE: dict[str, Any] = {}


def _cached(name: str, build: Callable) -> Any:
  if name not in _CACHE:
    _CACHE[name] = build()
  return _CACHE[name]


def _single(name: str, f: Callable, composite, params, x, target: int) -> jax.Array:
  """The single-device reference, computed once per (model, composite)."""
  return _cached(f"single/{name}", lambda: np.asarray(relevance_fn(f, composite, target)(params, x)))


def check_dp_resnet(preset: str) -> dict:
  """Data parallel: batch over a 1-D "data" mesh, parameters replicated."""
  f, variables, x = _cached("resnet", small_resnet)
  composite = RESNET_PRESETS[preset]
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=AUTO[:1])
  ref = _single(f"resnet/{preset}", f, composite, variables, x, 3)
  out = relevance_fn(f, composite, 3)(place(variables, mesh, P()), place(x, mesh, P("data")))
  return compare(out, ref)


def check_fsdp_resnet(preset: str) -> dict:
  """FSDP: the batch and every parameter's largest divisible axis over the same "data" axis (ZeRO-3 style)."""
  f, variables, x = _cached("resnet", small_resnet)
  composite = RESNET_PRESETS[preset]
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=AUTO[:1])
  ref = _single(f"resnet/{preset}", f, composite, variables, x, 3)
  sharded_vars = place(variables, mesh, lambda p, v: largest_divisible_axis(p, v, "data", N_DEVICES))
  n_sharded = sum(not v.sharding.is_fully_replicated for v in jax.tree_util.tree_leaves(sharded_vars))
  assert n_sharded >= 10, f"only {n_sharded} parameters sharded"
  out = relevance_fn(f, composite, 3)(sharded_vars, place(x, mesh, P("data")))
  return {**compare(out, ref), "sharded_params": n_sharded}


def check_tp_mlp(rule: str) -> dict:
  """Tensor parallel (Megatron MLP) on a 2 x 4 ("data", "model") mesh: batch over "data", kernels over "model"."""
  f, params, specs, x = _cached("mlp", megatron_mlp)
  composite = MLP_COMPOSITES[rule]
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)
  ref = _single(f"mlp/{rule}", f, composite, params, x, 2)
  out = relevance_fn(f, composite, 2)(place(params, mesh, lambda p, v: _spec_at(specs, p)), place(x, mesh, P("data")))
  return compare(out, ref)


def check_tp_transformer(preset: str) -> dict:
  """Tensor parallel attention + MLP (heads and hidden features over "model"), batch over "data"."""
  f, params, specs, x = _cached("transformer", transformer_block)
  composite = TRANSFORMER_PRESETS[preset]
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)
  ref = _single(f"transformer/{preset}", f, composite, params, x, 1)
  out = relevance_fn(f, composite, 1)(place(params, mesh, lambda p, v: _spec_at(specs, p)), place(x, mesh, P("data")))
  return compare(out, ref)


def check_vmap_resnet() -> dict:
  """`jax.vmap` of a per-sample explanation over a batch sharded on "data" (each sample explains its own class)."""
  f, variables, x = _cached("resnet", small_resnet)
  composite = RESNET_PRESETS["EpsilonPlusFlat"]
  g = jaxlrp.lrp(f, composite, argnums=1)
  targets = jnp.arange(BATCH) % 10

  def explain_one(v, x1, t):
    return jax.grad(lambda x1: g(v, x1[None])[0, t])(x1)

  run = jax.jit(jax.vmap(explain_one, in_axes=(None, 0, 0)), compiler_options=FAST_COMPILE)
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=AUTO[:1])
  ref = np.asarray(run(variables, x, targets))
  out = run(place(variables, mesh, P()), place(x, mesh, P("data")), place(targets, mesh, P("data")))
  # Independent of the vmap: per-sample relevance equals the batched one for the same targets.
  onehot = jax.nn.one_hot(targets, 10)
  batched = jax.jit(jax.grad(lambda v, x: (g(v, x) * onehot).sum(), argnums=1), compiler_options=FAST_COMPILE)
  np.testing.assert_allclose(ref, np.asarray(batched(variables, x)), rtol=0, atol=RTOL * np.abs(ref).max())
  return compare(out, ref)


def check_shard_map_resnet(check_vma: bool = True, preset: str = "EpsilonPlusFlat") -> dict:
  """`jax.shard_map`: each device explains its own slice of the batch with the unchanged transform (with
  EpsilonGammaBox: ZBox bounds made inside, varying like the input they bound)."""
  f, variables, x = _cached("resnet", small_resnet)
  composite = RESNET_PRESETS[preset]
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=AUTO[:1])
  g = jaxlrp.lrp(f, composite, argnums=1)
  local = lambda v, x: jax.grad(lambda x: g(v, x)[:, 3].sum())(x)  # noqa: E731
  per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"), check_vma=check_vma)
  run = jax.jit(per_device, compiler_options=FAST_COMPILE)
  ref = _single(f"resnet/{preset}", f, composite, variables, x, 3)
  return compare(run(place(variables, mesh, P()), place(x, mesh, P("data"))), ref)


def check_explicit_dp_resnet() -> dict:
  """Data parallel on `jax.make_mesh`'s default (explicit) axes, with a preset that has sign-split conv rules."""
  f, variables, x = _cached("resnet", small_resnet)
  composite = RESNET_PRESETS["EpsilonPlusFlat"]
  mesh = jax.make_mesh((N_DEVICES,), ("data",))
  ref = _single("resnet/EpsilonPlusFlat", f, composite, variables, x, 3)
  out = relevance_fn(f, composite, 3)(place(variables, mesh, P()), place(x, mesh, P("data")))
  return compare(out, ref)


def check_explicit_tp_mlp() -> dict:
  """Megatron MLP on explicit axes (the row-parallel product names its output sharding), Epsilon and ZPlus."""
  f_ref, params, specs, x = _cached("mlp", megatron_mlp)
  f, *_ = megatron_mlp(explicit=True)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  details = {}
  with jax.set_mesh(mesh):
    p_sh, x_sh = place(params, mesh, lambda p, v: _spec_at(specs, p)), place(x, mesh, P("data"))
    for rule in ("Epsilon", "ZPlus"):
      ref = _single(f"mlp/{rule}", f_ref, MLP_COMPOSITES[rule], params, x, 2)
      details[rule] = compare(relevance_fn(f, MLP_COMPOSITES[rule], 2)(p_sh, x_sh), ref)
  return details


def _spec_at(specs: Any, path) -> P:
  node = specs
  for key in path:
    node = node[getattr(key, "key", key)]
  return node


CHECKS: dict[str, Callable[[], dict]] = {
    **{f"dp_resnet_{p}": (lambda p=p: check_dp_resnet(p)) for p in RESNET_PRESETS},
    "fsdp_resnet_EpsilonPlusFlat": lambda: check_fsdp_resnet("EpsilonPlusFlat"),
    **{f"tp_mlp_{r}": (lambda r=r: check_tp_mlp(r)) for r in MLP_COMPOSITES},
    **{f"tp_transformer_{p}": (lambda p=p: check_tp_transformer(p)) for p in TRANSFORMER_PRESETS},
    "vmap_resnet": check_vmap_resnet,
    "shard_map_resnet": check_shard_map_resnet,
    "shard_map_resnet_EpsilonGammaBox": lambda: check_shard_map_resnet(preset="EpsilonGammaBox"),
    "explicit_dp_resnet": check_explicit_dp_resnet,
    "explicit_tp_mlp": check_explicit_tp_mlp,
}


def main(prefixes: list[str]) -> dict[str, dict]:
  if jax.device_count() < N_DEVICES:
    raise SystemExit(f"need {N_DEVICES} devices, have {jax.device_count()}: set XLA_FLAGS before importing jax")
  results = {}
  for name, check in CHECKS.items():
    if prefixes and not any(name.startswith(p) for p in prefixes):
      continue
    start = time.perf_counter()
    try:
      results[name] = {"ok": True, "detail": check()}
    except Exception as e:  # noqa: BLE001 - every failure is reported, the other checks still run
      results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                       "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
  return results


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1:]), default=str))
