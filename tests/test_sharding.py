"""Scale-out through the unchanged ``jaxlrp.lrp`` transform, on 8 simulated CPU devices.

The device count is fixed when JAX starts, so the checks run in one subprocess (``tests/sharding_checks.py``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and report JSON; each check is one test here. Every check
compares the relevance of ``jit(grad(lrp(f)))`` on sharded arrays with the same program on unsharded arrays
(tolerance 1e-5 of the largest relevance) and, for batch-sharded inputs, checks that the relevance comes back
sharded over the "data" axis:

- data parallel (batch over a 1-D mesh, parameters replicated; EpsilonPlusFlat and EpsilonGammaBox) and FSDP
  (parameters sharded over the same axis; EpsilonPlusFlat) on a small ResNet (conv + BatchNorm + residuals);
- tensor parallel on a 2 x 4 ("data", "model") mesh: a Megatron MLP (Epsilon, ZPlus, Gamma) and an einsum
  transformer block with its heads over "model" (AttnLRP, CP-LRP);
- ``jax.vmap`` of per-sample explanations (also checked against the batched explanation) and ``jax.shard_map``;
- ``jax.make_mesh``'s default explicit axis types (data parallel, and a tensor-parallel MLP written for them).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

CHECKS_SCRIPT = pathlib.Path(__file__).resolve().parent / "sharding_checks.py"
ROOT = CHECKS_SCRIPT.parent.parent

CHECKS = [
    "dp_resnet_EpsilonPlusFlat", "dp_resnet_EpsilonGammaBox",
    "fsdp_resnet_EpsilonPlusFlat",
    "tp_mlp_Epsilon", "tp_mlp_ZPlus", "tp_mlp_Gamma",
    "tp_transformer_AttnLRP", "tp_transformer_CPLRP",
    "vmap_resnet", "shard_map_resnet", "shard_map_resnet_EpsilonGammaBox",
    "explicit_dp_resnet", "explicit_tp_mlp",
]


@pytest.fixture(scope="module")
def results() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
  proc = subprocess.run([sys.executable, str(CHECKS_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"sharding checks crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_check_ran(results):
  assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_sharded_relevance_equals_single_device(results, name):
  res = results[name]
  assert res["ok"], f"{name}: {res['error']}\n{res['traceback']}"
