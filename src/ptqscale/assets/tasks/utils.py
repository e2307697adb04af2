"""lm-eval loader of ptqscale's offline tasks: the JSONL next to this file, read without
the hub and independent of the working directory (a YAML ``data_files`` path would be
resolved against it)."""

from pathlib import Path


def load_jsonl(name: str, **_metadata):
    """The task ``name``'s items as a ``DatasetDict`` with one ``test`` split."""
    import datasets

    path = Path(__file__).resolve().parent / f"{name}.jsonl"
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
