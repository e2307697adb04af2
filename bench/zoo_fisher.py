"""Fisher-weighted quantization error of every zoo member and format: the structure factor
that the isotropic noise-equivalent guess misses (issue 22; results/zoo_cross_x4/findings.md).

    python bench/zoo_fisher.py --zoo ZOO --out results/zoo_cross_x4 [--revision x4]

For each member, the diagonal empirical Fisher ``F = sum_w (dL_w / dW)^2`` over ``--windows``
256-token windows of Gutenberg *validation* text (calibration-like; the studies evaluate on
test). For each format, with RTN's error ``e = Q(W) - W`` (from the weights alone: no model
runs quantized), the ratio

    fisher_ratio = sum_i F_i e_i^2 / sum_l (||e_l||^2 / n_l) sum_{i in l} F_i

is the diagonal second-order damage of ``e`` over that of isotropic noise with each layer's
own error power, which is what the landscape's noise response measures. It is 1 when the
error's power is spread like noise; below 1 when it avoids the weights the loss is sensitive
to. Writes OUT/fisher_ratio.csv (model.name, model.revision, format.name, fisher_ratio).
"""

from __future__ import annotations

import argparse
import csv
import json
import lzma
from pathlib import Path

import torch

from ptqscale.formats import get_format
from ptqscale.metrics import hessian as hs
from ptqscale.metrics.fisher import fisher_diagonal, fisher_ratio
from ptqscale.models import ModelConfig, get_anatomy, load_model

FAMILIES = ("zoo-llama", "zoo-gpt2", "zoo-opt", "zoo-neox")
SIZES = ("25k", "55k", "150k", "230k", "440k")
FORMATS = ("bf16,int8,int4_g128,int3_g128,fp8_e4m3,mxfp8_e4m3,mxfp6_e2m3,mxfp4,mxint8,"
           "mxint4_b32,mxint3_b128,nvfp4,nf4")


def windows_of(tok, data: Path, n: int, seqlen: int = 256, split: str = "valid") -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens from the Gutenberg ``split``, past each book's
    boilerplate."""
    texts = []
    with lzma.open(data / "gutenberg-en" / f"{split}.jsonl.xz", "rt") as f:
        for line in f:
            texts.append(json.loads(line)["text"][5_000:])
            if sum(map(len, texts)) > 40 * n * seqlen:
                break
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    assert ids.numel() >= n * seqlen, ids.numel()
    return ids[: n * seqlen].view(n, seqlen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--revision", default="x4")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--formats", default=FORMATS)
    args = p.parse_args()
    formats = [get_format(f) for f in args.formats.split(",")]
    rows = []
    for fam in FAMILIES:
        for size in SIZES:
            name = f"{fam}-{size}"
            path = args.zoo / fam / f"{name}-{args.revision}"
            model, tok = load_model(ModelConfig(name=name, path=str(path), max_seqlen=256,
                                                tokenizer=str(args.zoo / fam / "tokenizer")))
            weights = [m.weight for m in get_anatomy(model).targets.values()]
            with hs.double_backward_ready(model, weights, eager=False):
                fisher = fisher_diagonal(model, weights, windows_of(tok, args.data, args.windows))
            ref = [w.detach() for w in weights]
            for fmt in formats:  # the metric fisher's ratio, of RTN's error
                ratio = fisher_ratio(fisher, [fmt.fake_quantize(w) - w for w in ref])
                rows.append({"model.name": name, "model.revision": args.revision,
                             "format.name": fmt.name,
                             "fisher_ratio": None if ratio is None else round(ratio, 6)})
            print(name, {r["format.name"]: r["fisher_ratio"] for r in rows[-len(formats):]},
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "fisher_ratio.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
