"""``ptqscale-run``: the Hydra entry point.

    ptqscale-run model=stories260k data=tinystories            # one job
    ptqscale-run --multirun +sweep=quickstart                   # a study
    ptqscale-run --multirun +sweep=format_scan hydra/launcher=joblib

Configs: $PTQSCALE_CONF if set, else the conf/ of this source checkout, else the copy the
wheel ships as ``ptqscale/conf`` (conf/ and sweeps/ mapped in by setup.py). Hydra's
``--config-dir``/``-cd`` adds a folder searched before it (your own studies or groups).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("ptqscale")


def conf_dir() -> str:
    """The primary config folder: $PTQSCALE_CONF, else the checkout's conf/, else the
    package's own copy (an installed wheel)."""
    env = os.environ.get("PTQSCALE_CONF")
    if env:
        if not (Path(env) / "config.yaml").is_file():
            raise FileNotFoundError(f"PTQSCALE_CONF={env} has no config.yaml: point it at a "
                                    "folder laid out like ptqscale's conf/")
        return str(Path(env))
    package = Path(__file__).resolve().parents[1]
    for path in (package.parents[1] / "conf", package / "conf"):
        if (path / "config.yaml").is_file():
            return str(path)
    raise FileNotFoundError(f"no config.yaml in {package.parents[1] / 'conf'} nor in "
                            f"{package / 'conf'}: reinstall ptqscale or set PTQSCALE_CONF")


def task(cfg: DictConfig) -> str:
    """One job; the record's status is the Hydra job's return value."""
    from ptqscale.console import quiet_third_party
    from ptqscale.runner.job import run_job

    quiet_third_party()
    return run_job(cfg)["status"]


def main() -> None:
    if any(a in sys.argv[1:] for a in ("-h", "--help")):
        _print_help()   # before the schemas (and torch) are imported: help is instant
        return
    from ptqscale.runner.cli import per_job_overrides
    from ptqscale.runner.config import register_configs

    groups = {p.name for p in Path(conf_dir()).iterdir() if p.is_dir()} - {"hydra", "sweep"}
    sys.argv[1:] = per_job_overrides(sys.argv[1:], groups)
    register_configs()
    hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")(task)()


def _print_help() -> None:
    from ptqscale.runner.cli import help_text

    args = sys.argv[1:]
    extra = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-cd", "--config-dir")]
    print(help_text([Path(p) for p in extra] + [Path(conf_dir())]))


if __name__ == "__main__":
    main()
