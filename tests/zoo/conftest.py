"""Fixtures of the zoo tests: a tiny Gutenberg-shaped folder cut from the real splits."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest


def _write_split(path: Path, texts: list[str]) -> None:
    with lzma.open(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"author": "", "title": "", "text": text}) + "\n")


@pytest.fixture(scope="session")
def gutenberg_dir(shared_data: Path) -> Path:
    path = shared_data / "gutenberg-en"
    if not (path / "test.jsonl.xz").exists():
        pytest.skip(f"no Gutenberg test split in {path}")
    return path


@pytest.fixture(scope="session")
def test_books(gutenberg_dir: Path) -> list[str]:
    from ptqscale.zoo.data import read_books

    return list(read_books(gutenberg_dir, "test"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, test_books: list[str], shared_data: Path) -> dict[str, Path]:
    """Real text, tiny: 3 'train' books of 30k chars, valid and test of 8k, 120 WikiText lines."""
    root = tmp_path_factory.mktemp("tiny-gutenberg")
    data = root / "gutenberg-en"
    data.mkdir()
    cuts = [book[20_000:50_000] for book in test_books[:3]]
    _write_split(data / "train-00.jsonl.xz", cuts[:2])
    _write_split(data / "train-01.jsonl.xz", cuts[2:])
    _write_split(data / "valid.jsonl.xz", [test_books[3][10_000:18_000]])
    _write_split(data / "test.jsonl.xz", [test_books[4][10_000:14_000],
                                          test_books[5][10_000:14_000]])
    wiki = root / "wiki.test.raw"
    lines = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    wiki.write_text("".join(lines.splitlines(keepends=True)[:120]), encoding="utf-8")
    return {"data": data, "wikitext": wiki, "root": root}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other
    and the other engineers' jobs (measured 4x slower per training step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
