"""Helpers for the cross-checks against PyTorch reference implementations (Zennit, LXT)."""

import importlib.util

_LXT_NEEDS = {
    "torch": "pip install torch==2.13.0",
    "transformers": "pip install --no-deps transformers==4.52.4 (see .ci/install-compare)",
    "lxt": "pip install --no-deps lxt==2.1",
    "zennit": "pip install --no-deps --ignore-requires-python zennit==1.0.0 (lxt.efficient imports it)",
}


def skip_without_lxt(what: str) -> None:
    """Skips the calling test module, naming the install command of each missing package, unless the LXT
    cross-check dependencies (the ``compare`` extra and ``.ci/install-compare``) are importable."""
    import pytest

    missing = [f"{name} ({how})" for name, how in _LXT_NEEDS.items() if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{what} needs " + "; ".join(missing), allow_module_level=True)


def left_padded_ids(seed: int, vocab_size: int, padding, length: int):
    """Token ids ``[B, length]`` (int64, from 1) and their attention mask, row b left-padded with ``padding[b]``
    zeros (id 0, mask 0): the inputs of the LXT language-model cross-checks."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(1, vocab_size, size=(len(padding), length))
    mask = np.ones_like(ids)
    for b, n in enumerate(padding):
        mask[b, :n] = 0
    return np.where(mask == 1, ids, 0).astype(np.int64), mask.astype(np.int64)
