"""What a family costs before training, what it gave after, and its conf/model entries.

- ``plan_table``: members, shapes, steps, tokens, FLOPs, checkpoint bytes and an estimate of
  GPU seconds, from the recipes alone (models built on the meta device).
- ``pack``: ``manifest.json`` (every checkpoint's recipe, tokens seen, epochs,
  evaluation and weight hash), ``zoo.md`` (valid NLL by size and D, per family) and ``zoo-part-NN.tar.xz`` parts of at most ``part_mib`` raw
  MiB each, so a GPU machine's limited return channel carries the whole zoo.
- ``write_model_confs``: one ``conf/model/<family>-<size>.yaml`` per member. The training
  length is the member's ``revision`` (``x0.25`` .. ``x4``, default ``x1``), the way a
  Pythia member's training step is: a sweep crosses ``model.revision=x0.25,x1,x4``.
"""

from __future__ import annotations

import json
import lzma
import tarfile
from pathlib import Path

from ptqscale.zoo.family import FamilyConfig

# Estimate of one optimizer step on one H200 (plan_table): the FLOPs at 30% of 400 TFLOP/s
# bf16, or a floor for an eager transformers model of 2-5 blocks, which is bound by kernel
# launches (~400-600 per forward+backward+AdamW at ~20-25 us each): whichever is larger.
FLOPS_PER_S = 0.3 * 400e12
STEP_FLOOR_S = 0.015


