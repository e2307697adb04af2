"""Every analysis command the README (and docs/) shows runs on the committed results.

The commands are read from the Markdown itself, so a README edit is tested as written. They
run in-process from the repository root; only speed knobs are appended (fewer trees and
bootstrap resamples) and the report is written to a temporary folder, never into results/.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ptqscale_analysis import cli

ROOT = Path(__file__).resolve().parents[2]
MAINS = {"ptqscale-fit": cli.fit_main, "ptqscale-predict": cli.predict_main,
         "ptqscale-pareto": cli.pareto_main, "ptqscale-report": cli.report_main}
FAST = {"ptqscale-fit": ["--n-boot", "5"], "ptqscale-predict": ["--n-estimators", "20"],
        "ptqscale-pareto": ["--n-estimators", "20"],
        "ptqscale-report": ["--n-boot", "5", "--n-estimators", "20"]}
_COMMAND = re.compile(r"(?:\.venv/bin/)?(ptqscale-(?:fit|predict|pareto|report)) (--results [^`#\n]*)")


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) of every analysis command on the committed results."""
    out = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in _COMMAND.finditer(md.read_text()):
            if m.group(2).startswith("--results results "):  # concrete, not a synopsis
                out.append((md.name, f"{m.group(1)} {m.group(2).strip()}"))
    return out


COMMANDS = documented_commands()


def test_the_readme_shows_every_analysis_verb():
    readme = {shlex.split(c)[0] for f, c in COMMANDS if f == "README.md"}
    assert readme == set(MAINS)


@pytest.mark.parametrize("source, command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_runs(source, command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    prog, *argv = shlex.split(command)
    argv += FAST[prog]
    if prog == "ptqscale-report":
        argv += ["--out", str(tmp_path)]
    assert MAINS[prog](argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if prog == "ptqscale-pareto":
        assert "best measured:" in out
    if prog == "ptqscale-predict":
        assert "NLL" in out and "measured" in out
