"""Train one member of a reference family from scratch (plain torch loop, no Trainer).

CLI::

    python -m ptqscale.zoo.train --size 1m --data ../shared/data/gutenberg-en \\
        --out /work/zoo-ckpts/gutenberg-llama-1m [--tokens N] [--device cuda] [--set KEY=VALUE]

Writes a Hugging Face folder (config.json, model.safetensors, tokenizer files) plus
``zoo.json``: the full recipe, data hashes, losses along the way, the float32 evaluation of
the saved weights, device, throughput and wall time. ``zoo.json`` is written last, so a
folder without it is an unfinished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from copy import deepcopy
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptqscale import console
from ptqscale.errors import ConfigError
from ptqscale.models import resolve_device
from ptqscale.zoo.config import ZooConfig, lr_at
from ptqscale.zoo.data import EOS, gather_windows, token_stream, train_order
from ptqscale.zoo.evaluate import evaluation_sets, nll_sum, report, write_json
from ptqscale.zoo.model import build_model, count_parameters
from ptqscale.zoo.tokenizer import hf_tokenizer, load_tokenizer

ZOO_FORMAT = 1  # layout of zoo.json
GOLDEN_WINDOWS = 4  # first Gutenberg-test windows whose NLL is stored for a CPU re-check
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ptqscale" / "zoo"


def default_wikitext() -> Path:
    from ptqscale.assets import DATA

    return DATA / "wikitext-2-raw" / "wiki.test.raw"


def make_optimizer(model: torch.nn.Module, cfg: ZooConfig, device: torch.device):
    """AdamW; weight decay on matrices and the embedding, none on norm gains (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=cfg.betas, eps=cfg.eps,
                             fused=device.type == "cuda")


@dataclasses.dataclass
class LoopState:
    history: list = dataclasses.field(default_factory=list)  # [step, loss, lr, grad_norm]
    evals: list = dataclasses.field(default_factory=list)  # {"step", "valid_nll"}
    best: dict | None = None
    best_step: int = -1
    best_nll: float = float("inf")
    losses: list = dataclasses.field(default_factory=list)  # every step's training loss
    train_s: float = 0.0


def _autocast(cfg: ZooConfig, device: torch.device):
    if device.type == "cuda" and cfg.train_dtype != "float32":
        return torch.autocast("cuda", dtype=DTYPES[cfg.train_dtype])
    return torch.autocast(device.type, enabled=False)  # CPU trains in float32


def _select(state: LoopState, model, cfg, valid_windows, step: int, device, log) -> None:
    """Checkpoint selection: valid NLL at this step; keep a CPU copy of the best weights."""
    dtype = DTYPES[cfg.train_dtype] if device.type == "cuda" else None
    total, count = nll_sum(model, valid_windows, batch_size=cfg.batch_seqs,
                           autocast=dtype if dtype != torch.float32 else None)
    nll = total / count
    state.evals.append({"step": step, "valid_nll": nll})
    if nll < state.best_nll:
        state.best_nll, state.best_step = nll, step
        state.best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    log(f"  eval step {step}: valid nll {nll:.4f} (best {state.best_nll:.4f} @ {state.best_step})")


