"""The embedded real-text corpus, split by document into train / calibration / held-out.

``corpus/python_docs.jsonl.gz`` holds the full Python 3.11 documentation sources (Debian's ``python3.11-doc``; PSF
licence, see ``corpus/README.md``), one JSON object per document: ``text``, ``source`` (the path in the package)
and ``split``. ``python -m m2d_jax.data.build_corpus`` re-creates it; the split is a stable hash of the source
path (about 90 / 5 / 5 %). The held-out split is for evaluation only: teacher training uses "train", calibration
uses "calibration", and no stage of the pipeline reads "heldout" except perplexity / accuracy evaluation.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from m2d_jax.artifacts import atomic_write
from m2d_jax.data.text import EMBEDDED_CORPUS
from m2d_jax.errors import DataError

SPLITS = ("train", "calibration", "heldout")
SPLIT_PERCENT = {"train": 90, "calibration": 5, "heldout": 5}  # hash buckets of 100 per split, in SPLITS order


@functools.cache
def corpus_records() -> tuple[dict, ...]:
    """Every document of the embedded corpus as {"text", "source", "split"}, in the file's order."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        records = tuple(json.loads(line) for line in f)
    for i, r in enumerate(records):
        if r.get("split") not in SPLITS:
            raise DataError(f"{EMBEDDED_CORPUS}: record {i} has split {r.get('split')!r}, expected one of "
                            f"{SPLITS}")
    return records


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"corpus split {split!r}: expected one of {SPLITS}")


def corpus_documents(split: str) -> list[str]:
    """The texts of the embedded corpus' ``split`` ("train" | "calibration" | "heldout"), in the file's order."""
    _check_split(split)
    return [r["text"] for r in corpus_records() if r["split"] == split]


def write_split(split: str, out: str | Path, overwrite: bool = False, max_documents: int = 0) -> Path:
    """``split`` (its first ``max_documents`` documents if > 0) as a JSON-lines file {"text"} per document, for the
    stages that read data files (``m2d calibrate``, ``m2d distill``, ``m2d eval ppl``). Returns the absolute path."""
    docs = corpus_documents(split)[:max_documents or None]
    return atomic_write(out, lambda tmp: tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs)),
                        overwrite=overwrite)
