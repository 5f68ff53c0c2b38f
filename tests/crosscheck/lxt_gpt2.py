"""Reference runs of Hugging Face's ``GPT2LMHeadModel`` (transformers 4.52.4) and LXT 2.1 for the GPT-2 cross-check.

LXT (Clear BSD licence with a patent notice) is only *used* here, as a black box through its public API
(``lxt.efficient.monkey_patch`` with the patch maps that ``lxt.efficient.models.gpt2`` exports); nothing of its code
is copied. ``monkey_patch`` changes torch and transformers process-wide (``nn.LayerNorm.forward``,
``nn.Dropout.forward``, ``GPT2MLP.forward`` and the attention functions of ``modeling_gpt2``), so every run happens in
a fresh subprocess started by :func:`run`, and arrays travel through ``.npz`` files:

    python tests/crosscheck/lxt_gpt2.py attnlrp IN.npz OUT.npz   # weights, plain forward, then LXT's attnLRP map
    python tests/crosscheck/lxt_gpt2.py cplrp IN.npz OUT.npz     # the same with LXT's cp_LRP map

The model is built from a tiny ``GPT2Config`` (eager attention, ``gelu_new``, no dropout) and every parameter is
redrawn from a seeded generator (the default init has zero biases and unit LayerNorm scales, which would hide bias
and scale handling): weights ``N(0, 1/fan_in)``, biases ``N(0, 0.2^2)``, LayerNorm scales ``1 + N(0, 0.2^2)``,
embeddings ``N(0, 0.5^2)``. ``lm_head`` is tied to ``wte``.

IN holds ``input_ids`` and ``attention_mask`` [B, T] (left padding: the explained position is the last one),
``seed``, the config sizes (``n_layer``, ``n_head``, ``n_embd``, ``vocab_size``, ``n_positions``) and, optionally,
``target`` [B]. Position ids follow the generation convention for left padding
(``cumsum(mask) - 1``, 1 on padding) and are passed to the model explicitly.

OUT holds ``w/<state_dict key>`` (every parameter, Conv1D weights in their ``[in, out]`` layout), ``position_ids``,
``word`` (``wte[input_ids]``) and ``pos`` (``wpe[position_ids]``), the plain forward's ``logits`` [B, T, V] (from the
token ids), ``target`` (the given one, or the arg-max of the last position's logits), and for each of two LXT
explanations, seeded with the explained logit ``y_b = logits[b, -1, target_b]`` (LXT's recipe ``y.backward(y)``):

- ``sum_relevance``: ``inputs_embeds = word + pos`` with the model's ``wpe`` zeroed (the whole embedding sum is the
    explained input); ``relevance = inputs_embeds.grad * inputs_embeds``; also ``sum_y``, ``sum_logits``;
- ``word_relevance``: LXT's usual recipe, ``inputs_embeds = word`` and the model adds its own position embeddings;
    ``relevance = word.grad * word``; also ``word_y``.
"""
from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SIZES = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")


def build_model(seed: int, **sizes):
    """A seeded ``GPT2LMHeadModel`` (eval mode, eager attention) with every parameter redrawn."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**sizes, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5, attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied lm_head.weight is wte and is not listed again
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.5 * noise)
            elif ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:  # Conv1D weight [in, out]
                p.copy_(noise / p.shape[0] ** 0.5)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def position_ids(mask):
    """Left-padding positions: real tokens count from 0, padding gets 1 (transformers' generation convention)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _explain(model, inputs_embeds, mask, pos_ids, target):
    """LXT's recipe on the (patched) model: ``y.backward(y)``, relevance = input x its gradient."""
    import torch

    x = inputs_embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
    y = logits[torch.arange(x.shape[0]), -1, target]
    y.backward(y.detach())
    return (x.grad * x).detach().numpy(), y.detach().numpy(), logits.detach().numpy()


def main(argv):
    import numpy as np
    import torch

    mode, src, dst = argv
    torch.set_num_threads(int(os.environ.get("JAXLRP_TORCH_THREADS", "2")))
    torch.set_grad_enabled(True)
    with np.load(src) as f:
        data = {k: f[k] for k in f.files}
    model = build_model(int(data["seed"]), **{k: int(data[k]) for k in SIZES})
    ids = torch.from_numpy(data["input_ids"]).long()
    mask = torch.from_numpy(data["attention_mask"]).long()
    pos_ids = position_ids(mask)
    out = {"w/" + k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
        word = model.transformer.wte(ids)
        pos = model.transformer.wpe(pos_ids)
    target = torch.from_numpy(data["target"]).long() if "target" in data else logits[:, -1].argmax(-1)
    out.update(position_ids=pos_ids.numpy(), word=word.numpy(), pos=pos.numpy(), logits=logits.numpy(),
               target=target.numpy())

    # After the plain forward: the patch changes torch.nn.LayerNorm for the whole process.
    sys.path.insert(0, str(HERE.parent))
    from crosscheck.lxt_bert import _standin_torchvision_for_lxt

    _standin_torchvision_for_lxt()
    from transformers.models.gpt2 import modeling_gpt2  # noqa: I001 - after the stand-in
    import lxt.efficient
    import lxt.efficient.models.gpt2 as lxt_gpt2

    patch_map = {"attnlrp": lxt_gpt2.attnLRP, "cplrp": lxt_gpt2.cp_LRP}[mode]
    lxt.efficient.monkey_patch(modeling_gpt2, patch_map)
    # LXT's usual recipe: the word embeddings are the explained input, the model adds its position embeddings.
    out["word_relevance"], out["word_y"], _ = _explain(model, word, mask, pos_ids, target)
    # The whole embedding sum as the explained input: the model's position table is zeroed so that it adds zeros.
    summed = copy.deepcopy(model)
    with torch.no_grad():
        summed.transformer.wpe.weight.zero_()
    out["sum_relevance"], out["sum_y"], out["sum_logits"] = _explain(summed, word + pos, mask, pos_ids, target)
    np.savez(dst, **out)


def run(mode: str, tmpdir, **arrays) -> dict:
    """Runs `mode` ("attnlrp" or "cplrp") in a fresh Python process; returns its output arrays."""
    import numpy as np

    tmpdir = pathlib.Path(tmpdir)
    src, dst = tmpdir / f"gpt2_{mode}_in.npz", tmpdir / f"gpt2_{mode}_out.npz"
    np.savez(src, **arrays)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), mode, str(src), str(dst)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the GPT-2 {mode} reference run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with np.load(dst) as f:
        return {k: f[k] for k in f.files}


if __name__ == "__main__":
    main(sys.argv[1:])
