"""Train every size of a family in one command, smallest first; idempotent.

CLI (the one command that reproduces the reference family)::

    python -m ptqscale.zoo.train_family --data ../shared/data/gutenberg-en \\
        --out /work/zoo-ckpts --device cuda

Each member goes to ``OUT/<family>-<size>/``; a member whose folder already holds a
``zoo.json`` is skipped (``--force`` retrains it), so a re-launch finishes an interrupted
family. ``OUT/family.json`` and ``OUT/family.md`` summarize every finished member of the
family found in OUT: size, parameters, final train/valid loss, test NLLs, device and time,
and whether the NLLs fall monotonically with size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ptqscale import console
from ptqscale.errors import ConfigError
from ptqscale.zoo.config import SIZES, unknown
from ptqscale.zoo.evaluate import write_json
from ptqscale.zoo.train import (
    add_common_args,
    config_from_args,
    quiet_progress_bars,
    train_member,
)

REPORTED = ("gutenberg_valid", "gutenberg_test", "wikitext2_test")


def summarize(out_dir: str | Path, family: str) -> dict:
    """Rows of every finished member of ``family`` under ``out_dir``, smallest first.

    ``monotonic[set]`` is True when NLL strictly falls with non-embedding parameters.
    """
    rows = []
    for path in sorted(Path(out_dir).glob(f"{family}-*/zoo.json")):
        rec = json.loads(path.read_text())
        if rec["family"] != family:
            continue
        rows.append({
            "name": rec["name"], "size": rec["size"], "path": str(path.parent),
            "non_embedding": rec["params"]["non_embedding"], "total": rec["params"]["total"],
            "final_train_loss": rec["train"]["final_train_loss"],
            **{k: rec["eval"][k]["nll"] for k in REPORTED if k in rec["eval"]},
            "device": rec["run"]["device_name"], "train_s": rec["run"]["train_s"],
            "wall_s": rec["run"]["wall_s"], "tokens_per_s": rec["run"]["tokens_per_s"],
            "date": rec["run"]["date"], "command": rec["run"]["command"],
        })
    rows.sort(key=lambda r: r["non_embedding"])
    mono = {k: all(a[k] > b[k] for a, b in zip(rows, rows[1:]))
            for k in REPORTED if rows and all(k in r for r in rows)}
    return {"family": family, "members": rows, "monotonic": mono}


def markdown(summary: dict) -> str:
    """The summary as a Markdown table (docs/zoo.md carries a copy)."""
    head = ("| member | non-emb params | total params | train loss | valid NLL | "
            "Gutenberg test NLL | WikiText-2 test NLL | train s | tokens/s |")
    lines = [head, "|" + "---|" * 9]
    for r in summary["members"]:
        cells = [r["name"], f"{r['non_embedding']:,}", f"{r['total']:,}",
                 f"{r['final_train_loss']:.4f}"]
        cells += [f"{r[k]:.4f}" if k in r else "" for k in REPORTED]
        cells += [f"{r['train_s']:.0f}", f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    mono = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summary["monotonic"].items())
    return "\n".join(lines) + f"\n\nNLL falls monotonically with size: {mono}\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ptqscale.zoo.train_family", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sizes", default=",".join(SIZES),
                   help=f"comma-separated subset of {list(SIZES)} (default: all)")
    p.add_argument("--force", action="store_true", help="retrain members already finished")
    args = p.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise ConfigError("--sizes: " + unknown("size", bad or args.sizes, SIZES))
    configs = [config_from_args(args, s) for s in sizes]  # all validated before training
    configs.sort(key=lambda c: (c.hidden, c.layers))
    quiet_progress_bars()
    console.quiet_third_party()
    out = Path(args.out)
    for cfg in configs:
        if (out / cfg.name / "zoo.json").exists() and not args.force:
            console.say(f"[{cfg.name}] already trained, skipped (--force retrains)")
            continue
        train_member(cfg, args.data, out / cfg.name, device=args.device, cache_dir=args.cache,
                     tokenizer_path=args.tokenizer, wikitext_test=args.wikitext)
    summary = summarize(out, configs[0].family)
    write_json(out / "family.json", summary)
    (out / "family.md").write_text(markdown(summary))
    console.say(markdown(summary))


if __name__ == "__main__":
    main()
