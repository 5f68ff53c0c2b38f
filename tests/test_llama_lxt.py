"""Cross-check on LLaMA: a hand-written ``jax.numpy`` twin of Hugging Face's ``LlamaForCausalLM`` against the torch
model (forward) and LXT 2.1's efficient-mode AttnLRP and CP-LRP (relevance), on the same seeded weights.

The torch side runs in subprocesses (:mod:`crosscheck.lxt_llama`): a tiny random ``LlamaConfig`` (2 layers, 4
attention heads sharing 2 key-value heads, head width 16, width 64, SwiGLU width 128, vocabulary 100, 32 positions,
eager attention, ``silu``, no biases, untied ``lm_head``, ``rms_norm_eps`` 1e-6, ``rope_theta`` 1e4), every parameter
redrawn from a seed (RMSNorm scales ``1 + N(0, 0.2^2)``), the plain forward, then LXT's patch map for LLaMA
(``lxt.efficient.models.llama``: ``attnLRP``, or ``cp_LRP``), one map per process, the two processes started
together. The weights come back through ``.npz`` and the twin below loads them.

What the twin matches deliberately:

- ``nn.Linear`` without bias: ``y = x @ W.T`` with ``W`` stored ``[out, in]``; ``lm_head`` is its own matrix.
- RMSNorm in HF's order: ``variance = mean(x^2)``, ``x * rsqrt(variance + eps)``, then ``weight * (...)``. HF casts
  the input to float32 before and back to the input dtype before the weight; in this float32 model both casts are
  no-ops, so the twin has none.
- Rotary embeddings, HF's default: ``inv_freq = 1 / theta^(2i / d)`` in float32, ``freqs = pos * inv_freq`` (HF: a
  float32 matmul of ``[d/2, 1]`` by ``[1, T]``, one product per entry, so the same numbers), ``emb = [freqs, freqs]``,
  ``cos``/``sin`` in float32 (HF computes them with autocast off and casts them to the model dtype: a no-op), no
  attention scaling; ``q * cos + rotate_half(q) * sin`` with ``rotate_half(x) = [-x2, x1]`` (the two halves of the
  head, not interleaved pairs); the same for ``k``. Cos and sin depend on the position ids only: constants of the
  explanation, so RoPE is a linear map of q and k (the gradient on both sides).
- Grouped-query attention: HF's ``repeat_kv`` is ``repeat_interleave`` over heads (key-value head ``j`` serves query
  heads ``j * g ... j * g + g - 1``), ``jnp.repeat(axis=1)`` here.
- Eager attention: ``(q k^T) * d^-0.5 + mask`` with the 4-D additive mask that ``LlamaModel._update_causal_mask``
  builds (``finfo.min`` where a key is in the future or padding, else 0), softmax in float32 (HF: ``dtype=float32``
  and a cast back, a no-op here), ``A v``, heads merged, ``o_proj``.
- SwiGLU: ``down(silu(gate(x)) * up(x))``.
- Left padding with position ids ``cumsum(mask) - 1`` (1 on padding), passed to torch explicitly; the explained
  position is the last one of every row.

The explanation. Output: the logit ``y_b = logits[b, -1, target_b]`` of the arg-max token of the plain forward,
seeded with ``y_b`` on both sides (LXT's ``y.backward(y)``; in JAX the VJP with cotangent ``y``). Explained input:
``inputs_embeds = embed_tokens[ids]``. LLaMA has no position table (positions enter through RoPE inside attention),
so the token embeddings are the whole input of the decoder and LXT's ``inputs_embeds.grad * inputs_embeds`` is the
quantity jaxlrp computes for its explained argument (no word/sum split as in the GPT-2 check).

Rules, as LXT's two LLaMA maps act (observed through the patched model) and as jaxlrp expresses them:

- Linear layers: the plain gradient (LRP-0) in LXT's efficient mode: ``AttnLRP()``'s default ``epsilon=0``.
- RMSNorm: the ``rsqrt`` factor is a constant in both maps: ``ConstantStd()`` on jaxlrp's ``"norm"``.
- SwiGLU ``silu(g) * u``: ``attnLRP`` applies the identity rule to ``silu`` and the uniform rule to the product (half
  to each factor); ``cp_LRP`` holds the gate branch constant (no relevance into ``gate_proj``: all of it to ``u``).
  jaxlrp sees ``silu(g) = g * sigmoid(g)`` as a sigmoid branch, so the product is a ``"gate"``: ``Uniform()`` in
  ``AttnLRP()``, ``SignalTakeAll()`` in ``CPLRP()``, with ``Pass()`` (the identity rule) on ``silu``. No extra
  composite is needed. The convention matters: with the other one for this product alone (gate constant in AttnLRP,
  uniform in CP-LRP) jaxlrp is 8-61 % away from LXT per sample (``test_the_swiglu_convention_is_what_matches``).
- Attention: ``attnLRP`` gives q and k a quarter of their gradient and v half (the uniform rule twice; LXT divides
  before ``repeat_kv``, a linear op, so the place does not matter), softmax by its gradient (Taylor);
  ``cp_LRP`` stops the gradient at q and k: ``A v`` is a gate of jaxlrp's (attention weights from a softmax).

Asserted per sample (4 samples, 2 left-padded): the logits within ``FORWARD_TOL`` of torch's (and of both patched
models' forwards); the relevance of the input embeddings per token (sum over the 64 units) correlates >= ``CORR_MIN``
with LXT's (also without the dominant last token) with ``max|dR| <= REL_TOL * max|R_lxt|``, and per element
(token x unit) ``max|dR| <= ELEM_TOL * max|R_lxt|``; padding tokens get exactly 0 on both sides. Sanity checks that
the comparison can fail: LXT's relevance is far from gradient x input (61-121 %), LXT's two maps differ (19-89 %),
and the other SwiGLU convention is far from LXT (above).

Measured on this machine (2-core CPU, jax 0.10.2, torch 2.13), worst sample: forward 9.2e-7; AttnLRP per token
3.2e-7, per element 6.9e-7; CP-LRP per token 5.7e-7, per element 6.9e-7; ``1 - corr`` <= 4e-13 (float32 rounding
of different summation orders). The tolerances (1e-5) leave a factor 10-15 for other BLAS builds and CPUs and stay
four orders of magnitude below the smallest rule difference measured (8 %); that is 100 times stricter than the
GPT-2 check's 1e-3. Run with ``-s`` to see the figures. About 15 s, most of it the two torch processes (importing
torch and transformers), which overlap.

Needs the ``compare`` dependencies (``.ci/install-compare``): torch (CPU), transformers 4.52.4, lxt 2.1, zennit.
"""
import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from crosscheck import left_padded_ids, skip_without_lxt  # noqa: E402

