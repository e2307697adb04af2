"""The landscape's structured config (``landscape:`` in a job), validated on construction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from ptqscale.errors import ConfigError

LANDSCAPE_PROTOCOL = 1
HVP_METHODS = ("autograd", "finite_difference")
HUTCHINSON_SCHEMES = ("all_windows", "stratified")
EIG_METHODS = ("power", "lanczos")
HVP_DTYPES = ("float32", "bfloat16")
FD_TRACES = ("central", "forward")


@dataclass
class LandscapeConfig:
    """Budgets and definitions of the model-level landscape features (Hydra structured config)."""

    enabled: bool = False
    levels_db: list[float] = field(
        default_factory=lambda: [50.0, 40.0, 35.0, 30.0, 25.0, 20.0, 15.0, 10.0]
    )
    seeds: int = 3  # noise draws per level (pairs when antithetic)
    seed: int = 0  # base seed: draw k uses seed + k; Hutchinson probe k uses seed + k too
    antithetic: bool = True  # score +noise and -noise (2 passes per draw)
    max_tokens: int = 16384  # budget: the first max_tokens // seqlen windows are used
    seqlen: int | None = None  # None -> the eval seqlen; when set, windows must have it
    batch_size: int = 1  # windows per no-grad forward (memory, not results)
    # Memory of the second-order features (not results): windows per HVP micro-batch, and
    # whether a micro-batch's gradient graph is kept across Hutchinson probes (faster) or
    # rebuilt per product (about 2/3 of the peak). Peak memory scales with hvp_windows.
    hvp_windows: int = 1
    hvp_retain_graph: bool = True
    threshold: float = 0.1  # dNLL (nats) that defines the basin edge s*
    kappa_max_dnll: float = 0.005  # levels with mean dNLL <= this (nats) are used for kappa
    hessian: bool = True  # also measure trace, kappa_h and top eigenvalue
    hutchinson_probes: int = 64
    power_iters: int = 30  # 0 skips the top eigenvalue
    power_tol: float = 1e-4  # relative change of the Rayleigh quotient that stops early
    hvp: str = "autograd"  # "autograd" (double backward) | "finite_difference"
    fd_eps: float = 1e-4  # finite-difference step as a fraction of the weights' global norm
    # Cheaper second-order estimators (issue 23; bench/results/landscape_estimators_cpu.md
    # measures their error): every probe on every window, or probe k on window k mod n only
    # (unbiased, n times fewer products); power iteration or Lanczos for the top eigenvalue;
    # HVPs in fp32 or with the model in bf16 (fp32 logits and loss, fp32 probes and sums).
    hutchinson_scheme: str = "all_windows"
    eig_method: str = "power"
    hvp_dtype: str = "float32"
    # hvp=finite_difference only: the trace's products as central differences (two gradients
    # each) or forward differences from one shared g(W) (one gradient each; unbiased over
    # Rademacher probes, hessian.finite_difference_hvp says why). The eigenvalue is central.
    fd_trace: str = "central"
    # hvp=finite_difference: the eigenvalue's step (None: fd_eps). The top eigendirection is
    # where the loss bends fastest, so its truncation error wants a smaller step than random
    # probes (bench/results/landscape_estimators_cpu.md: 1e-5 for the eigenvalue, 1e-4 for
    # the trace, whose per-layer parts lose to rounding below that)
    fd_eps_eig: float | None = None
    directional_ts: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])

    # Memory knobs: the same features (up to float summation order) for any value, so a
    # cached result is shared across them; the features record the values they ran with.
    not_in_key: ClassVar[tuple[str, ...]] = ("hvp_windows", "hvp_retain_graph")
    # fields added after records were keyed, at the value every earlier record ran with
    added_later: ClassVar[dict[str, str]] = {
        "hutchinson_scheme": "all_windows", "eig_method": "power", "hvp_dtype": "float32",
        "fd_trace": "central", "fd_eps_eig": None}

    def __post_init__(self) -> None:
        levels = [float(s) for s in self.levels_db]
        if not levels or not all(math.isfinite(s) for s in levels):
            raise ConfigError(f"landscape.levels_db must be finite dB values, got {self.levels_db}")
        if len(set(levels)) != len(levels):
            raise ConfigError(f"landscape.levels_db has duplicates: {self.levels_db}")
        for key in ("seeds", "max_tokens", "batch_size", "hutchinson_probes"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"landscape.{key} must be >= 1, got {getattr(self, key)}")
        if isinstance(self.hvp_windows, bool) or not isinstance(self.hvp_windows, int) \
                or self.hvp_windows < 1:
            raise ConfigError(f"landscape.hvp_windows (windows per HVP micro-batch) must be an "
                              f"integer >= 1, got {self.hvp_windows!r}")
        if not isinstance(self.hvp_retain_graph, bool):
            raise ConfigError(f"landscape.hvp_retain_graph must be true or false, "
                              f"got {self.hvp_retain_graph!r}")
        if self.power_iters < 0:
            raise ConfigError(f"landscape.power_iters must be >= 0, got {self.power_iters}")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"landscape.seqlen must be None or >= 2, got {self.seqlen}")
        for key in ("threshold", "kappa_max_dnll", "fd_eps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"landscape.{key} must be > 0, got {getattr(self, key)}")
        if self.fd_eps_eig is not None and not self.fd_eps_eig > 0:
            raise ConfigError(f"landscape.fd_eps_eig must be > 0 or null, got {self.fd_eps_eig}")
        if self.fd_eps_eig is not None and self.hvp != "finite_difference":
            raise ConfigError(f"landscape.fd_eps_eig={self.fd_eps_eig} needs landscape.hvp="
                              f"finite_difference")
        if not self.power_tol >= 0:
            raise ConfigError(f"landscape.power_tol must be >= 0, got {self.power_tol}")
        if self.hvp not in HVP_METHODS:
            raise ConfigError(f"landscape.hvp must be one of {HVP_METHODS}, got {self.hvp!r}")
        for key, allowed in (("hutchinson_scheme", HUTCHINSON_SCHEMES),
                             ("eig_method", EIG_METHODS), ("hvp_dtype", HVP_DTYPES),
                             ("fd_trace", FD_TRACES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"landscape.{key} must be one of {allowed}, "
                                  f"got {getattr(self, key)!r}")
        if self.hvp_dtype != "float32" and self.hvp != "autograd":
            raise ConfigError(f"landscape.hvp_dtype={self.hvp_dtype!r} needs landscape.hvp="
                              f"autograd (a finite difference in bf16 is mostly rounding)")
        if self.fd_trace != "central" and self.hvp != "finite_difference":
            raise ConfigError(f"landscape.fd_trace={self.fd_trace!r} needs landscape.hvp="
                              f"finite_difference (autograd products are exact)")
        _check_ts(self.directional_ts)


def _check_ts(ts: Sequence[float]) -> None:
    if not ts or not all(0 < float(t) <= 1 for t in ts):
        raise ConfigError(f"directional ts must be a non-empty list in (0, 1], got {list(ts)}")
