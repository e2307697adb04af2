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
significant digits), one window at a time so fp32 logits never exist for a whole batch. Each
window's sum is kept in float64 (``window_nll``: the standard errors come from them,
:func:`window_se`) and the total is their exact sum, so the result is bitwise reproducible on
CPU.

A streamed model (``model.placement=streamed``) is scored by ``models.streaming.walk_logits``:
all windows through one decoder block, then the next, the same batches and arithmetic, so the
same NLL (bitwise on CPU; tests/models/test_streaming.py).

``EvalConfig.compile`` runs the pass with each decoder block compiled (regional compilation:
``torch.compile(block, dynamic=False)``; the blocks share one class, so they share one graph)
and the loss as one compiled kernel per batch: fp32 log-softmax computed on the fly from the
bf16 logits, so no fp32 copy of the logits is written at all. The compiled blocks are swapped
into the model only for the pass and the original modules put back afterwards, also after an
error: the same model object later takes double-backward landscape passes and weight edits.
The eager loss stays ``cross_entropy(logits.float())`` per window: a chunked logsumexp moves
about as many bytes in more kernels, and the loss is a few percent of a pass.

``EvalConfig.head="chunked"`` never materialises the logits of a batch: the head and loss run
in chunks of scored positions (metrics/chunked_head.py; same NLL to float tolerance).
``EvalConfig.attention`` pins the SDPA kernel; ``EvalConfig.cuda_graphs`` replays the compiled
decoder, whole, as CUDA graphs (``mode="reduce-overhead"``). A few-token forward before the
pass records the attention kernel that ran (``env.attention``) and checks both settings apply
to the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ptqscale import console
from ptqscale.errors import ConfigError, PTQScaleError
from ptqscale.metrics.chunked_head import (
    ATTENTION,
    attention_kernel,
    attention_name,
    chunk_nll,
    chunked_losses,
    head_swapped,
    probe,
)
from ptqscale.metrics.tasks import TasksConfig

PROTOCOL_VERSION = 1
PRESETS = ("gptq", "rolling")
HEADS = ("logits", "chunked")
# Compiled graphs one process may hold per compiled function (Dynamo's default is 8): each new
# model structure, dtype or batch shape adds one, and a sweep runs many jobs per process.
RECOMPILE_LIMIT = 64


class EvalCompileError(PTQScaleError, RuntimeError):
    """``eval.compile=true`` but torch.compile could not compile the pass."""


