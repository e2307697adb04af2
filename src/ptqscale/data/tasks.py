"""Build the offline lm-evaluation-harness tasks we ship (src/ptqscale/assets/tasks).

Each task is a last-word cloze in the LAMBADA manner, posed as a 4-way choice so that the
tiny models of the tests score above chance and ``acc_norm`` is defined: a passage (one
paragraph of the corpus, hard line wraps joined) loses its last word; the choices are that
word and three other distinct words of the same passage, in a shuffled order. Passages,
distractors and order come from ``random.Random(seed)``: the same corpus files and seed give
the same JSONL, byte for byte (tests/metrics/test_tasks.py rebuilds and compares).

    python -m ptqscale.data.tasks          # rewrites src/ptqscale/assets/tasks/*.jsonl

docs/tasks.md describes the tasks; the YAML next to each JSONL is its lm-eval definition.
"""

from __future__ import annotations

import json
import lzma
import random
import re
from pathlib import Path

from ptqscale.assets import ASSETS, DATA

TASKS_DIR = ASSETS / "tasks"
WORD = re.compile(r"^[A-Za-z]+$")
CHOICES = 4
# name -> (source, min words, max words, items)
SPECS = {
    "ptq_gutenberg_cloze": ("gutenberg-en/test.jsonl.xz", 30, 120, 300),
    "ptq_tinystories_cloze": ("tinystories-valid-sample/tinystories_val.txt", 20, 120, 300),
}


def _paragraphs(source: str) -> list[str]:
    """The source's paragraphs (blank-line separated), whitespace runs joined to one space."""
    path = DATA / source
    if path.name.endswith(".jsonl.xz"):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
    else:
        texts = [path.read_text(encoding="utf-8")]
    return [" ".join(p.split()) for t in texts for p in re.split(r"\n\s*\n", t) if p.strip()]


def _item(paragraph: str, rng: random.Random) -> dict | None:
    """One cloze item from a paragraph, or None where it does not make one.

    The target is the last word less trailing punctuation (alphabetic, as LAMBADA's);
    distractors are distinct alphabetic words of the context, case-insensitively unlike it.
    """
    words = paragraph.split(" ")
    target = words[-1].rstrip(".,;:!?\"')_")
    if not WORD.match(target):
        return None
    context = " ".join(words[:-1])
    seen = {target.lower()}
    pool = []
    for w in (w.strip(".,;:!?\"'()_") for w in words[:-1]):
        if WORD.match(w) and len(w) > 2 and w.lower() not in seen:
            seen.add(w.lower())
            pool.append(w)
    if len(pool) < CHOICES - 1:
        return None
    choices = [target, *rng.sample(pool, CHOICES - 1)]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(target)}


def build_task(name: str, seed: int = 0) -> list[dict]:
    """The items of task ``name`` (see the module docstring), deterministic in ``seed``."""
    source, lo, hi, n = SPECS[name]
    rng = random.Random(seed)
    paragraphs = [p for p in _paragraphs(source) if lo <= len(p.split(" ")) <= hi]
    rng.shuffle(paragraphs)
    items = []
    for p in paragraphs:
        item = _item(p, rng)
        if item is not None:
            items.append(item)
            if len(items) == n:
                break
    return items


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(i, ensure_ascii=False, sort_keys=True) + "\n" for i in items)


def write_tasks(folder: Path = TASKS_DIR) -> list[Path]:
    """Write every task's JSONL (``<name>.jsonl``) into ``folder``; return the paths."""
    out = []
    for name in SPECS:
        path = Path(folder) / f"{name}.jsonl"
        path.write_text(to_jsonl(build_task(name)), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_tasks():
        print(p)