def train_loop(cfg: ZooConfig, model, tokens: torch.Tensor, starts: np.ndarray,
               valid_windows: np.ndarray, device: torch.device, log=console.say,
               progress: bool = True) -> LoopState:
    """The optimization: ``cfg.steps`` AdamW steps over ``starts`` in order; returns the state."""
    opt = make_optimizer(model, cfg, device)
    offsets = torch.arange(cfg.seqlen + 1, device=device)
    starts_t = torch.as_tensor(starts, device=device)
    eval_at = {round(cfg.steps * (k + 1) / cfg.evals) for k in range(cfg.evals)}
    log_every = max(1, cfg.steps // 128)
    state, window, t0 = LoopState(), [], time.time()
    eval_s = 0.0
    model.train()
    for step in console.progress(range(cfg.steps), f"train {cfg.size}", progress, unit="step"):
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = tokens[starts_t[step * cfg.batch_seqs:(step + 1) * cfg.batch_seqs, None]
                       + offsets].long()
        with _autocast(cfg, device):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(torch.stack([loss.detach(), gnorm.detach().float()]))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            _log_window(state, window, step, lr, cfg, t0 + eval_s, log)
            window = []
        if step + 1 in eval_at:
            t_eval = time.time()
            _select(state, model, cfg, valid_windows, step + 1, device, log)
            eval_s += time.time() - t_eval
    state.train_s = time.time() - t0 - eval_s
    return state


def _log_window(state: LoopState, window: list, step: int, lr: float, cfg: ZooConfig,
                t0: float, log) -> None:
    vals = torch.stack(window).cpu()  # the one host sync per logging interval
    loss, gnorm = float(vals[:, 0].mean()), float(vals[:, 1].mean())
    if not np.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at step {step + 1}")
    state.history.append([step + 1, round(loss, 5), lr, round(gnorm, 5)])
    state.losses.extend(vals[:, 0].tolist())
    if (step + 1) % max(1, cfg.steps // 10) < len(window) or step + 1 == cfg.steps:
        rate = (step + 1) * cfg.batch_tokens / max(1e-9, time.time() - t0)
        log(f"  step {step + 1}/{cfg.steps} loss {loss:.4f} lr {lr:.2e} gnorm {gnorm:.3f} "
            f"{rate / 1e3:.0f}k tok/s")


def _environment(device: torch.device) -> dict:
    import tokenizers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": str(device), "device_name": name or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version(),
            "hostname": platform.node(), "command": " ".join(sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save_member(model, cfg: ZooConfig, tokenizer, out_dir: str | Path) -> None:
    """An ordinary Hugging Face folder: config.json, model.safetensors, tokenizer files.

    Saves a copy cast to ``cfg.save_dtype`` (the caller's model is left as it is; casting it
    in place would also round its float32 RoPE buffers, which the loader recomputes).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = deepcopy(model).to(DTYPES[cfg.save_dtype])  # deepcopy keeps the embedding tie
    copy.config.dtype = cfg.save_dtype
    copy.save_pretrained(out_dir)
    hf_tokenizer(tokenizer).save_pretrained(out_dir)


def load_member(path: str | Path, device: str | torch.device = "cpu"):
    """A saved member through the normal loader, in float32 (what ``report`` scores)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)


def _prepare(cfg: ZooConfig, data_dir, cache_dir, tokenizer_path, device, log):
    tok = load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise ConfigError(f"zoo.vocab_size={cfg.vocab_size} but the tokenizer has "
                          f"{tok.get_vocab_size()} ids")
    t0 = time.time()
    train_ids, train_info = token_stream(tok, data_dir, "train", cache_dir)
    valid_ids, valid_info = token_stream(tok, data_dir, "valid", cache_dir)
    starts = train_order(len(train_ids), cfg.seqlen, cfg.steps * cfg.batch_seqs, cfg.data_seed)
    n_valid = min(cfg.valid_tokens // cfg.seqlen, (len(valid_ids) - 1) // cfg.seqlen)
    valid = gather_windows(valid_ids, np.arange(n_valid) * cfg.seqlen, cfg.seqlen)
    tokens = torch.from_numpy(np.asarray(train_ids, dtype=np.int32)).to(device)
    log(f"  data: {train_info['tokens']:,} train tokens, {len(starts):,} windows used, "
        f"{n_valid} valid windows ({time.time() - t0:.1f}s)")
    return tok, tokens, starts, valid, {"train": train_info, "valid": valid_info}


def train_member(cfg: ZooConfig, data_dir: str | Path, out_dir: str | Path, *,
                 device: str = "auto", cache_dir: str | Path | None = None,
                 tokenizer_path: str | Path | None = None,
                 wikitext_test: str | Path | None = None, log=console.say) -> dict:
    """Train, select, save and evaluate one member; returns the zoo.json record.

    Example (CPU, a few steps)::

        >>> cfg = ZooConfig(size="200k", seqlen=64, batch_tokens=256, train_tokens=2560)
        >>> rec = train_member(cfg, "../shared/data/gutenberg-en", "/tmp/m")  # doctest: +SKIP
    """
    t_start, out_dir, dev = time.time(), Path(out_dir), resolve_device(device, "device")
    cache_dir = Path(cache_dir) if cache_dir else default_cache()
    wikitext_test = Path(wikitext_test) if wikitext_test else default_wikitext()
    log(f"[{cfg.name}] {cfg.layers}x{cfg.hidden} heads {cfg.heads} ffn {cfg.ffn} "
        f"lr {cfg.peak_lr:.2e} on {dev}")
    tok, tokens, starts, valid, data = _prepare(cfg, data_dir, cache_dir, tokenizer_path, dev,
                                                log)
    sets = evaluation_sets(tok, data_dir, wikitext_test, cfg.seqlen, cache_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok.token_to_id(EOS)).to(dev)
    state = train_loop(cfg, model, tokens, starts, valid, dev, log)
    model.load_state_dict(state.best)
    save_member(model, cfg, tok, out_dir)
    del model, tokens
    reloaded = load_member(out_dir, dev)  # score exactly what was saved, through the loader
    results = report(reloaded, sets, batch_size=cfg.batch_seqs)
    golden_windows = sets["gutenberg_test"]["windows"][:GOLDEN_WINDOWS]
    g_sum, g_count = nll_sum(reloaded, golden_windows)
    tail = state.losses[-max(1, cfg.steps // 20):]
    record = {
        "zoo_format": ZOO_FORMAT, "name": cfg.name, "family": cfg.family, "size": cfg.size,
        "recipe": cfg.to_dict(), "params": count_parameters(reloaded),
        "tokenizer": {"sha256": _sha(tok.to_str()), "vocab_size": tok.get_vocab_size()},
        "data": {**data, "data_dir": str(data_dir)},
        "train": {"final_train_loss": float(np.mean(tail)), "final_train_loss_steps": len(tail),
                  "best_step": state.best_step, "best_valid_nll_selection": state.best_nll,
                  "evals": state.evals, "history": state.history},
        "eval": results,
        "golden": {"set": "gutenberg_test", "windows": GOLDEN_WINDOWS, "seqlen": cfg.seqlen,
                   "nll": g_sum / g_count, "dtype": "float32"},
        "run": {**_environment(dev), "train_s": round(state.train_s, 2),
                "tokens_per_s": round(cfg.train_tokens / max(state.train_s, 1e-9), 1),
                "wall_s": round(time.time() - t_start, 2)},
    }
    write_json(out_dir / "zoo.json", record)
    log(f"[{cfg.name}] done in {record['run']['wall_s']:.0f}s: train {tail[-1]:.4f} "
        + " ".join(f"{k} {v['nll']:.4f}" for k, v in results.items()))
    return record


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def parse_overrides(pairs: list[str], base: ZooConfig) -> ZooConfig:
    """``KEY=VALUE`` strings onto a config, typed by the field; unknown keys are fatal."""
    fields = {f.name: f for f in dataclasses.fields(ZooConfig)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with KEY one of "
                              f"{sorted(fields)}")
        current = getattr(base, key)
        if isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            changes[key] = tuple(float(v) for v in value.split(","))
        else:
            changes[key] = type(current)(value)
    return base.replace(**changes)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="gutenberg-en folder (train/valid/test)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, help="train_tokens (same for every size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--cache", help=f"token cache folder (default {default_cache()})")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the family's, committed)")
    p.add_argument("--wikitext", help="wiki.test.raw (default: the embedded copy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ZooConfig field, e.g. --set family=zoo-wd0 "
                        "--set weight_decay=0")


def quiet_progress_bars() -> None:
    """No per-call tqdm bars from transformers' save/load in CLI logs (they fill GPU logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def config_from_args(args, size: str) -> ZooConfig:
    cfg = parse_overrides(args.set, ZooConfig(size=size))
    return cfg.replace(train_tokens=args.tokens) if args.tokens else cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ptqscale.zoo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", required=True)
    add_common_args(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args, args.size)  # every value checked before any data is read
    quiet_progress_bars()
    console.quiet_third_party()
    train_member(cfg, args.data, args.out, device=args.device, cache_dir=args.cache,
                 tokenizer_path=args.tokenizer, wikitext_test=args.wikitext)


if __name__ == "__main__":
    main()
