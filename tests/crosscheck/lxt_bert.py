"""Reference runs of Hugging Face's ``BertModel`` (transformers 4.52.4) and LXT 2.1 for the MiniLM cross-check.

LXT (Clear BSD licence with a patent notice) is only *used* here, as a black box through its public API
(``lxt.efficient.monkey_patch``); nothing of its code is copied. ``monkey_patch`` replaces
``torch.nn.LayerNorm.forward`` and ``torch.nn.Dropout.forward`` process-wide, so every torch run happens in a
fresh subprocess started by :func:`run`, and arrays travel through ``.npz`` files:

    python tests/crosscheck/lxt_bert.py forward IN.npz OUT.npz   # plain BertModel: hidden states, mean pooling
    python tests/crosscheck/lxt_bert.py lxt IN.npz OUT.npz       # LXT efficient-mode AttnLRP relevance
    python tests/crosscheck/lxt_bert.py all IN.npz OUT.npz       # both, the plain forward before the patch

``forward`` reads ``input_ids``, ``attention_mask``, ``token_type_ids`` and writes ``last_hidden_state`` and
``pooled`` (the mean over non-padding tokens). ``lxt`` reads ``inputs_embeds`` (the embedding sum
``word + token type + position``), ``attention_mask`` and a direction ``v`` [384]; it zeroes the model's position
and token-type tables (so the model adds exact zeros to the given sum), explains ``y_b = mean_pool(h)_b . v`` seeded
with ``y_b`` (LXT's recipe: ``y.backward(y)``) and writes ``relevance = inputs_embeds.grad * inputs_embeds``,
``y`` and ``last_hidden_state``.

``import lxt.efficient`` imports zennit and ``torchvision.models.vision_transformer``; PyPI's torchvision does not
load beside the CPU torch, so a stand-in is registered (zennit's names from :mod:`zennit_twins`, plus
``vision_transformer.nn``), with module specs so that transformers' availability probe (``find_spec``) reads it
as "not installed".
"""
from __future__ import annotations

import importlib.machinery
import os
import pathlib
import subprocess
import sys
import types

HERE = pathlib.Path(__file__).resolve().parent


def _standin_torchvision_for_lxt():
    sys.path.insert(0, str(HERE.parent))
    from crosscheck import zennit_twins

    zennit_twins.install_torchvision_standin()
    tv = sys.modules["torchvision"]
    if not getattr(tv, zennit_twins.STANDIN_FLAG, False):
        return  # a real torchvision
    import torch

    if "torchvision.models.vision_transformer" not in sys.modules:
        vt = types.ModuleType("torchvision.models.vision_transformer", "Stand-in: only the `nn` that LXT patches.")
        setattr(vt, zennit_twins.STANDIN_FLAG, True)
        vt.nn = torch.nn
        sys.modules[vt.__name__] = vt
        sys.modules["torchvision.models"].vision_transformer = vt
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        if getattr(sys.modules[name], "__spec__", None) is None:
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)


def _load_bert(model_dir):
    import torch
    from transformers.models.bert import modeling_bert

    model = modeling_bert.BertModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=False)
    model.eval()
    torch.set_grad_enabled(True)
    return model


def _mean_pool(h, mask):
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _forward(model_dir, data):
    import torch

    model = _load_bert(model_dir)
    ids, mask, types_ = (torch.from_numpy(data[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids"))
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, token_type_ids=types_).last_hidden_state
    return {"last_hidden_state": h.numpy(), "pooled": _mean_pool(h, mask).numpy()}


def _lxt(model_dir, data):
    import torch

    _standin_torchvision_for_lxt()
    from transformers.models.bert import modeling_bert  # noqa: I001 - after the stand-in
    import lxt.efficient

    lxt.efficient.monkey_patch(modeling_bert)
    model = _load_bert(model_dir)
    with torch.no_grad():  # the explained input is the whole embedding sum: the model must add exact zeros
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    x = torch.from_numpy(data["inputs_embeds"]).requires_grad_()
    mask = torch.from_numpy(data["attention_mask"]).long()
    v = torch.from_numpy(data["v"])
    h = model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    y = _mean_pool(h, mask) @ v
    y.backward(y.detach())
    return {"relevance": (x.grad * x).detach().numpy(), "y": y.detach().numpy(),
            "last_hidden_state": h.detach().numpy()}


def main(argv):
    import numpy as np
    import torch

    mode, src, dst = argv
    torch.set_num_threads(int(os.environ.get("JAXLRP_TORCH_THREADS", "2")))
    with np.load(src) as f:
        data = {k: f[k] for k in f.files}
    model_dir = str(data.pop("model_dir"))
    if mode == "all":  # one interpreter start: the plain forward runs before LXT patches torch
        out = {**_forward(model_dir, data), **{"lxt_" + k: v for k, v in _lxt(model_dir, data).items()}}
    else:
        out = {"forward": _forward, "lxt": _lxt}[mode](model_dir, data)
    np.savez(dst, **out)


def run(mode: str, tmpdir, model_dir, **arrays) -> dict:
    """Runs `mode` ("forward", "lxt" or "all") in a fresh Python process; returns its output arrays (in "all"
    mode LXT's outputs are prefixed with ``lxt_``)."""
    import numpy as np

    tmpdir = pathlib.Path(tmpdir)
    src, dst = tmpdir / f"{mode}_in.npz", tmpdir / f"{mode}_out.npz"
    np.savez(src, model_dir=np.asarray(str(model_dir)), **arrays)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), mode, str(src), str(dst)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} reference run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with np.load(dst) as f:
        return {k: f[k] for k in f.files}


if __name__ == "__main__":
    main(sys.argv[1:])
