"""Command-line helpers of ``ptqscale-run`` that act before Hydra starts.

``help_text``: ``--help`` shows examples and the choices of every config group, read from
the config folders' file names alone, so that asking for help imports neither torch nor
the config schemas (about 1 s instead of 8.5 s). ``--hydra-help`` is Hydra's own.

``per_job_overrides``: makes ``--multirun method=a,b method.iters=50`` work (see there).
"""

from __future__ import annotations

import re
from pathlib import Path

# key=value with a plain value: no sweep (a,b / choice(...) / range(...)), no +, ~, @
_PLAIN = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)=(?P<value>[^,]*)$")
_SWEEP_FN = re.compile(r"^(choice|range|interval|glob|tag)\(")

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


def per_job_overrides(args: list[str], groups: set[str]) -> list[str]:
    """In a multirun, ``<group>.<key>=v`` becomes ``<group>.<key>=choice(v)``.

    Hydra composes a multirun's master config with the sweep overrides left out, so with
    ``method=gptq,blockft`` swept (on the command line or in a study file)
    ``method.batch_size=4`` is applied to the default method (``none``) and fails before any
    job. A one-value sweep is left out of that composition too and set in every job,
    exactly what the user meant. A job whose method has no such key fails with Hydra's
    error naming the key and the method's config class (``Key 'batch_size' not in
    'RTNConfig'``). Single runs are left alone.
    """
    multirun = any(a in ("-m", "--multirun") or a.startswith("+sweep=") for a in args)
    if not multirun:
        return args
    out = []
    for a in args:
        m = _PLAIN.match(a)
        if (m and m["key"].split(".")[0] in groups and "." in m["key"]
                and not _SWEEP_FN.match(m["value"])):
            a = f"{m['key']}=choice({m['value']})" if m["value"] else a
        out.append(a)
    return out
