"""Is quantization damage isotropic noise? The quantization error against random noise of the
same per-layer power, split into its first- and second-order parts (issue 22).

    python bench/zoo_error_structure.py --zoo ZOO --out DIR [--revision x4] [--sizes 55k,440k]

For each zoo member and format (RTN), with ``e_l = Q(W_l) - W_l`` per target weight:

- ``actual``: dNLL at ``W + e`` (what RTN does);
- ``odd`` = (dNLL(W + e) - dNLL(W - e)) / 2: the first-order part, ``g . e`` (g the gradient
  of the evaluation loss; the models are not at a minimum of their test loss);
- ``even`` = (dNLL(W + e) + dNLL(W - e)) / 2: the second-order part, ``e^T H e / 2``;
- ``iso``: dNLL at ``W +- z`` with ``z_l`` Gaussian rescaled to ``||e_l||``, averaged over
  ``--seeds`` antithetic pairs: ``sigma_l^2 tr(H_l) / 2``, what the landscape's noise
  response (and so its noise-equivalent guess) assumes the quantization error does.

``actual / iso`` is the factor the noise-equivalent guess misses; ``even / iso`` says how the
error meets the curvature, ``odd / iso`` how it meets the gradient. On Gutenberg test text
(the families' own distribution), 256-token windows. Writes DIR/error_structure.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import torch
from zoo_fisher import windows_of  # bench/ is the script's folder, on sys.path

from ptqscale.formats import get_format
from ptqscale.metrics import hessian as hs
from ptqscale.metrics.landscape import mean_nll
from ptqscale.models import ModelConfig, get_anatomy, load_model

FAMILIES = ("zoo-llama", "zoo-gpt2", "zoo-opt", "zoo-neox")


@torch.no_grad()
def shifted_nll(model, weights, ref, deltas, sign: float, windows) -> float:
    for w, r, d in zip(weights, ref, deltas):
        w.copy_(r).add_(d, alpha=sign)
    try:
        return float(mean_nll(model, windows, 16))
    finally:
        for w, r in zip(weights, ref):
            w.copy_(r)


def measure(path: Path, formats: list[str], windows_n: int, seeds: int, data: Path) -> list[dict]:
    model, tok = load_model(ModelConfig(name=path.name, path=str(path), max_seqlen=256,
                                        tokenizer=str(path.parent / "tokenizer")))
    model.eval()
    targets = get_anatomy(model).targets
    weights = [m.weight for m in targets.values()]
    ref = [w.detach().clone() for w in weights]
    windows = windows_of(tok, data, windows_n, 256, split="test")
    clean = shifted_nll(model, weights, ref, [torch.zeros_like(r) for r in ref], 0.0, windows)
    rows = []
    for name in formats:
        fmt = get_format(name)
        err = [fmt.fake_quantize(r) - r for r in ref]
        plus = shifted_nll(model, weights, ref, err, 1.0, windows) - clean
        minus = shifted_nll(model, weights, ref, err, -1.0, windows) - clean
        iso = []
        for k in range(seeds):
            z = hs.gaussian(ref, 1000 + k)
            z = [zi * (e.norm() / zi.norm()) for zi, e in zip(z, err)]
            iso.append((shifted_nll(model, weights, ref, z, 1.0, windows)
                        + shifted_nll(model, weights, ref, z, -1.0, windows)) / 2 - clean)
        iso_t = torch.tensor(iso, dtype=torch.float64)
        signal = sum(float(r.double().pow(2).sum()) for r in ref)
        noise = sum(float(e.double().pow(2).sum()) for e in err)
        rows.append({"model": path.name, "format": name, "clean": clean, "actual": plus,
                     "odd": (plus - minus) / 2, "even": (plus + minus) / 2,
                     "iso": float(iso_t.mean()), "iso_sem": float(iso_t.std() / seeds ** 0.5),
                     "sqnr_db": 10 * torch.log10(torch.tensor(signal / noise)).item()})
        print(rows[-1], flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Quantization error against isotropic noise of the same per-layer power "
             f"({report['device']})", "", f"{report['date']}, torch {report['torch']}; RTN; "
             f"Gutenberg test, {report['windows']} x 256 tokens; iso: {report['seeds']} "
             "antithetic Gaussian pairs", "",
             "| model | format | SQNR dB | actual dNLL | odd (g.e) | even (e'He/2) | iso (+- sem) "
             "| actual / iso | even / iso | odd / iso |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['format']} | {r['sqnr_db']:.1f} | {r['actual']:.4f} | "
                     f"{r['odd']:+.4f} | {r['even']:.4f} | {r['iso']:.4f} ({r['iso_sem']:.4f}) | "
                     f"{r['actual'] / r['iso']:.2f} | {r['even'] / r['iso']:.2f} | "
                     f"{r['odd'] / r['iso']:+.2f} |")
    by = {}
    for r in report["rows"]:
        by.setdefault(r["model"].split("-")[0] + "-" + r["model"].split("-")[1], []).append(r)
    lines += ["", "Per family, median over its members and formats:", "",
              "| family | actual / iso | even / iso | odd / iso |", "|---|---|---|---|"]
    for fam, rows in by.items():
        med = [float(torch.tensor([r[key] / r["iso"] for r in rows]).median())
               for key in ("actual", "even", "odd")]
        lines.append(f"| {fam} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--revision", default="x4")
    p.add_argument("--sizes", default="55k,440k")
    p.add_argument("--formats", default="int4_g128,int3_g128,mxfp4")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "windows": args.windows, "seeds": args.seeds, "revision": args.revision,
              "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for fam in FAMILIES:
        for size in args.sizes.split(","):
            path = args.zoo / fam / f"{fam}-{size}-{args.revision}"
            report["rows"] += measure(path, args.formats.split(","), args.windows, args.seeds,
                                      args.data)
            (args.out / "error_structure.json").write_text(json.dumps(report, indent=1))
            (args.out / "error_structure.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
