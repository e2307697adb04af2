"""Mean next-token NLL of a member on token windows; the reported evaluations.

Self-contained (not ``ptqscale.metrics``) so training and its report need only torch,
transformers and tokenizers on the GPU machine. The reported numbers use the GPTQ protocol
of DESIGN.md (documents joined with "\\n\\n", tokenized once without special tokens,
non-overlapping windows of ``seqlen``, remainder dropped, every position of a window
scored except the first) and are computed in float32 from the saved weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptqscale.precision import true_float32
from ptqscale.zoo.data import gptq_windows, gutenberg_documents, sha256_file, wikitext_documents


@torch.no_grad()
def nll_sum(model, windows: np.ndarray | torch.Tensor, batch_size: int = 32,
            autocast: torch.dtype | None = None) -> tuple[float, int]:
    """Sum of next-token NLL (nats) over ``windows`` [n, L] and the number scored (n * (L-1)).

    Log-softmax in float32 whatever the model's dtype. Example::

        >>> s, n = nll_sum(model, np.zeros((2, 8), np.int64))  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    windows = torch.as_tensor(windows, dtype=torch.long)
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    ctx = (torch.autocast(device.type, dtype=autocast) if autocast
           else contextlib.nullcontext())
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size].to(device)
        with ctx:
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(),
                               reduction="sum")
        total += loss.double()
    model.train(was_training)
    return float(total), int(windows.shape[0] * (windows.shape[1] - 1))


def gptq_ids(tokenizer, documents: list[str], cache_dir: str | Path | None = None,
             source: str = "") -> np.ndarray:
    """Token ids of "\\n\\n".join(documents), cached by (tokenizer, text) hash when asked."""
    text = "\n\n".join(documents)
    path = None
    if cache_dir is not None:
        key = hashlib.sha256((tokenizer.to_str() + "\0" + text).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "gptq" / f"{source or 'text'}-{key}.npy"
        if path.exists():
            return np.load(path)
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, ids)
    return ids


def evaluation_sets(tokenizer, gutenberg_dir: str | Path, wikitext_test: str | Path | None,
                    seqlen: int, cache_dir: str | Path | None = None) -> dict[str, dict]:
    """The reported sets as GPTQ windows: Gutenberg valid and test, WikiText-2 test (if given).

    Returns name -> {"windows": [n, seqlen] int64, "source": {file: sha256}}.
    """
    sets = {}
    for split in ("valid", "test"):
        ids = gptq_ids(tokenizer, gutenberg_documents(gutenberg_dir, split), cache_dir,
                       f"gutenberg-{split}")
        src = Path(gutenberg_dir) / f"{split}.jsonl.xz"
        sets[f"gutenberg_{split}"] = {"windows": gptq_windows(ids, seqlen),
                                      "source": {src.name: sha256_file(src)}}
    if wikitext_test is not None:
        ids = gptq_ids(tokenizer, wikitext_documents(wikitext_test), cache_dir, "wikitext2-test")
        sets["wikitext2_test"] = {"windows": gptq_windows(ids, seqlen),
                                  "source": {Path(wikitext_test).name: sha256_file(wikitext_test)}}
    return sets


def report(model, sets: dict[str, dict], batch_size: int = 32) -> dict[str, dict]:
    """Float32 NLL of ``model`` on every set: {name: {nll, perplexity, nll_sum, tokens}}.

    TF32 is switched off for the duration so the numbers are true float32 on any GPU.
    """
    with true_float32():
        out = {}
        for name, s in sets.items():
            total, count = nll_sum(model, s["windows"], batch_size)
            out[name] = {"nll": total / count, "perplexity": float(np.exp(total / count)),
                         "nll_sum": total, "tokens": count, "windows": len(s["windows"]),
                         "protocol": "gptq", "source": s["source"]}
        return out


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