@dataclass
class EvalConfig:
    """How perplexity is measured.

    ``compile`` (default false) compiles each decoder block for the pass (see the module
    docstring). It is off by default because compiling is a per-process cost of seconds to a
    minute, paid again for every new model structure or batch shape, while a 1B model scores
    WikiText-2 test eagerly in a few seconds on one GPU (bench/results/bench_perplexity.md);
    it pays off for long evaluations: big models and corpora, many evaluations per process. It
    is part of the job key: fused kernels round differently, so the NLL moves in its last bits.

    Example::

        >>> EvalConfig(preset="rolling", seqlen=512).effective_stride()
        256
    """

    # Windows per pass change speed, not the result: out of the job key. Keys made before
    # that hashed the batch size, all at 8; hashing 8 for any batch size keeps them.
    # eval.tasks is read by the metric ``tasks`` only, and enters the keys of the jobs that ask
    # for it through that metric (metrics/tasks.py): out of every other key.
    # CUDA graphs replay the compiled kernels as they are: speed only, out of the key.
    not_in_key: ClassVar[tuple[str, ...]] = ("batch_size", "tasks", "cuda_graphs")
    keyed_as: ClassVar[dict[str, int]] = {"batch_size": 8}
    # head and attention change the NLL's last bits: keyed, but only away from what every
    # record before them had (runner/keys.py), so no committed key moves.
    added_later: ClassVar[dict[str, str]] = {"head": "logits", "attention": "auto"}

    preset: str = "gptq"  # gptq | rolling
    seqlen: int = 2048
    stride: int | None = None  # rolling only; default seqlen // 2
    batch_size: int = 8  # windows per forward pass (changes speed, not the result)
    max_tokens: int | None = None  # evaluate only the first N tokens of the stream
    compile: bool = False  # torch.compile the decoder blocks and the loss for the pass
    head: str = "logits"  # logits | chunked: the head and loss in chunks of positions
    attention: str = "auto"  # auto (PyTorch picks) | flash | cudnn | efficient | math (SDPA)
    cuda_graphs: bool = False  # with compile: replay the compiled decoder as CUDA graphs
    tasks: TasksConfig = field(default_factory=TasksConfig)  # lm-eval tasks (metric tasks)

    def __post_init__(self):
        if not isinstance(self.compile, bool):
            raise ConfigError(f"eval.compile={self.compile!r} must be true or false")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"eval.cuda_graphs={self.cuda_graphs!r} must be true or false")
        if self.cuda_graphs and not self.compile:
            raise ConfigError("eval.cuda_graphs=true replays the compiled decoder: set "
                              "eval.compile=true")
        if self.head not in HEADS:
            raise ConfigError(f"eval.head={self.head!r} unknown; allowed: {list(HEADS)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"eval.attention={self.attention!r} unknown; "
                              f"allowed: {list(ATTENTION)}")
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
    # per window, in window order: the NLL sum and the scored tokens (the standard errors of
    # NLL and of a paired dNLL, :func:`window_se`, treat windows as independent draws)
    window_nll: list[float] = field(default_factory=list)
    window_tokens: list[int] = field(default_factory=list)

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
                       progress: bool = False, on_logits=None) -> PerplexityResult:
    """NLL and perplexity of ``model`` on the 1-D token ``stream`` under ``cfg``'s preset.

    ``on_logits(start, first, logits)``, where given, is called for every window in plan order
    with the logits ``[seqlen, vocab]`` (model dtype) the pass scores it from, so another
    metric can read them without a pass of its own (metrics/fidelity.py). ``eval.head=chunked``
    never holds a window's logits: it refuses ``on_logits``.

    Example::

        >>> res = measure_perplexity(model, ids, EvalConfig(seqlen=512))  # doctest: +SKIP
        >>> res.tokens == res.windows * 511  # doctest: +SKIP
        True
    """
    from ptqscale.models.streaming import placement_of, walk_logits, within_budget

    validate_eval_config(cfg, model)
    placement = placement_of(model)
    whole = not (placement.streamed or placement.spread)
    # spread: accelerate's hooks wrap each block's forward and the head; untested with these
    apart = [s for s, on in (("eval.compile=true", cfg.compile),
                             ("eval.head=chunked", cfg.head == "chunked"),
                             (f"eval.attention={cfg.attention}", cfg.attention != "auto")) if on]
    if apart and not whole:
        raise ConfigError(f"{' and '.join(apart)} needs the model in one piece; set "
                          "model.placement=one or leave the eval setting at its default")
    if on_logits is not None and cfg.head == "chunked":
        raise ValueError("measure_perplexity: eval.head=chunked holds no logits for on_logits")
    stream = _check_stream(stream, cfg, model)
    windows = window_plan(stream.numel(), cfg)
    device = placement.device
    # float64 sums on the model's device: one host sync at the end, not one per window
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    plans = [windows[b:b + cfg.batch_size] for b in range(0, len(windows), cfg.batch_size)]
    batches = [torch.stack([stream[s:s + cfg.seqlen] for s, _ in plan]) for plan in plans]
    chunked = cfg.head == "chunked"
    with torch.inference_mode(), within_budget(placement, "perplexity"), \
            attention_kernel(cfg.attention):
        # recorded as env.attention; a streamed model's blocks are not run whole here
        model.ptqscale_attention = attention_name(model) if not whole else probe(
            model, batches[0][:1, :16].to(device), chunked, cfg.attention)
        with compiled_blocks(model, cfg.compile, chunk_nll if chunked else batch_nll,
                             cfg.cuda_graphs) as compiled_nll, head_swapped(model, chunked) as head:
            if placement.streamed:  # all windows through one block, then the next
                logits_of = walk_logits(model, batches, placement)
            else:
                logits_of = ((b, _forward(model, ids.to(device), cfg.cuda_graphs))
                             for b, ids in enumerate(batches))
            for b, logits in console.progress(logits_of, f"ppl {cfg.preset}/{cfg.seqlen}",
                                              progress, unit="batch", total=len(batches)):
                ids = batches[b].to(device)
                if on_logits is not None:
                    for row, (start, first) in enumerate(plans[b]):
                        on_logits(start, first, logits[row])
                losses = (chunked_losses(logits, ids, plans[b], head, compiled_nll) if chunked
                          else _window_losses(logits, ids, plans[b], compiled_nll))
                for nll in losses:
                    sums.append(nll.double().sum())
                    counts.append(nll.numel())
    per_window = torch.stack(sums).cpu().tolist()
    nll_sum, scored = math.fsum(per_window), sum(counts)
    mean = nll_sum / scored
    return PerplexityResult(mean, math.exp(mean), nll_sum, scored, len(windows), cfg.preset,
                            cfg.seqlen, cfg.effective_stride(), window_nll=per_window,
                            window_tokens=counts)


def window_se(window_sums, window_tokens) -> float:
    """Standard error of the mean per-token value ``sum(window_sums) / sum(window_tokens)``,
    windows taken as the independent draws (a cluster-robust ratio estimator): tokens within a
    window share context and are correlated, so the per-token spread would understate it.
    For a paired dNLL pass the per-window differences of the quantized and the full-precision
    sums: both see the same windows, so the text's own variation cancels. NaN below 2 windows.
    """
    d = torch.as_tensor(window_sums, dtype=torch.float64)
    n = torch.as_tensor(window_tokens, dtype=torch.float64)
    w = d.numel()
    if w < 2 or n.numel() != w:
        return math.nan
    resid = d - n * (d.sum() / n.sum())
    return float(torch.sqrt(w / (w - 1) * (resid ** 2).sum()) / n.sum())


def _forward(model, ids: torch.Tensor, cuda_graphs: bool) -> torch.Tensor:
    if cuda_graphs:  # a new iteration: the graphs may reuse the last batch's output memory
        torch.compiler.cudagraph_mark_step_begin()
    return model(input_ids=ids, use_cache=False).logits


