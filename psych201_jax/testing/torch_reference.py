"""The reference scorer's computation in HF PyTorch, as the oracle for tests and the benchmark baseline.

``reference_response_nll`` mirrors the study's ``0_analyses/eval.py`` (docs/reference-protocol.md) after
tokenisation: one participant per forward pass (batch 1, no padding, ``use_cache=False``), full ``[T, V]``
logits, ``cross_entropy(reduction="none")`` against the labels shifted by one, then a Python loop over every
position that sums each maximal run of labelled positions. Needs torch (test extra); never imported by the
scorer itself.
"""

from __future__ import annotations

import numpy as np


def load_hf_model(hf_dir: str, dtype: str = "float32", attn_implementation: str = "eager"):
    """The HF model; ``eager`` attention for parity tests, ``sdpa`` (transformers' default) for speed baselines."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype), trust_remote_code=False, attn_implementation=attn_implementation
    )
    return model.eval()


def reference_response_nll(model, token_ids: np.ndarray, response_index: np.ndarray) -> np.ndarray:
    """float64 [runs]: summed NLL of each maximal run of labelled positions, exactly as eval.py loops."""
    import torch

    ids = torch.as_tensor(np.asarray(token_ids, np.int64))[None]
    labels = torch.where(torch.as_tensor(np.asarray(response_index)) >= 0, ids[0], -100)[None]
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]
        shifted = labels[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, shifted, reduction="none")
        total: list[float | torch.Tensor] = []
        item: float | torch.Tensor = 0.0
        count = 0
        for i in range(nll.shape[0]):
            if int(shifted[i].item()) != -100:
                item = item + nll[i]
                count += 1
            elif count:
                total.append(item)
                item, count = 0.0, 0
        if count:
            total.append(item)
    return np.asarray([float(x) for x in total], np.float64)
