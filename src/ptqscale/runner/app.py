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
from collections.abc import Iterator
from contextlib import contextmanager
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


def task(cfg: DictConfig) -> str | float:
    """One job. What a sweeper sees: the outcome's status (runner/outcomes.py), or the
    number at the record path ``cfg.objective`` (e.g. ``metrics.dnll``; NaN when the job
    did not complete, which Optuna counts as a failed trial and goes on)."""
    from ptqscale.console import quiet_third_party
    from ptqscale.runner.outcomes import run_grid_point
    from ptqscale.store import read_record

    quiet_third_party()
    outcome = run_grid_point(cfg)
    if cfg.get("objective") is None:
        return outcome["status"]
    record = read_record(cfg.paths.results, cfg.study, outcome.get("key") or "") or outcome
    return objective_value(record, cfg.objective)


def objective_value(record: dict, path: str) -> float:
    """The number at ``path`` (``metrics.dnll``) in ``record``; NaN for an incomplete job."""
    if record.get("status") != "complete":
        log.warning("objective %s: job %s is %s, returning NaN", path, record.get("name"),
                    record.get("status"))
        return float("nan")
    node: object = record
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(path.split(".")[:i]) or "the record"
            keys = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a mapping)"
            raise KeyError(f"objective={path}: no {part!r} in {where}; it has {keys}")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise TypeError(f"objective={path} is {node!r}, not a number")
    return float(node)


def plugins_discoverable() -> None:
    """Let Hydra's plugin scan see ptqscale's own plugins (``hydra/sweeper=ptqscale``).

    Hydra finds plugins by walking ``hydra_plugins.__path__`` with pkgutil. An editable
    install (``pip install -e``, what ``make setup`` does) serves our plugin folder through
    setuptools' import hook, which pkgutil cannot list, so the scan would miss it; putting
    the folder that holds our ``hydra_plugins`` on sys.path adds it to that namespace's
    path. A wheel install has it in site-packages already: then nothing changes.
    """
    import importlib.util

    import hydra_plugins

    spec = importlib.util.find_spec("hydra_plugins.ptqscale_sweeper")
    if spec is None or spec.origin is None:
        return
    ours = Path(spec.origin).resolve().parents[1]   # .../hydra_plugins
    if not any(Path(p).is_dir() and Path(p).resolve() == ours for p in hydra_plugins.__path__):
        sys.path.append(str(ours.parent))


def main() -> None:
    """Run Hydra; a bad input is one line ``error: ...`` on stderr and exit status 2.

    Exit status: 0 every job complete (or running elsewhere), 1 a job failed or was
    invalid, 2 a bad input found before any job ran. ``--debug`` (or HYDRA_FULL_ERROR=1)
    keeps the tracebacks. ``-h``/``--help`` answers before torch is imported.
    """
    if any(a in sys.argv[1:] for a in ("-h", "--help")):
        _print_help()   # before the schemas (and torch) are imported: help is instant
        return
    from ptqscale.runner import outcomes

    debug = "--debug" in sys.argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    sys.argv = [a for a in sys.argv if a != "--debug"]
    if debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with _exceptions_reach_us():
            from ptqscale.runner.cli import per_job_overrides
            from ptqscale.runner.config import register_configs

            groups = {p.name for p in Path(conf_dir()).iterdir() if p.is_dir()} - {"hydra",
                                                                                   "sweep"}
            sys.argv[1:] = per_job_overrides(sys.argv[1:], groups)
            register_configs()
            plugins_discoverable()
            hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")(task)()
    except outcomes.Abort as stop:   # a bad input found by a callback (runner/callbacks.py)
        if debug:
            raise stop.error from None
        sys.exit(report_error(stop.error))
    except Exception as e:  # noqa: BLE001 - every error becomes one line (or a traceback)
        if debug:
            raise
        sys.exit(report_error(e))
    sys.exit(outcomes.exit_status())


@contextmanager
def _exceptions_reach_us() -> Iterator[None]:
    """Make Hydra re-raise instead of printing a traceback itself (run_and_report)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def report_error(e: BaseException) -> int:
    """Print ``e`` as one line ``error: ...`` on stderr; the exit status: 2 for a bad
    input (config, override, data, model files), 1 for anything else."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2 if is_bad_input(e) else 1


def one_line(e: BaseException) -> str:
    """The message of ``e`` (and of the OmegaConf error under a Hydra one) on one line."""
    parts = [str(e)]
    if e.__cause__ is not None and str(e.__cause__) not in parts[0]:
        parts.append(str(e.__cause__))
    text = "; ".join(" ".join(p.split()) for p in parts if p.strip())
    text = text.split(" Config search path:")[0]   # Hydra's list of folders: noise here
    return text or type(e).__name__


def is_bad_input(e: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ptqscale.errors import ConfigError

    return isinstance(e, ConfigError | HydraException | OmegaConfBaseException
                      | FileNotFoundError)


def _print_help() -> None:
    from ptqscale.runner.cli import help_text

    args = sys.argv[1:]
    extra = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-cd", "--config-dir")]
    print(help_text([Path(p) for p in extra] + [Path(conf_dir())]))


if __name__ == "__main__":
    main()
