"""Train a family of ``conf/zoo/<family>.yaml``: every size, checkpoints along the D axis.

CLI (one command reproduces a family; ``all`` trains every family in conf/zoo)::

    python -m ptqscale.zoo.factory train zoo-gpt2 --data ../shared/data/gutenberg-en \\
        --out /work/zoo-ckpts [--device cuda] [--sizes 25k,55k] [--jobs 4]
    python -m ptqscale.zoo.factory plan all        # members, steps, tokens, bytes; no training
    python -m ptqscale.zoo.factory pack --out DIR --to DIR   # manifest + tar.xz parts
    python -m ptqscale.zoo.factory conf            # (re)writes conf/model/<member>.yaml

Layout under ``--out``: ``<family>/tokenizer/`` (the family's BPE, a transformers tokenizer
folder) and ``<family>/<family>-<size>-x<mult>/`` per checkpoint: config.json,
model.safetensors and ``zoo.json`` (recipe, shape, tokens seen, epochs, how often a
training token was seen at most, losses, evaluation, device, timings). ``zoo.json`` is
written last; a size whose checkpoints all have one is skipped on a re-run.

Each member is one run along one data order: a constant LR after warmup, and every
checkpoint a branch off that run that decays the LR over its last ``cooldown_frac``
(family.py says why). Data repeat when the checkpoint needs more windows than the
family's training text holds: epoch e visits all windows in the permutation seeded
``data_seed + e``; ``zoo.json`` records the epochs and the most times a token was seen.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptqscale import console
from ptqscale.errors import ConfigError
from ptqscale.precision import true_float32
from ptqscale.zoo.data import (
    EOS,
    _encode_books,
    gutenberg_documents,
    sha256_file,
    split_files,
    tokenizer_corpus,
)
from ptqscale.zoo.evaluate import gptq_ids, nll_sum, write_json
from ptqscale.zoo.family import FamilyConfig
from ptqscale.zoo.presets import build_model, count_parameters
from ptqscale.zoo.tokenizer import hf_tokenizer, train_tokenizer

ZOO_FORMAT = 2  # zoo.json of a family-factory checkpoint (format 1: the gutenberg-llama family)
GOLDEN_WINDOWS = 2  # first Gutenberg-test windows whose NLL is stored for a CPU re-check
LOG_EVERY = 8  # steps per history entry (mean loss and grad norm over them)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- data -------------------------------------------------------------------------------------

def prepare_data(fam: FamilyConfig, data_dir: str | Path, out: Path, log=console.say) -> dict:
    """Fit (or check) the family's tokenizer, tokenize its training text and eval windows.

    The BPE is fitted on the training text itself, so its vocabulary is the family's own; a
    tokenizer already under ``out/tokenizer`` must be byte-identical to the refit (the fit is
    deterministic), else the folder belongs to another recipe and training stops.
    """
    t0 = time.time()
    texts = tokenizer_corpus(data_dir, fam.train_chars, fam.train_shards)
    tok = train_tokenizer(texts, fam.vocab_size)
    saved = out / "tokenizer" / "tokenizer.json"
    if saved.exists():
        from tokenizers import Tokenizer

        if Tokenizer.from_file(str(saved)).to_str() != tok.to_str():
            raise ConfigError(f"{saved} differs from the tokenizer this recipe fits: another "
                              "recipe wrote this folder; use a fresh --out")
    else:
        hf_tokenizer(tok).save_pretrained(out / "tokenizer")
    eos = tok.token_to_id(EOS)
    ids = _encode_books(tok, iter(texts), eos)
    windows = (len(ids) - 1) // fam.seqlen
    evals = {}
    for split in ("valid", "test"):
        # the GPTQ protocol on a prefix of the joined text: 8 characters per wanted token
        # (text runs ~3.5 per token) end it far past the last window, and a byte-level BPE
        # splits on words first, so the windows are those of the whole text, for a fraction
        # of the tokenizing time
        text = "\n\n".join(gutenberg_documents(data_dir, split))[: 8 * fam.eval_tokens]
        split_ids = gptq_ids(tok, [text])
        n = min(fam.eval_tokens // fam.seqlen, len(split_ids) // fam.seqlen)
        evals[f"gutenberg_{split}"] = np.asarray(split_ids[: n * fam.seqlen],
                                                 dtype=np.int64).reshape(n, fam.seqlen)
    used = split_files(data_dir, "train")[: fam.train_shards] + [
        split_files(data_dir, split)[0] for split in ("valid", "test")]
    sources = {p.name: sha256_file(p) for p in used}
    info = {"corpus": fam.corpus, "data_dir": str(data_dir), "sources": sources,
            "train_chars": sum(map(len, texts)), "train_tokens": int(ids.size),
            "train_windows": windows, "books": len(texts),
            "sha256_tokens": hashlib.sha256(ids.tobytes()).hexdigest(),
            "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
            "eval_windows": {k: len(v) for k, v in evals.items()}}
    log(f"[{fam.family}] data: {info['train_tokens']:,} train tokens ({windows:,} windows of "
        f"{fam.seqlen}) from {info['train_chars']:,} chars; tokenizer {fam.vocab_size} ids "
        f"({time.time() - t0:.1f}s)")
    return {"ids": ids, "eos": eos, "evals": evals, "info": info}


def window_order(n_windows: int, needed: int, seed: int) -> np.ndarray:
    """Window indices in training order: epoch e is a permutation seeded ``seed + e``.

    Example::

        >>> order = window_order(4, 10, 0)
        >>> len(order), sorted(order[:4].tolist()) == [0, 1, 2, 3]
        (10, True)
    """
    epochs = -(-needed // n_windows)
    return np.concatenate([np.random.default_rng(seed + e).permutation(n_windows)
                           for e in range(epochs)])[:needed]


def repeats(fam: FamilyConfig, mult: float, n_windows: int) -> dict:
    """How much of the training text a checkpoint saw: epochs and the most times per token."""
    seen = fam.steps(mult) * fam.batch_seqs
    return {"epochs": round(seen / n_windows, 6), "max_times_seen": -(-seen // n_windows),
            "min_times_seen": seen // n_windows}


# ---- training ---------------------------------------------------------------------------------

def lr_main(fam: FamilyConfig, size: str, step: int) -> float:
    """The constant-LR run: linear warmup over ``warmup_steps``, then the peak."""
    peak = fam.peak_lr(size)
    return peak * (step + 1) / fam.warmup_steps if step < fam.warmup_steps else peak


def lr_branch(fam: FamilyConfig, size: str, mult: float, step: int) -> float:
    """A checkpoint's cooldown: linear from the peak to ``min_lr_ratio`` x peak at its end."""
    peak, start, cool = fam.peak_lr(size), fam.branch_start(mult), fam.cooldown_steps(mult)
    return peak * (1 - (1 - fam.min_lr_ratio) * (step - start + 1) / cool)


