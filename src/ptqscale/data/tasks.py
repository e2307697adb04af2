"""Build the offline lm-evaluation-harness tasks we ship (src/ptqscale/assets/tasks).

Two kinds, both multiple choice over one passage (one paragraph of the corpus, hard line
wraps joined):

- cloze (``SPECS``): a last-word cloze in the LAMBADA manner, posed as a 4-way choice so
  that the tiny models of the tests score above chance and ``acc_norm`` is defined: the
  passage loses its last word; the choices are that word and three other distinct words of
  the same passage, in a shuffled order.
- continuation (``CONTINUATION``): the passage loses its last ``ENDING_WORDS`` words; the
  two choices are that real ending and the ending of a passage from a book by another
  author, equally many words long.

Passages, distractors and order come from ``random.Random(seed)``: the same corpus files and
seed give the same JSONL, byte for byte (tests/metrics/test_tasks.py rebuilds and compares).

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
# name -> (source, min words, max words, items); a passage's ending is its last ENDING_WORDS
CONTINUATION = {"ptq_gutenberg_continuation": ("gutenberg-en/test.jsonl.xz", 60, 200, 300)}
ENDING_WORDS = 20
TASKS = (*SPECS, *CONTINUATION)


def _documents(source: str) -> list[tuple[str, str]]:
    """``(author, text)`` of each document of the source (one book of a JSONL corpus; a
    plain text file is one document by an unnamed author)."""
    path = DATA / source
    if path.name.endswith(".jsonl.xz"):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return [(d["author"], d["text"]) for d in map(json.loads, f)]
    return [("", path.read_text(encoding="utf-8"))]


def _split(text: str) -> list[str]:
    """The paragraphs (blank-line separated) of ``text``, whitespace runs joined to one space."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _paragraphs(source: str) -> list[str]:
    """The source's paragraphs, document after document."""
    return [p for _, text in _documents(source) for p in _split(text)]


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
    if name in CONTINUATION:
        return build_continuation(name, seed)
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


def build_continuation(name: str, seed: int = 0) -> list[dict]:
    """Two-choice items: a passage's context, its real ending and another author's ending.

    Passages are paragraphs of ``lo``..``hi`` words; the context is all but the last
    ``ENDING_WORDS`` words. The distractor is the ending (last ``ENDING_WORDS`` words) of a
    passage drawn from the books of the other authors, so both choices have the same number
    of words and both close a paragraph; only the fit to the context tells them apart.
    """
    source, lo, hi, n = CONTINUATION[name]
    rng = random.Random(seed)
    passages = [(author, words) for author, text in _documents(source) for p in _split(text)
                if lo <= len(words := p.split(" ")) <= hi]
    endings: dict[str, list[str]] = {}
    for author, words in passages:
        endings.setdefault(author, []).append(" ".join(words[-ENDING_WORDS:]))
    if len(endings) < 2:
        raise ValueError(f"{name}: {source} needs books by two authors at least")
    rng.shuffle(passages)
    items = []
    for author, words in passages:
        real = " ".join(words[-ENDING_WORDS:])
        other = rng.choice(sorted(a for a in endings if a != author))
        choices = [real, rng.choice(endings[other])]
        if choices[1] == real:   # the same words closing two books: no question to ask
            continue
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:-ENDING_WORDS]), "choices": choices,
                      "label": choices.index(real)})
        if len(items) == n:
            break
    return items


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(i, ensure_ascii=False, sort_keys=True) + "\n" for i in items)


def write_tasks(folder: Path = TASKS_DIR) -> list[Path]:
    """Write every task's JSONL (``<name>.jsonl``) into ``folder``; return the paths."""
    out = []
    for name in TASKS:
        path = Path(folder) / f"{name}.jsonl"
        path.write_text(to_jsonl(build_task(name)), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_tasks():
        print(p)
