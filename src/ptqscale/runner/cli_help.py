"""``ptqscale-run --help``: examples and the choices of every config group, read from the
config folders' file names alone, so that asking for help imports neither torch nor the
config schemas (about 0.3 s instead of 8 s). ``--hydra-help`` is Hydra's own."""

from __future__ import annotations

from pathlib import Path

HELP_FLAGS = ("-h", "--help")

EXAMPLES = """\
ptqscale-run: quantize a model with a method into a number format, measure it, record it.

Examples:
  ptqscale-run +sweep=quickstart                        # a study (runs its grid as a multirun)
  ptqscale-run model=stories260k method=gptq format=int4_g128   # one job
  ptqscale-run +sweep=format_scan hydra/launcher=joblib # a study, jobs in parallel
  ptqscale-run -cd my_conf +sweep=my_study              # your own studies/groups, searched first
  ptqscale-plan +sweep=family_scan                      # what a study would run, what is done
  ptqscale-report --results results --study quickstart  # tables and figures of a study

Overrides are Hydra's: group=option, key=value, a,b,c to sweep (with --multirun or in a
study file). format=<name> picks the number format: bf16, int8, int4_g128, fp8_e4m3, mxfp4,
mxint4_b32, nvfp4, nf4, ... (grammar: ptqscale.formats). Show a job's full config with `ptqscale-run <overrides> --cfg job`.
Configs: {conf}
"""


def _studies(folder: Path) -> list[str]:
    """``name  first line of its Study: header`` for each study file."""
    lines = []
    for path in sorted(folder.glob("*.yaml")):
        title = next((ln.split(":", 1)[1].strip() for ln in path.read_text().splitlines()
                      if ln.startswith("# Study:")), "")
        lines.append(f"  {path.stem:14} {title}")
    return lines


def help_text(conf_dirs: list[Path]) -> str:
    """Examples, then each group's options (by file name) over ``conf_dirs``, first wins."""
    groups: dict[str, set[str]] = {}
    for conf in conf_dirs:
        for path in conf.glob("*/*.yaml"):
            if path.parent.name not in ("sweep", "hydra"):
                groups.setdefault(path.parent.name, set()).add(path.stem)
    text = EXAMPLES.format(conf=", ".join(map(str, conf_dirs)))
    text += "\nConfig groups (group=option):\n"
    text += "".join(f"  {g:10} {', '.join(sorted(o))}\n" for g, o in sorted(groups.items()))
    text += "\nStudies (+sweep=<name>):\n"
    text += "\n".join(line for conf in conf_dirs for line in _studies(conf / "sweep")) + "\n"
    return text
