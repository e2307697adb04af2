"""``ptqscale-run``: the Hydra entry point.

    ptqscale-run model=stories260k data=tinystories            # one job
    ptqscale-run --multirun +sweep=quickstart                   # a study
    ptqscale-run --multirun +sweep=format_scan hydra/launcher=joblib

The conf/ folder is found beside the package's source checkout, or at $PTQSCALE_CONF.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ptqscale.runner.config import register_configs

log = logging.getLogger("ptqscale")


def conf_dir() -> str:
    """The conf/ folder: $PTQSCALE_CONF, else the one at the root of this checkout."""
    env = os.environ.get("PTQSCALE_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"no config.yaml in {path}: set PTQSCALE_CONF to ptqscale's conf/")
    return str(path)


def task(cfg: DictConfig) -> str:
    """One job; the record's status is the Hydra job's return value."""
    from ptqscale.console import quiet_third_party
    from ptqscale.runner.job import run_job

    quiet_third_party()
    return run_job(cfg)["status"]


def main() -> None:
    register_configs()
    hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
