"""Perplexity of a causal LM on a token stream (protocol v1, DESIGN "Measured quantities").

Two presets cut windows of ``seqlen`` tokens from the stream:

- ``gptq``: non-overlapping windows ``stream[i*seqlen:(i+1)*seqlen]``, the remainder dropped;
  every window scores its ``seqlen - 1`` next-token predictions (GPTQ's ``opt_eval``). Scored
  tokens = windows x (seqlen - 1).
- ``rolling``: windows of ``seqlen`` that advance by ``stride``; the first window scores all its
  predictions, each later one only its last ``stride`` (the new tokens), with the rest of the
  window as context, as lm-eval's rolling loglikelihood and the Hugging Face perplexity guide do.
  The last window ends at the stream's end and scores only what is still new, so every token
  after the first is scored exactly once: scored tokens = len(stream) - 1.

NLL is the mean next-token negative log-likelihood in nats over the scored tokens; the logits
are cast to fp32 before log-softmax whatever the weight dtype (bf16 log-softmax loses ~3
significant digits), one window at a time so fp32 logits never exist for a whole batch. The
sum is accumulated in float64 in window order, so the result is bitwise reproducible on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ptqscale.errors import ConfigError

PROTOCOL_VERSION = 1
PRESETS = ("gptq", "rolling")


@dataclass
class EvalConfig:
    """How perplexity is measured.

    Example::

        >>> EvalConfig(preset="rolling", seqlen=512).effective_stride()
        256
    """

    preset: str = "gptq"  # gptq | rolling
    seqlen: int = 2048
    stride: int | None = None  # rolling only; default seqlen // 2
    batch_size: int = 8  # windows per forward pass (changes speed, not the result)
    max_tokens: int | None = None  # evaluate only the first N tokens of the stream

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"eval.preset={self.preset!r} unknown; allowed: {list(PRESETS)}")
        if self.seqlen < 2:
            raise ConfigError(f"eval.seqlen={self.seqlen} must be >= 2 (one prediction needs 2)")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be >= 1")
        if self.preset == "gptq" and self.stride not in (None, self.seqlen):
            raise ConfigError("eval.stride applies to the rolling preset only (gptq: null)")
        if self.preset == "rolling" and not 1 <= self.effective_stride() < self.seqlen:
            raise ConfigError(f"eval.stride={self.stride} must be in [1, seqlen - 1]")
        if self.max_tokens is not None and self.max_tokens < self.seqlen:
            raise ConfigError(f"eval.max_tokens={self.max_tokens} must be >= seqlen={self.seqlen}")

    def effective_stride(self) -> int:
        if self.preset == "gptq":
            return self.seqlen
        return self.stride if self.stride is not None else self.seqlen // 2


@dataclass
class PerplexityResult:
    nll: float  # mean NLL, nats/token
    perplexity: float
    nll_sum: float
    tokens: int  # scored tokens
    windows: int
    preset: str
    seqlen: int
    stride: int
    protocol_version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def validate_eval_config(cfg: EvalConfig, model) -> None:
    """Check ``cfg.seqlen`` against the model's usable context (cheap; no forward pass)."""
    context = model_context(model)
    if context is not None and cfg.seqlen > context:
        raise ConfigError(
            f"eval.seqlen={cfg.seqlen} exceeds the model's context {context} "
            "(model.max_seqlen or the checkpoint's max positions)"
        )


def measure_perplexity(model, stream: torch.Tensor, cfg: EvalConfig,
                       progress: bool = False) -> PerplexityResult:
    """NLL and perplexity of ``model`` on the 1-D token ``stream`` under ``cfg``'s preset.

    Example::

        >>> res = measure_perplexity(model, ids, EvalConfig(seqlen=512))  # doctest: +SKIP
        >>> res.tokens == res.windows * 511  # doctest: +SKIP
        True
    """
    validate_eval_config(cfg, model)
    stream = _check_stream(stream, cfg, model)
    windows = window_plan(stream.numel(), cfg)
    device = next(model.parameters()).device
    # float64 on the model's device: one host sync at the end, not one per window
    total = torch.zeros((), dtype=torch.float64, device=device)
    scored = 0
    batches = range(0, len(windows), cfg.batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"ppl {cfg.preset}/{cfg.seqlen}", unit="batch")
    with torch.inference_mode():
        for b in batches:
            plan = windows[b:b + cfg.batch_size]
            ids = torch.stack([stream[s:s + cfg.seqlen] for s, _ in plan]).to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            for row, (_, first) in enumerate(plan):
                nll = window_nll(logits[row], ids[row], first)
                total += nll.double().sum()
                scored += nll.numel()
    nll_sum = float(total.cpu())
    mean = nll_sum / scored
    return PerplexityResult(mean, math.exp(mean), nll_sum, scored, len(windows), cfg.preset,
                            cfg.seqlen, cfg.effective_stride())


def window_nll(logits: torch.Tensor, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Per-token NLL (fp32) of targets ``ids[first:]`` given ``logits[first-1:-1]`` of one window."""
    return F.cross_entropy(logits[first - 1:-1].float(), ids[first:], reduction="none")


def window_plan(n_tokens: int, cfg: EvalConfig) -> list[tuple[int, int]]:
    """``[(start, first_scored_position), ...]``: every window is ``seqlen`` long."""
    n, stride = cfg.seqlen, cfg.effective_stride()
    if cfg.preset == "gptq":
        return [(i * n, 1) for i in range(n_tokens // n)]
    plan, end = [(0, 1)], n
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        plan.append((new_end - n, n - (new_end - end)))
        end = new_end
    return plan


def model_context(model) -> int | None:
    """Usable context of a loaded model, or None when the model does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    explicit = getattr(config, "ptqscale_max_seqlen", None)
    if explicit:
        return int(explicit)
    from ptqscale.models.loading import context_length

    try:
        return context_length(config)
    except ConfigError:
        return None


def _check_stream(stream: torch.Tensor, cfg: EvalConfig, model) -> torch.Tensor:
    if not isinstance(stream, torch.Tensor) or stream.ndim != 1 or stream.is_floating_point():
        raise ConfigError("stream must be a 1-D integer tensor of token ids")
    if cfg.max_tokens is not None:
        stream = stream[:cfg.max_tokens]
    if stream.numel() < cfg.seqlen:
        raise ConfigError(
            f"the stream has {stream.numel()} tokens, fewer than eval.seqlen={cfg.seqlen}"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(stream.max()) >= vocab or int(stream.min()) < 0):
        raise ConfigError(
            f"token ids span [{int(stream.min())}, {int(stream.max())}] but the model's vocab "
            f"has {vocab}: the tokenizer does not match the model"
        )
    return stream.long()