def make_optimizer(model, fam: FamilyConfig, lr: float, device: torch.device):
    """AdamW; weight decay on matrices and tables, none on norm gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": fam.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=fam.betas, eps=fam.eps,
                             fused=device.type == "cuda")


class Run:
    """One model and its optimizer walking the shared data order (the main run or a branch)."""

    def __init__(self, fam, model, opt, batches, device):
        self.fam, self.model, self.opt, self.batches, self.device = fam, model, opt, batches, device
        self.window, self.history = [], []

    def step(self, step: int, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch = self.batches(step)
        ctx = (torch.autocast("cuda", dtype=DTYPES[self.fam.train_dtype])
               if self.device.type == "cuda" and self.fam.train_dtype != "float32"
               else torch.autocast(self.device.type, enabled=False))
        with ctx:
            logits = self.model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.fam.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.window.append(torch.stack([loss.detach(), gnorm.detach().float()]))
        if len(self.window) == LOG_EVERY:
            self.flush(step, lr)

    def flush(self, step: int, lr: float) -> None:
        if not self.window:
            return
        vals = torch.stack(self.window).cpu()  # the one host sync per LOG_EVERY steps
        loss = float(vals[:, 0].mean())
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.fam.family}: training loss {loss} at step {step + 1}")
        self.history.append([step + 1, round(loss, 5), lr, round(float(vals[:, 1].mean()), 5)])
        self.window = []

    def fork(self) -> Run:
        """A branch: copies of the model and of the optimizer state, the history so far."""
        model = copy.deepcopy(self.model)
        opt = make_optimizer(model, self.fam, self.opt.param_groups[0]["lr"], self.device)
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        branch = Run(self.fam, model, opt, self.batches, self.device)
        branch.history = list(self.history)
        return branch


def train_member(fam: FamilyConfig, size: str, data: dict, out: Path, device: torch.device,
                 env: dict, log=console.say) -> list[dict]:
    """Train one size along the D axis; writes one folder per checkpoint, returns the records."""
    t0, shape = time.time(), fam.shape(size)
    model = build_model(fam, shape, data["eos"]).to(device)
    params = count_parameters(model, fam.preset)
    log(f"[{fam.family}-{size}] {shape.layers}x{shape.hidden} heads {shape.heads} ffn "
        f"{shape.ffn} lr {fam.peak_lr(size):.2e}: {params['non_embedding']:,} non-embedding")
    last = max(fam.steps(m) for m in fam.checkpoints)
    order = window_order(data["info"]["train_windows"], last * fam.batch_seqs, fam.data_seed)
    tokens = torch.from_numpy(np.asarray(data["ids"], dtype=np.int32)).to(device)
    starts = torch.as_tensor(order * fam.seqlen, device=device)
    offsets = torch.arange(fam.seqlen + 1, device=device)

    def batches(step):
        return tokens[starts[step * fam.batch_seqs:(step + 1) * fam.batch_seqs, None]
                      + offsets].long()

    main = Run(fam, model, make_optimizer(model, fam, lr_main(fam, size, 0), device), batches,
               device)
    records, done = [], 0  # steps the main run has taken
    for mult in sorted(fam.checkpoints, key=fam.branch_start):
        for s in range(done, fam.branch_start(mult)):
            main.step(s, lr_main(fam, size, s))
        done = fam.branch_start(mult)
        branch = main.fork()
        for s in range(done, fam.steps(mult)):
            branch.step(s, lr_branch(fam, size, mult, s))
        branch.flush(fam.steps(mult) - 1, lr_branch(fam, size, mult, fam.steps(mult) - 1))
        rec = save_checkpoint(fam, size, mult, branch, data, params, out, env, device)
        rec["run"]["member_s_so_far"] = round(time.time() - t0, 2)
        write_json(out / rec["name"] / "zoo.json", rec)
        log(f"  {rec['name']}: {rec['checkpoint']['tokens']:,} tokens "
            f"({rec['checkpoint']['epochs']:.2f} epochs) train {rec['train']['final_loss']:.4f} "
            f"valid {rec['eval']['gutenberg_valid']['nll']:.4f} ({time.time() - t0:.0f}s)")
        records.append(rec)
        del branch
    return records


def save_checkpoint(fam, size, mult, branch: Run, data, params, out: Path, env: dict, device):
    """Save a bf16 (``save_dtype``) copy, reload it in float32, evaluate; the zoo.json record."""
    from transformers import AutoModelForCausalLM

    name = fam.member_name(size, mult)
    folder = out / name
    saved = copy.deepcopy(branch.model).to(DTYPES[fam.save_dtype])
    saved.config.dtype = fam.save_dtype
    saved.save_pretrained(folder)
    del saved
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
    with true_float32():  # true float32 scores on any GPU
        evals = {}
        for key, windows in data["evals"].items():
            total, count = nll_sum(reloaded, windows, batch_size=fam.batch_seqs)
            evals[key] = {"nll": total / count, "nll_sum": total, "tokens": count,
                          "windows": len(windows), "seqlen": fam.seqlen, "protocol": "gptq-prefix"}
        g_sum, g_count = nll_sum(reloaded, data["evals"]["gutenberg_test"][:GOLDEN_WINDOWS])
    tail = [h[1] for h in branch.history[-2:]]
    return {
        "zoo_format": ZOO_FORMAT, "name": name, "family": fam.family, "size": size,
        "preset": fam.preset, "architecture": type(reloaded).__name__,
        "checkpoint": {"multiple": mult, "tokens": fam.steps(mult) * fam.batch_tokens,
                       "steps": fam.steps(mult), "branch_start": fam.branch_start(mult),
                       "cooldown_steps": fam.cooldown_steps(mult),
                       **repeats(fam, mult, data["info"]["train_windows"])},
        "shape": {**vars(fam.shape(size)), "peak_lr": fam.peak_lr(size)},
        "params": params, "recipe": fam.to_dict(), "recipe_file": fam.path,
        "tokenizer": {"path": "../tokenizer", "sha256": data["info"]["tokenizer_sha256"],
                      "vocab_size": fam.vocab_size},
        "data": {k: v for k, v in data["info"].items() if k != "tokenizer_sha256"},
        "weights_sha256": sha256_file(folder / "model.safetensors"),
        "train": {"final_loss": float(np.mean(tail)) if tail else float("nan"),
                  "history": branch.history},
        "eval": evals,
        "golden": {"set": "gutenberg_test", "windows": GOLDEN_WINDOWS, "seqlen": fam.seqlen,
                   "nll": g_sum / g_count, "dtype": "float32"},
        "run": dict(env),
    }


def member_done(fam: FamilyConfig, size: str, out: Path) -> bool:
    return all((out / fam.member_name(size, m) / "zoo.json").exists() for m in fam.checkpoints)


def train_family(fam: FamilyConfig, data_dir: str | Path, out_root: str | Path,
                 device: str = "auto", sizes: list[str] | None = None,
                 deterministic: bool = True, log=console.say) -> list[dict]:
    """Train every size of ``fam`` (smallest first) under ``out_root/<family>``; idempotent."""
    from ptqscale.models import resolve_device
    from ptqscale.zoo.train import _environment, quiet_progress_bars

    sizes = list(fam.sizes) if sizes is None else sizes
    for s in sizes:
        fam.shape(s)  # unknown sizes fail before any data is read
    dev = resolve_device(device, "device")
    if deterministic:
        # same weights from the same seed on the same machine and software; CUDA matmuls
        # need this workspace setting before the first cuBLAS call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    quiet_progress_bars()
    out = Path(out_root) / fam.family
    todo = [s for s in sorted(sizes, key=fam.sizes.get) if not member_done(fam, s, out)]
    for s in set(sizes) - set(todo):
        log(f"[{fam.family}-{s}] all checkpoints present, skipped")
    if not todo:
        return []
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(fam, data_dir, out, log)
    env = {**_environment(dev), "deterministic": deterministic,
           "torch_threads": torch.get_num_threads()}
    records = []
    for s in todo:
        try:
            records += train_member(fam, s, data, out, dev, env, log)
        except FloatingPointError as err:  # a diverged size must not cost the family's others
            log(f"[{fam.family}-{s}] FAILED: {err}")
            write_json(out / f"{fam.family}-{s}.failed.json", {"error": str(err), **env})
    return records


# ---- command line -----------------------------------------------------------------------------

def _families(names: list[str]) -> list[FamilyConfig]:
    from ptqscale.zoo.family import family_names, load_family

    names = family_names() if names == ["all"] else names
    return [load_family(n) for n in names]  # every recipe validated before any training


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ptqscale.zoo import manifest

    p = argparse.ArgumentParser(prog="python -m ptqscale.zoo.factory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train families (names in conf/zoo, a YAML path, or all)")
    t.add_argument("families", nargs="+")
    t.add_argument("--data", required=True, help="gutenberg-en folder (train-*.jsonl.xz)")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--sizes", help="comma-separated subset of the family's sizes")
    t.add_argument("--jobs", type=int, default=1, help="families trained side by side")
    t.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    pl = sub.add_parser("plan", help="members, steps, tokens, FLOPs and bytes; trains nothing")
    pl.add_argument("families", nargs="+")
    pk = sub.add_parser("pack", help="manifest.json + tar.xz parts of the trained checkpoints")
    pk.add_argument("--out", required=True, help="the --out of train")
    pk.add_argument("--to", required=True, help="folder for manifest.json and the parts")
    pk.add_argument("--part-mib", type=float, default=19.0,
                    help="raw MiB per part before xz (bf16 weights shrink to ~0.72)")
    sub.add_parser("conf", help="(re)write conf/model/<member>.yaml for every family")
    args = p.parse_args(argv)
    console.quiet_third_party()
    if args.verb == "plan":
        print(manifest.plan_table(_families(args.families)))
    elif args.verb == "pack":
        manifest.pack(args.out, args.to, args.part_mib)
    elif args.verb == "conf":
        for path in manifest.write_model_confs(_families(["all"])):
            print(path)
    else:
        fams = _families(args.families)
        if args.sizes:
            for fam in fams:
                [fam.shape(s) for s in args.sizes.split(",")]
        if args.jobs > 1 and len(fams) > 1:
            from ptqscale.zoo.launch import side_by_side

            side_by_side(args, fams)
            return
        for fam in fams:
            train_family(fam, args.data, args.out, args.device,
                         args.sizes.split(",") if args.sizes else None, args.deterministic)


if __name__ == "__main__":
    main()