skip_without_lxt("the LLaMA cross-check")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from crosscheck import lxt_llama  # noqa: E402

import jaxlrp  # noqa: E402

SIZES = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
         "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 32}
SEED = 0
LENGTH = 16
PADDING = (0, 5, 9, 0)  # left padding per sample
RMS_EPS = 1e-6  # LlamaConfig's defaults, checked against the reference run's config
ROPE_THETA = 10000.0

# Tolerances: measured worst 9.2e-7 (forward), 5.7e-7 (per token), 6.9e-7 (per element), 1 - corr 4e-13; see above.
FORWARD_TOL = 1e-5  # max|jax - torch| <= FORWARD_TOL * max|torch| (logits; also the explained y, relative)
CORR_MIN = 0.999999
REL_TOL = 1e-5  # max|R_jax - R_lxt| <= REL_TOL * max|R_lxt|, per sample, per-token relevance
ELEM_TOL = 1e-5  # the same per element (token x hidden unit)
CONVENTION_GAP = 1e-2  # a different rule moves relevance by more than this (measured: 8 % and up)


# ---- the twin ----------------------------------------------------------------------------------------------------

def load_params(weights: dict) -> dict:
  """``w/<state_dict key>`` arrays -> nested dict; ``nn.Linear`` weights stay ``[out, in]`` (the twin computes
  ``x @ W.T``, as ``F.linear`` does)."""
  w = {k[2:]: jnp.asarray(v) for k, v in weights.items() if k.startswith("w/")}
  params = {"embed": w["model.embed_tokens.weight"], "norm": w["model.norm.weight"], "lm_head": w["lm_head.weight"]}
  for i in range(SIZES["num_hidden_layers"]):
    p = f"model.layers.{i}."
    params[f"layer_{i}"] = {
        "input_norm": w[p + "input_layernorm.weight"], "post_norm": w[p + "post_attention_layernorm.weight"],
        **{n: w[p + "self_attn." + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        **{n: w[p + "mlp." + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj")},
    }
  return params


def _linear(w, x):
  return x @ w.T


def _rms_norm(scale, x):
  # HF: upcast to float32 (a no-op here), variance = mean(x^2), x * rsqrt(variance + RMS_EPS), cast back, then
  # weight * x.
  variance = jnp.mean(x * x, axis=-1, keepdims=True)
  return scale * (x * jax.lax.rsqrt(variance + RMS_EPS))


def rotary(position_ids, head_dim):
  """HF's default RoPE in float32: ``inv_freq = 1 / theta^(2i/d)``, ``freqs = pos * inv_freq``, ``emb = [freqs,
  freqs]``; returns ``cos(emb), sin(emb)`` [B, T, d]. Data-independent: constants of the explanation."""
  inv_freq = 1.0 / (jnp.float32(ROPE_THETA) ** (jnp.arange(0, head_dim, 2).astype(jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(p, x, cos, sin, mask_bias):
  b, t, _ = x.shape
  h, kvh = SIZES["num_attention_heads"], SIZES["num_key_value_heads"]
  d = SIZES["hidden_size"] // h
  q = _linear(p["q_proj"], x).reshape(b, t, h, d).transpose(0, 2, 1, 3)  # [B, H, T, d]
  k = _linear(p["k_proj"], x).reshape(b, t, kvh, d).transpose(0, 2, 1, 3)  # [B, KVH, T, d]
  v = _linear(p["v_proj"], x).reshape(b, t, kvh, d).transpose(0, 2, 1, 3)
  cos, sin = cos[:, None], sin[:, None]
  q = q * cos + _rotate_half(q) * sin
  k = k * cos + _rotate_half(k) * sin
  # repeat_kv: key/value head j serves query heads j * groups ... (j + 1) * groups - 1.
  k, v = jnp.repeat(k, h // kvh, axis=1), jnp.repeat(v, h // kvh, axis=1)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * d ** -0.5 + mask_bias
  weights = jax.nn.softmax(scores, axis=-1)
  context = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(b, t, h * d)
  return _linear(p["o_proj"], context)


def _mlp(p, x):
  return _linear(p["down_proj"], jax.nn.silu(_linear(p["gate_proj"], x)) * _linear(p["up_proj"], x))


def llama(params, embeds, mask, position_ids):
  """Logits [B, T, V] from the token embeddings [B, T, E], the 0/1 mask [B, T] and the position ids [B, T]."""
  t = embeds.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  allowed = causal[None, None] & (mask[:, None, None, :] == 1)
  mask_bias = jnp.where(allowed, 0.0, jnp.finfo(embeds.dtype).min).astype(embeds.dtype)  # [B, 1, T, T]
  cos, sin = rotary(position_ids, SIZES["hidden_size"] // SIZES["num_attention_heads"])
  h = embeds
  for i in range(SIZES["num_hidden_layers"]):
    p = params[f"layer_{i}"]
    h = h + _attention(p, _rms_norm(p["input_norm"], h), cos, sin, mask_bias)
    h = h + _mlp(p, _rms_norm(p["post_norm"], h))
  return _linear(params["lm_head"], _rms_norm(params["norm"], h))


def explained_logit(params, embeds, mask, position_ids, target):
  return llama(params, embeds, mask, position_ids)[jnp.arange(embeds.shape[0]), -1, target]


# ---- fixtures ----------------------------------------------------------------------------------------------------

def _inputs():
  return left_padded_ids(SEED, SIZES["vocab_size"], PADDING, LENGTH)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """LXT's two maps, each in its own process, started together (most of each run is importing torch)."""
  ids, mask = _inputs()
  arrays = dict(input_ids=ids, attention_mask=mask, seed=np.int64(SEED), **{k: np.int64(v) for k, v in SIZES.items()})
  tmp = tmp_path_factory.mktemp("llama")
  waits = {mode: lxt_llama.start(mode, tmp, **arrays) for mode in ("attnlrp", "cplrp")}
  return {mode: wait() for mode, wait in waits.items()}


@pytest.fixture(scope="module")
def reference(references):
  return references["attnlrp"]


@pytest.fixture(scope="module")
def data(reference):
  ids, mask = _inputs()
  assert float(reference["rms_norm_eps"]) == RMS_EPS and float(reference["rope_theta"]) == ROPE_THETA
  params = load_params(reference)
  embeds = np.asarray(jnp.take(params["embed"], jnp.asarray(ids), axis=0))
  # Same table, same gather: the explained input is bit-identical on both sides.
  np.testing.assert_array_equal(embeds, reference["embeds"])
  return {"params": params, "ids": ids, "mask": mask, "pos": reference["position_ids"], "embeds": embeds,
          "target": reference["target"].astype(np.int32)}


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_forward_matches_transformers_llama(data, references):
  reference = references["attnlrp"]
  logits = np.asarray(jax.jit(llama)(data["params"], jnp.asarray(data["embeds"]), jnp.asarray(data["mask"]),
                                     jnp.asarray(data["pos"])))
  print("\nLLaMA twin vs transformers LlamaForCausalLM: max|diff| / max|torch| of the logits per sample")
  for b in range(len(PADDING)):
    real = data["mask"][b] == 1
    print(f"  {b}: {_rel(logits[b, real], reference['logits'][b, real]):.2e}  ({int(real.sum())} tokens)")
  assert _rel(logits, reference["logits"]) <= FORWARD_TOL
  np.testing.assert_array_equal(np.argmax(logits[:, -1], -1), data["target"])
  # The second process built the same model (and so explained the same logits), and each patched model's forward
  # (on inputs_embeds) is the same function as the plain one.
  np.testing.assert_array_equal(references["cplrp"]["logits"], reference["logits"])
  np.testing.assert_array_equal(references["cplrp"]["target"], reference["target"])
  for mode, ref in references.items():
    assert _rel(ref["lxt_logits"], reference["logits"]) <= FORWARD_TOL, mode


def _explain(data, composite):
  params, mask, pos, target = (data["params"], jnp.asarray(data["mask"]), jnp.asarray(data["pos"]),
                               jnp.asarray(data["target"]))
  g = jaxlrp.lrp(explained_logit, composite, argnums=1)

  @jax.jit
  def explain(x):
    y, vjp = jax.vjp(lambda x: g(params, x, mask, pos, target), x)
    return y, vjp(y)  # seeded with the score, as LXT's y.backward(y)

  y, (r,) = explain(jnp.asarray(data["embeds"]))
  return np.asarray(y), np.asarray(r)


def _compare(name, y, r, ref_y, ref_r, mask):
  np.testing.assert_allclose(y, ref_y, rtol=FORWARD_TOL, atol=0)
  tok, tok_ref = r.sum(-1), ref_r.sum(-1)
  print(f"\nLLaMA {name}, relevance of the input embeddings per sample:")
  print("   #  tokens  1 - corr  (w/o last token)  max|dR|/max|R| per token  per element  sum R jax   sum R lxt"
        "   y")
  worst = []
  for b in range(len(mask)):
    m = mask[b] == 1
    corr = float(np.corrcoef(tok[b, m], tok_ref[b, m])[0, 1])
    corr_rest = float(np.corrcoef(tok[b, m][:-1], tok_ref[b, m][:-1])[0, 1])  # without the dominant last token
    err, err_elem = _rel(tok[b], tok_ref[b]), _rel(r[b], ref_r[b])
    print(f"  {b:2d}  {int(m.sum()):6d}  {1 - corr:.1e}   {1 - corr_rest:.1e}          {err:.2e}                  "
          f"{err_elem:.2e}     {tok[b].sum():+9.4f}  {tok_ref[b].sum():+9.4f}  {y[b]:+.4f}")
    worst.append((corr, corr_rest, err, err_elem))
    assert np.all(r[b, ~m] == 0) and np.all(ref_r[b, ~m] == 0)  # padding: exactly zero on both sides
  assert min(w[0] for w in worst) >= CORR_MIN
  assert min(w[1] for w in worst) >= CORR_MIN
  assert max(w[2] for w in worst) <= REL_TOL
  assert max(w[3] for w in worst) <= ELEM_TOL
  return worst


def test_attnlrp_matches_lxt_attnlrp(data, reference):
  y, r = _explain(data, jaxlrp.AttnLRP())
  _compare("AttnLRP() vs LXT attnLRP", y, r, reference["y"], reference["relevance"], data["mask"])
  # The patch was active: LXT's relevance is not gradient x input.
  params, mask, pos, target = (data["params"], jnp.asarray(data["mask"]), jnp.asarray(data["pos"]),
                               jnp.asarray(data["target"]))
  x = jnp.asarray(data["embeds"])
  grad = jax.jit(jax.grad(lambda x: jnp.sum(explained_logit(params, x, mask, pos, target) * jnp.asarray(y))))(x)
  gi = np.asarray(x * grad).sum(-1)
  gaps = [_rel(gi[b], reference["relevance"][b].sum(-1)) for b in range(len(PADDING))]
  print("  gradient x input vs LXT per sample:", " ".join(f"{g:.2f}" for g in gaps))
  assert min(gaps) > CONVENTION_GAP


def test_cplrp_matches_lxt_cp_lrp(data, references):
  ref = references["cplrp"]
  y, r = _explain(data, jaxlrp.CPLRP())
  _compare("CPLRP() vs LXT cp_LRP", y, r, ref["y"], ref["relevance"], data["mask"])
  # LXT's two maps give different relevance (the cp_LRP patch was applied, not the attnLRP one).
  gaps = [_rel(ref["relevance"][b].sum(-1), references["attnlrp"]["relevance"][b].sum(-1))
          for b in range(len(PADDING))]
  print("  LXT cp_LRP vs LXT attnLRP per sample:", " ".join(f"{g:.2f}" for g in gaps))
  assert min(gaps) > CONVENTION_GAP


def _mlp_gate(op):
  """The SwiGLU product ``silu(gate) * up`` (a "gate": its factor ``silu(g) = g * sigmoid(g)`` holds a sigmoid);
  the attention products ``A v`` are gates too, but written in :func:`_attention`."""
  return op.kind == "gate" and "(_mlp)" in op.source


def test_the_swiglu_convention_is_what_matches(data, references):
  """The SwiGLU product decides the match: jaxlrp with the other convention for it is far from LXT."""
  swapped = {
      "attnlrp": jaxlrp.AttnLRP() + jaxlrp.Composite((_mlp_gate, jaxlrp.SignalTakeAll())),  # gate constant
      "cplrp": jaxlrp.CPLRP() + jaxlrp.Composite((_mlp_gate, jaxlrp.Uniform())),  # half to each factor
  }
  for mode, composite in swapped.items():
    _, r = _explain(data, composite)
    gaps = [_rel(r[b].sum(-1), references[mode]["relevance"][b].sum(-1)) for b in range(len(PADDING))]
    print(f"\n  {mode}, the other SwiGLU convention vs LXT per sample:", " ".join(f"{g:.2f}" for g in gaps))
    assert min(gaps) > CONVENTION_GAP, mode