def _counts(fam: FamilyConfig, size: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ptqscale.zoo.presets import PRESETS, count_parameters

    config = PRESETS[fam.preset].build_config(fam, fam.shape(size), 0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model, fam.preset)


def member_cost(fam: FamilyConfig, size: str) -> dict:
    """Steps, tokens processed, FLOPs, checkpoint bytes and estimated GPU seconds of a member."""
    counts = _counts(fam, size)
    shape = fam.shape(size)
    main = max(fam.branch_start(m) for m in fam.checkpoints)
    steps = main + sum(fam.cooldown_steps(m) for m in fam.checkpoints)
    head = fam.vocab_size * shape.hidden
    attn = 2 * shape.layers * fam.seqlen * shape.hidden  # QK^T and AV per token (causal ~1/2 x2)
    flops = 6 * (counts["non_embedding"] + head + attn) * steps * fam.batch_tokens
    step_s = max(STEP_FLOOR_S, flops / steps / FLOPS_PER_S)
    return {"size": size, **vars(shape), **counts, "steps": steps,
            "tokens": steps * fam.batch_tokens, "tflop": flops / 1e12,
            "ckpt_mib": 2 * counts["total"] * len(fam.checkpoints) / 2**20,
            "est_s": steps * step_s}


def plan_table(fams: list[FamilyConfig]) -> str:
    """A Markdown table of every member of ``fams`` and the totals (see ``member_cost``)."""
    lines = ["| member | layers x hidden | ffn | non-emb | total | steps | tokens | TFLOP | "
             "ckpt MiB | est. s |", "|" + "---|" * 10]
    tot = {"s": 0.0, "mib": 0.0, "tokens": 0}
    for fam in fams:
        for size in fam.sizes:
            c = member_cost(fam, size)
            tot["s"] += c["est_s"]
            tot["mib"] += c["ckpt_mib"]
            tot["tokens"] += c["tokens"]
            lines.append(f"| {fam.family}-{size} | {c['layers']}x{c['hidden']} | {c['ffn']} | "
                         f"{c['non_embedding']:,} | {c['total']:,} | {c['steps']} | "
                         f"{c['tokens']:,} | {c['tflop']:.1f} | {c['ckpt_mib']:.1f} | "
                         f"{c['est_s']:.0f} |")
    lines.append(f"\nTotal: {tot['tokens']:,} tokens processed, {tot['mib']:.1f} MiB of "
                 f"checkpoints (bf16), ~{tot['s']:.0f} s of GPU steps one member at a time "
                 f"(estimate: max(FLOPs at {FLOPS_PER_S / 1e12:.0f} TFLOP/s, "
                 f"{STEP_FLOOR_S * 1e3:.0f} ms) per step).")
    return "\n".join(lines)


# ---- after training ---------------------------------------------------------------------------

def manifest(out: str | Path) -> dict:
    """Every finished checkpoint under ``out`` (folders with a zoo.json of format 2)."""
    fams = {}
    for path in sorted(Path(out).glob("*/*/zoo.json")):
        rec = json.loads(path.read_text())
        if rec.get("zoo_format") != 2:
            continue
        fam = fams.setdefault(rec["family"], {"recipe": rec["recipe"], "members": [],
                                              "tokenizer": rec["tokenizer"], "run": rec["run"]})
        fam["members"].append({
            "name": rec["name"], "size": rec["size"], "folder": f"{rec['family']}/{rec['name']}",
            "revision": f"x{rec['checkpoint']['multiple']:g}", **rec["checkpoint"],
            "non_embedding": rec["params"]["non_embedding"], "total": rec["params"]["total"],
            "final_train_loss": rec["train"]["final_loss"],
            **{f"{k}_nll": v["nll"] for k, v in rec["eval"].items()},
            "weights_sha256": rec["weights_sha256"],
            "member_s_so_far": rec["run"].get("member_s_so_far")})
    for fam in fams.values():
        fam["members"].sort(key=lambda m: (m["non_embedding"], m["tokens"]))
    return {"families": fams}


def grid(info: dict) -> str:
    """Markdown: per family, Gutenberg-valid NLL of every size (rows) at every D (columns),
    and whether it falls with size at every D and with tokens at every size."""
    out = []
    for family, fam in info["families"].items():
        cell = {(m["size"], m["revision"]): m["gutenberg_valid_nll"] for m in fam["members"]}
        sizes = list(dict.fromkeys(m["size"] for m in fam["members"]))
        revs = sorted({r for _, r in cell}, key=lambda r: float(r[1:]))
        out += [f"### {family}\n", "| size | " + " | ".join(revs) + " |",
                "|---|" + "---|" * len(revs)]
        out += [f"| {s} | " + " | ".join(f"{cell[s, r]:.4f}" if (s, r) in cell else ""
                                        for r in revs) + " |" for s in sizes]
        by_size = all(cell[a, r] > cell[b, r] for r in revs for a, b in zip(sizes, sizes[1:])
                      if (a, r) in cell and (b, r) in cell)
        by_tokens = all(cell[s, a] > cell[s, b] for s in sizes for a, b in zip(revs, revs[1:])
                        if (s, a) in cell and (s, b) in cell)
        out.append(f"\nValid NLL falls with size at every D: {'yes' if by_size else 'NO'}; "
                   f"with tokens at every size: {'yes' if by_tokens else 'NO'}\n")
    return "\n".join(out) + "\n"


def _compress(job: tuple[Path, Path, list[str]]) -> tuple[str, int]:
    root, target, items = job
    with lzma.open(target, "wb", preset=3) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for item in items:
            tar.add(root / item, arcname=item)
    return target.name, target.stat().st_size


def pack(out: str | Path, to: str | Path, part_mib: float = 19.0) -> dict:
    """Write ``to/manifest.json`` and tar.xz parts of every family folder's files under ``out``.

    Items (a tokenizer folder, a checkpoint folder) are never split; a part closes when the
    next item would take it over ``part_mib`` raw MiB. Extract every part into one folder
    (``tar -xJf PART -C DIR``) and set ``paths.zoo=DIR``.
    """
    from concurrent.futures import ProcessPoolExecutor

    out, to = Path(out), Path(to)
    to.mkdir(parents=True, exist_ok=True)
    info = manifest(out)
    items = [f"{fam}/tokenizer" for fam in info["families"]]
    items += [m["folder"] for fam in info["families"].values() for m in fam["members"]]
    parts, size = [[]], 0
    for item in items:
        n = sum(p.stat().st_size for p in (out / item).rglob("*") if p.is_file())
        if parts[-1] and size + n > part_mib * 2**20:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += n
    jobs = [(out, to / f"zoo-part-{i + 1:02d}.tar.xz", p) for i, p in enumerate(parts) if p]
    with ProcessPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        info["parts"] = dict(pool.map(_compress, jobs))
    (to / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    (to / "zoo.md").write_text(grid(info))
    print(f"packed {len(items)} folders into {len(jobs)} parts: {info['parts']}")
    return info


# ---- conf/model entries -----------------------------------------------------------------------

MODEL_CONF = """\
# Zoo family {family} (conf/zoo/{family}.yaml; docs/zoo.md): {preset} form, {layers}x{hidden},
# {non_embedding:,} non-embedding params. Training length is the revision: x{mults} times
# {base:,} tokens (x1 by default). Reproduce: python -m ptqscale.zoo.factory train {family};
# set paths.zoo to the folder holding {family}/. Written by `python -m ptqscale.zoo.factory conf`.
name: {family}-{size}
family: {family}
size: {size}
path: ${{paths.zoo}}/{family}/{family}-{size}-${{.revision}}
revision: x1
dtype: float32
device: auto
allow_pickle: false
trust_remote_code: false
tokenizer: ${{paths.zoo}}/{family}/tokenizer
max_seqlen: {seqlen}
placement: one  # one | streamed | spread | auto: where weights wait (not in the job key)
max_gpu_memory: null  # e.g. 20GiB: a CUDA memory cap the job enforces (per GPU when spread)
gpus: null  # placement=spread: how many visible GPUs (null = all; not in the job key)
reuse: true  # keep the model loaded for this worker's next jobs of it (not in the job key)
stand_in: false  # true: a tiny random model of this architecture (plumbing check; docs/models.md)
"""


def model_conf(fam: FamilyConfig, size: str) -> str:
    """The conf/model YAML text of one member (every ModelConfig field spelled out)."""
    shape = fam.shape(size)
    return MODEL_CONF.format(
        family=fam.family, preset=fam.preset, layers=shape.layers, hidden=shape.hidden,
        non_embedding=_counts(fam, size)["non_embedding"], size=size, seqlen=fam.seqlen,
        mults=", x".join(f"{m:g}" for m in fam.checkpoints), base=fam.base_tokens)


def write_model_confs(fams: list[FamilyConfig], conf_dir: str | Path | None = None) -> list[Path]:
    """Write conf/model/<family>-<size>.yaml for every member of ``fams``; returns the paths."""
    from ptqscale.zoo.family import zoo_conf_dir

    folder = Path(conf_dir) if conf_dir else zoo_conf_dir().parent / "model"
    written = []
    for fam in fams:
        for size in fam.sizes:
            path = folder / f"{fam.family}-{size}.yaml"
            path.write_text(model_conf(fam, size))
            written.append(path)
    return written
