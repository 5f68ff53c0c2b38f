"""Reference runs of Hugging Face's ``LlamaForCausalLM`` (transformers 4.52.4) and LXT 2.1 for the LLaMA cross-check.

LXT (Clear BSD licence with a patent notice) is only *used* here, as a black box through its public API
(``lxt.efficient.monkey_patch`` with the patch maps that ``lxt.efficient.models.llama`` exports); nothing of its code
is copied. ``monkey_patch`` changes transformers and torch process-wide (``LlamaRMSNorm.forward``,
``LlamaMLP.forward``, ``nn.Dropout.forward`` and the attention functions of ``modeling_llama``), so every run happens
in a fresh subprocess started by :func:`run` (or :func:`start`, which lets two runs overlap), and arrays travel
through ``.npz`` files:

    python tests/crosscheck/lxt_llama.py attnlrp IN.npz OUT.npz   # weights, plain forward, then LXT's attnLRP map
    python tests/crosscheck/lxt_llama.py cplrp IN.npz OUT.npz     # the same with LXT's cp_LRP map

The model is built from a tiny ``LlamaConfig``: RMSNorm, SwiGLU MLP (``down(silu(gate(x)) * up(x))``), rotary
position embeddings (default ``rope_theta``, no scaling), grouped-query attention (``num_key_value_heads <
num_attention_heads``), no biases, an untied ``lm_head``, eager attention, no dropout. Every parameter is redrawn
from a seeded generator (the default init has unit RMSNorm scales, which would hide scale handling): weights
``N(0, 1/fan_in)`` (``nn.Linear`` stores ``[out, in]``, so ``fan_in = shape[1]``), RMSNorm scales
``1 + N(0, 0.2^2)``, embeddings ``N(0, 0.5^2)``. The rotary ``inv_freq`` is a non-persistent buffer, not a parameter.

IN holds ``input_ids`` and ``attention_mask`` [B, T] (left padding: the explained position is the last one),
``seed``, the config sizes (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``hidden_size``, ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``) and, optionally, ``target``
[B]. Position ids follow the generation convention for left padding (``cumsum(mask) - 1``, 1 on padding) and are
passed to the model explicitly.

OUT holds ``w/<state_dict key>`` (every parameter, ``nn.Linear`` weights in their ``[out, in]`` layout, ``lm_head``
included), ``rms_norm_eps`` and ``rope_theta`` (the config's values), ``position_ids``, ``embeds``
(``embed_tokens[input_ids]``), the plain forward's ``logits`` [B, T, V] (from the token ids), ``target`` (the given
one, or the arg-max of the last position's logits), and LXT's explanation on the patched model with
``inputs_embeds = embeds`` (LLaMA has no position table: the token embeddings are the whole input of the decoder),
seeded with the explained logit ``y_b = logits[b, -1, target_b]`` (LXT's recipe ``y.backward(y)``):
``relevance = inputs_embeds.grad * inputs_embeds`` [B, T, E], ``y`` [B] and the patched forward's
``lxt_logits``.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

HERE = pathlib.Path(__file__).resolve().parent
SIZES = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
         "vocab_size", "max_position_embeddings")


def build_model(seed: int, **sizes):
    """A seeded ``LlamaForCausalLM`` (eval mode, eager attention, untied head) with every parameter redrawn."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                         tie_word_embeddings=False, rope_scaling=None, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:  # the RMSNorm scales (there are no biases)
                assert name.endswith("norm.weight"), name
                p.copy_(1.0 + 0.2 * noise)
            else:  # nn.Linear weight [out, in], lm_head included
                p.copy_(noise / p.shape[1] ** 0.5)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def main(argv):
    import numpy as np
    import torch

    mode, src, dst = argv
    sys.path.insert(0, str(HERE.parent))
    from crosscheck.lxt_gpt2 import _explain, position_ids  # the same left padding and LXT recipe as GPT-2's

    torch.set_num_threads(int(os.environ.get("JAXLRP_TORCH_THREADS", "2")))
    torch.set_grad_enabled(True)
    with np.load(src) as f:
        data = {k: f[k] for k in f.files}
    model = build_model(int(data["seed"]), **{k: int(data[k]) for k in SIZES})
    ids = torch.from_numpy(data["input_ids"]).long()
    mask = torch.from_numpy(data["attention_mask"]).long()
    pos_ids = position_ids(mask)
    out = {"w/" + k: v.detach().numpy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
        embeds = model.model.embed_tokens(ids)
    target = torch.from_numpy(data["target"]).long() if "target" in data else logits[:, -1].argmax(-1)
    out.update(rms_norm_eps=np.float64(model.config.rms_norm_eps), rope_theta=np.float64(model.config.rope_theta),
               position_ids=pos_ids.numpy(), embeds=embeds.numpy(), logits=logits.numpy(), target=target.numpy())

    # After the plain forward: the patch changes the LLaMA classes (and nn.Dropout) for the whole process.
    from crosscheck.lxt_bert import _standin_torchvision_for_lxt

    _standin_torchvision_for_lxt()
    from transformers.models.llama import modeling_llama  # noqa: I001 - after the stand-in
    import lxt.efficient
    import lxt.efficient.models.llama as lxt_llama

    patch_map = {"attnlrp": lxt_llama.attnLRP, "cplrp": lxt_llama.cp_LRP}[mode]
    with warnings.catch_warnings(record=True) as caught:  # a failed patch only warns: make it an error
        warnings.simplefilter("always")
        lxt.efficient.monkey_patch(modeling_llama, patch_map)
    failed = [str(w.message) for w in caught if "patch" in str(w.message).lower()]
    if failed:
        raise RuntimeError(f"LXT's {mode} patch map was not applied: {failed}")
    out["relevance"], out["y"], out["lxt_logits"] = _explain(model, embeds, mask, pos_ids, target)
    np.savez(dst, **out)


def start(mode: str, tmpdir, **arrays):
    """Starts `mode` ("attnlrp" or "cplrp") in a fresh Python process; returns a function that waits for it and
    returns its output arrays. Two runs started before either is waited for overlap (each spends most of its time
    importing torch and transformers)."""
    import numpy as np

    tmpdir = pathlib.Path(tmpdir)
    src, dst = tmpdir / f"llama_{mode}_in.npz", tmpdir / f"llama_{mode}_out.npz"
    np.savez(src, **arrays)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error")
    log = tmpdir / f"llama_{mode}.log"  # a file, not a pipe: a chatty child cannot block on a full pipe
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()), mode, str(src), str(dst)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait() -> dict:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"the LLaMA {mode} reference run failed (exit {proc.returncode}):\n"
                               f"{log.read_text()[-4000:]}")
        with np.load(dst) as f:
            return {k: f[k] for k in f.files}

    return wait


def run(mode: str, tmpdir, **arrays) -> dict:
    """Runs `mode` ("attnlrp" or "cplrp") in a fresh Python process; returns its output arrays."""
    return start(mode, tmpdir, **arrays)()


if __name__ == "__main__":
    main(sys.argv[1:])