# fp32 logits scored at once: a 2048-token window over a 128k vocabulary is 1 GB in fp32,
# too much beside a budget (model.max_gpu_memory); 2^26 floats (256 MB) at a time bound it.
# Rows are scored independently, so the values are those of one call.
LOSS_CHUNK_FLOATS = 2**26


def window_nll(logits: torch.Tensor, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Per-token NLL (fp32) of targets ``ids[first:]`` given ``logits[first-1:-1]`` of one window."""
    pred, target = logits[first - 1:-1], ids[first:]
    rows = max(1, LOSS_CHUNK_FLOATS // pred.shape[-1])
    return torch.cat([F.cross_entropy(pred[i:i + rows].float(), target[i:i + rows],
                                      reduction="none") for i in range(0, len(pred), rows)])


def batch_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` of every next-token prediction in a batch (fp32 log-softmax).

    Meant to be compiled (one fused kernel that never writes the fp32 logits); eagerly it
    would hold a whole batch of fp32 logits, which is what ``window_nll`` avoids.
    """
    b, t, v = logits.shape
    flat = logits[:, :-1].float().reshape(b * (t - 1), v)
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none").view(b, t - 1)


@contextmanager
def compiled_blocks(model, enabled: bool = True, loss=None, cuda_graphs: bool = False):
    """Swap compiled decoder blocks into ``model`` for a ``with`` body; yield the compiled loss.

    Yields None (and changes nothing) when not ``enabled``. The original block modules are put
    back on exit, also after an error; a failed compilation raises :class:`EvalCompileError`.
    ``loss``: the loss function to compile (default :func:`batch_nll`; ``chunk_nll`` for
    ``eval.head=chunked``); ``cuda_graphs``: the whole decoder instead, with
    ``mode="reduce-overhead"`` (:func:`_compiled_parts` says why).

    Example::

        >>> with torch.inference_mode(), compiled_blocks(model) as nll_fn:  # doctest: +SKIP
        ...     nll = nll_fn(model(input_ids=ids).logits, ids)
    """
    if not enabled:
        yield None
        return
    from ptqscale.models import get_anatomy

    swaps = _compiled_parts(model, get_anatomy(model).block_prefix, cuda_graphs)
    done = []
    try:
        for owner, key, original in swaps:
            _put(owner, key, _compile(original, "reduce-overhead" if cuda_graphs else None))
            done.append((owner, key, original))
        limits = dict(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True)
        with torch._dynamo.config.patch(**limits):   # the loss never as graphs: its outputs
            yield _compile(loss or batch_nll)          # are kept across calls
    except (torch._dynamo.exc.TorchDynamoException,
            torch._dynamo.exc.FailOnRecompileLimitHit) as e:
        raise EvalCompileError(_compile_failed(e)) from e
    finally:
        for owner, key, original in done:
            _put(owner, key, original)


def _compiled_parts(model, block_prefix: str, cuda_graphs: bool) -> list[tuple]:
    """What ``compiled_blocks`` swaps: ``(owner, index or attribute, module)``. Each decoder
    block; or, for CUDA graphs, the decoder (embeddings, blocks, final norm) whole: CUDA graph
    trees begin a new iteration at every call of a compiled function in inference and may
    reuse the previous call's output memory, so compiled blocks would overwrite their own
    input (the block before's output). The decoder is called once per batch."""
    if not cuda_graphs:
        holder = model.get_submodule(block_prefix)
        return [(holder, i, block) for i, block in enumerate(holder)]
    decoder = block_prefix.rpartition(".")[0]
    if not decoder:
        raise ConfigError(f"eval.cuda_graphs=true replays the decoder that holds the blocks "
                          f"({block_prefix!r}) as one graph, and this model has none: set "
                          "eval.cuda_graphs=false")
    owner, _, leaf = decoder.rpartition(".")
    return [(model.get_submodule(owner), leaf, model.get_submodule(decoder))]


def _put(owner, key, module) -> None:
    if isinstance(key, int):
        owner[key] = module
    else:
        setattr(owner, key, module)


def _compile(obj, mode: str | None = None):
    # dynamic=False: one static graph per batch shape (a short last batch adds one); blocks of
    # one class reuse it, since Dynamo guards on their parameters' shapes, not their identity
    try:
        return torch.compile(obj, dynamic=False, mode=mode)
    except Exception as e:  # torch.compile refuses this interpreter or platform
        raise EvalCompileError(_compile_failed(e)) from e


def _compile_failed(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"eval.compile=true: torch.compile of the perplexity pass (decoder blocks, loss) failed "
            f"({type(e).__name__}: {first}); set eval.compile=false to measure eagerly")


def _window_losses(logits, ids, plan, compiled_nll) -> list[torch.Tensor]:
    """Per-token NLL of each window's scored tokens, in window order."""
    if compiled_nll is None:
        return [window_nll(logits[row], ids[row], first) for row, (_, first) in enumerate(plan)]
    nll = compiled_nll(logits, ids)
    return [nll[row, first - 1:] for row, (_, first) in enumerate(plan)]


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
