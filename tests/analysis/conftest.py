"""A synthetic but realistic study written through the real store, with known laws.

NLL_fp follows E + A * N^-alpha per family; dNLL of every quantized job follows the
noise law K_{family,method} * N^-gamma * 10^(-SQNR/10) with multiplicative noise; RTN
weight SQNR is a per-format constant plus a little per-model jitter, GPTQ's is 1 dB lower.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from ptqscale.store import write_record

SIZES = {"1m": 1.0e6, "4m": 4.0e6, "16m": 1.6e7, "64m": 6.4e7, "256m": 2.56e8}
FAMILIES = {  # E, A, alpha of the fp law; K per method of the noise law
    "zoo": {"E": 1.9, "A": 400.0, "alpha": 0.35, "K": {"rtn": 300.0, "gptq": 100.0}},
    "toy": {"E": 2.3, "A": 250.0, "alpha": 0.30, "K": {"rtn": 500.0, "gptq": 150.0}},
}
GAMMA = 0.4
# name: (family, element bits, block size, bits per weight, RTN weight SQNR in dB)
FORMATS = {
    "int8": ("int", 8, None, 8.0, 40.0),
    "int4_g128": ("int", 4, 128, 4.25, 20.0),
    "int3_g128": ("int", 3, 128, 3.25, 14.0),
    "mxfp8": ("mx", 8, 32, 8.25, 31.0),
    "mxfp6_e3m2": ("mx", 6, 32, 6.25, 25.0),
    "mxfp4": ("mx", 4, 32, 4.25, 16.0),
    "nvfp4": ("nvfp4", 4, 16, 4.5, 19.0),
    "mxint3_128": ("mx", 3, 128, 3.0625, 13.0),
}
METHODS = ("rtn", "gptq")


def _params(n_blocks: float) -> dict:
    d = int(round((n_blocks / 48) ** 0.5))  # 4 layers of 12 d^2
    emb = 4096 * d
    return {"total": int(n_blocks) + 2 * emb, "embedding": emb, "head": emb,
            "blocks": int(n_blocks), "quantizable": int(n_blocks)}  # the runner's name


def _record(study, fam, size, fmt, method, nll_fp, dnll, sqnr, params, landscape):
    ffam, bits, block, bpw, _ = FORMATS.get(fmt, ("baseline", 16, None, 16.0, None))
    name = f"{study}/{fam}-{size}/{fmt}/{method}"
    nll = nll_fp + dnll
    q = params["quantizable"]
    return {
        "job_key": hashlib.sha256(name.encode()).hexdigest()[:16], "study": study,
        "status": "complete", "name": name, "protocol_version": 1,
        "model": {"name": f"{fam}-{size}", "family": fam, "size": size},
        "format": {"name": fmt, "family": ffam, "element_bits": bits, "block_size": block,
                   "bits_per_weight": bpw},
        "method": {"name": method},
        "params": params,
        "metrics": {"nll": nll, "perplexity": math.exp(nll), "nll_fp": nll_fp,
                    "perplexity_fp": math.exp(nll_fp), "dnll": dnll, "tokens": 4096,
                    "nll_sum": nll * 4096, "weight_sqnr_db": sqnr,
                    "model_bytes": int(q * bpw / 8 + (params["total"] - q) * 2)},
        "landscape": landscape,
    }


def make_study(root, study="synth", families=FAMILIES, sizes=SIZES, formats=tuple(FORMATS),
               methods=METHODS, noise=0.05, seed=0) -> list[dict]:
    """Write the study under ``root`` and return the records."""
    rng = np.random.default_rng(seed)
    records = []
    for fam, law in families.items():
        for size, n in sizes.items():
            params = _params(n)
            nll_fp = law["E"] + law["A"] * n ** -law["alpha"] + rng.normal(0, 1e-3)
            kappa = law["K"]["rtn"] * n ** -GAMMA
            landscape = {"kappa": kappa, "cost_noise_response_s": 1.5}  # a cost: never a feature
            if fam == "zoo":  # present for one family only: the predictor must drop it
                landscape["s_star_db"] = 10 * math.log10(kappa / 0.1)
            records.append(_record(study, fam, size, "bf16", "none", nll_fp, 0.0, None,
                                   params, landscape))
            for fmt in formats:
                rtn_sqnr = FORMATS[fmt][4] + rng.normal(0, 0.3)
                for method in methods:
                    sqnr = rtn_sqnr - (1.0 if method == "gptq" else 0.0)
                    dnll = (law["K"][method] * n ** -GAMMA * 10 ** (-sqnr / 10)
                            * math.exp(rng.normal(0, noise)))
                    records.append(_record(study, fam, size, fmt, method, nll_fp, dnll, sqnr,
                                           params, landscape))
    for r in records:
        write_record(root, r)
    return records


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A results root holding the study 'synth' (2 families x 5 sizes x 8 formats x 2)."""
    root = tmp_path_factory.mktemp("results")
    make_study(root)
    return root


@pytest.fixture(scope="session")
def synth_frame(synth_root):
    from ptqscale_analysis.load import load_study

    return load_study(synth_root, "synth")


SMALL_SIZES = {"1m": 1.0e6, "8m": 8.0e6, "64m": 6.4e7}
SMALL_FORMATS = ("int4_g128", "mxfp4", "int8")


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """A quick study 'small': 2 families x 3 sizes x 3 formats x {rtn, gptq} + bf16."""
    root = tmp_path_factory.mktemp("small")
    make_study(root, study="small", sizes=SMALL_SIZES, formats=SMALL_FORMATS)
    return root


@pytest.fixture(scope="session")
def study_factory():
    """``make_study`` itself, for tests that need a study of their own shape."""
    return make_study
