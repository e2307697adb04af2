"""The chunked head and loss of the perplexity pass, and its attention kernel.

``eval.head=chunked`` (metrics/perplexity.py) never materialises a batch's logits: the model
runs with its head swapped for an identity, so it returns the final hidden states; the scored
rows go through the head ``HEAD_CHUNK_ELEMENTS // vocab`` at a time, each chunk's logits in the
model dtype and its loss ``cross_entropy(logits.float())``, i.e. logsumexp in fp32 minus the
target's logit (compiled with ``eval.compile``: one fused kernel that reads the chunk once).
Rows are scored independently, so the NLL is that of ``eval.head=logits`` to float tolerance:
only the head GEMM sees other row counts. ``eval.attention`` pins the SDPA kernel; :func:`probe`
records the kernel that runs and checks, on a few tokens and before the pass, that a pinned
kernel can run the model and that the model does not change its logits after the head.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from ptqscale.errors import ConfigError

ATTENTION = ("auto", "flash", "cudnn", "efficient", "math")  # SDPA kernels (SDPBackend names)


# Elements of one chunk's logits with eval.head=chunked: 2^26 (128 MB in bf16, and its fp32
# copy 256 MB when eager) bounds the memory like LOSS_CHUNK_FLOATS, and keeps the head GEMM
# of a chunk >= 512 rows up to a 128k vocabulary, where it runs near the full matmul rate.
HEAD_CHUNK_ELEMENTS = 2**26


def chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (fp32) of ``target`` [n] given final hidden states ``hidden`` [n, d]:
    the logits in the model dtype, then logsumexp in fp32 minus the target's logit."""
    return F.cross_entropy(head(hidden).float(), target, reduction="none")


def chunked_losses(hidden, ids, plan, head, compiled_nll) -> list[torch.Tensor]:
    """Per-token NLL of each window's scored tokens from the final hidden states [B, T, d]:
    the scored rows of all windows through the head ``HEAD_CHUNK_ELEMENTS // vocab`` at a time."""
    rows = torch.cat([hidden[row, first - 1:-1] for row, (_, first) in enumerate(plan)])
    target = torch.cat([ids[row, first:] for row, (_, first) in enumerate(plan)])
    step = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    loss = compiled_nll or chunk_nll
    nll = torch.cat([loss(head, rows[i:i + step], target[i:i + step])
                     for i in range(0, len(rows), step)])
    return list(nll.split([ids.shape[1] - first for _, first in plan]))


class _HiddenStates(torch.nn.Module):
    """Stands in for the head: the model returns the hidden states the head would read
    (and, for :func:`probe`, this module keeps them: ``seen``)."""

    seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x


@contextmanager
def head_swapped(model, enabled: bool = True):
    """Swap ``model``'s head for :class:`_HiddenStates` in a ``with`` body; yield the head.

    Yields None (and changes nothing) when not ``enabled``; the head is put back on exit.
    """
    if not enabled:
        yield None
        return
    from ptqscale.models import get_anatomy

    name = get_anatomy(model).head
    if name is None:
        raise ConfigError("eval.head=chunked: the model has no output head; set eval.head=logits")
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    head = getattr(parent, leaf)
    setattr(parent, leaf, _HiddenStates())
    try:
        yield head
    finally:
        setattr(parent, leaf, head)


def attention_kernel(attention: str):
    """Context that pins the SDPA kernel ``attention`` (``auto``: PyTorch's own choice)."""
    if attention == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[attention]
    return sdpa_kernel([getattr(SDPBackend, name)])


def attention_name(model) -> str:
    """The model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "unknown")


def probe(model, ids: torch.Tensor, chunked: bool, attention: str) -> str:
    """A forward of ``ids`` (a few tokens) before the pass: the attention kernel it ran, e.g.
    ``sdpa:FLASH_ATTENTION``; fails early, with a ConfigError, where a pinned SDPA kernel
    cannot run this model or (``chunked``) the model changes its logits after the head.

    Both depend on the model's structure, dtype and device, not on its weights: the answer is
    kept on the model per setting (an eager forward costs ~10 ms of launches at 1B, a few
    percent of a short pass; the model is re-probed after a move or a cast)."""
    key = (chunked, attention, str(ids.device), str(next(model.parameters()).dtype))
    known = model.__dict__.setdefault("_ptqscale_probes", {})
    if key not in known:
        known[key] = _probe(model, ids, chunked)
    return known[key]


def _probe(model, ids: torch.Tensor, chunked: bool) -> str:
    impl, kernels = attention_name(model), set()
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):  # PyTorch's own dispatch decision for these inputs
        try:
            choice = _SDP_NAMES.get(int(torch._fused_sdp_choice(*args, **kwargs)), "?")
        except (RuntimeError, TypeError):  # a private API: never let it stop a pass
            choice = "?"
        kernels.add(choice)
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with head_swapped(model, chunked):
            out = model(input_ids=ids, use_cache=False).logits
            seen = model.get_output_embeddings().seen if chunked else None
    except RuntimeError as e:
        if not any(w in str(e).lower() for w in ("kernel", "backend")):
            raise
        raise ConfigError(f"eval.attention: PyTorch cannot run this model's attention with the "
                          f"pinned kernel ({str(e).splitlines()[0][:200]}); "
                          f"allowed: {list(ATTENTION)}") from e
    finally:
        F.scaled_dot_product_attention = sdpa
    if chunked and not torch.equal(out, seen.to(out.dtype)):
        raise ConfigError(f"eval.head=chunked: {type(model).__name__} changes its logits after "
                          "the head (soft-capping or a scale); set eval.head=logits")
    return impl + (":" + "+".join(sorted(kernels)) if kernels else "")


def _sdp_names() -> dict[int, str]:
    from torch.nn.attention import SDPBackend

    return {int(b.value): n for n, b in SDPBackend.__members__.items()}


_SDP_NAMES = _sdp_names()
