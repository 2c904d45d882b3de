"""Build the embedded corpus ``m2d_jax/data/corpus/python_docs.jsonl.gz`` from Debian's ``python3.11-doc`` package.

    cd /tmp && apt-get download python3.11-doc
    python -m m2d_jax.data.build_corpus /tmp/python3.11-doc_*.deb

Every ``*.rst.txt`` documentation source under ``usr/share/doc/python3.11/html/_sources/`` becomes one JSON line
``{"text", "source", "split"}``. The split is a stable hash of the source path (``split_of``), so a document's split
never depends on which other documents exist, and the output is byte-identical for the same package (documents in a
fixed order, gzip without a timestamp). The tutorial, FAQ and HOWTO prose come first (the subset earlier versions
shipped), then every other source in path order.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

from m2d_jax.artifacts import atomic_write
from m2d_jax.data.corpus import SPLIT_PERCENT, SPLITS
from m2d_jax.data.text import EMBEDDED_CORPUS
from m2d_jax.errors import DataError

SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
SOURCE_PREFIX = "python3.11-doc:"
PROSE_SECTIONS = ("tutorial", "faq", "howto")


def split_of(source: str) -> str:
    """"train" | "calibration" | "heldout" of a document, from the first 8 bytes of sha256(source) mod 100 against
    the cumulative ``SPLIT_PERCENT``."""
    bucket = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") % 100
    upper = 0
    for split in SPLITS:
        upper += SPLIT_PERCENT[split]
        if bucket < upper:
            return split
    raise AssertionError("SPLIT_PERCENT must sum to 100")


def _order(relative: str) -> tuple[int, str]:
    section = relative.split("/", 1)[0]
    return (PROSE_SECTIONS.index(section) if section in PROSE_SECTIONS else len(PROSE_SECTIONS), relative)


def corpus_records(sources_dir: Path) -> list[dict]:
    """One record per ``*.rst.txt`` under ``sources_dir``, in the corpus order."""
    files = {p.relative_to(sources_dir).as_posix(): p for p in sources_dir.rglob("*.rst.txt")}
    if not files:
        raise DataError(f"{sources_dir}: no *.rst.txt documentation sources")
    records = []
    for relative in sorted(files, key=_order):
        text = files[relative].read_text(encoding="utf-8")
        if text.strip():
            source = SOURCE_PREFIX + relative
            records.append({"text": text, "source": source, "split": split_of(source)})
    return records


def write_corpus(records: list[dict], out: Path) -> Path:
    """``records`` as gzip -9 JSON lines with no timestamp or file name in the header (byte-reproducible)."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()

    def write(tmp: Path):
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9,
                                                   mtime=0) as f:
            f.write(payload)

    return atomic_write(out, write, overwrite=True)


def build_from_deb(deb: Path, out: Path = EMBEDDED_CORPUS) -> list[dict]:
    """Unpack ``deb`` (with ``dpkg -x``) into a temporary directory and write the corpus to ``out``."""
    if not deb.is_file():
        raise DataError(f"{deb}: not found (apt-get download python3.11-doc)")
    with tempfile.TemporaryDirectory(prefix="m2d_corpus_") as tmp:
        subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
        sources = Path(tmp) / SOURCES_DIR
        if not sources.is_dir():
            raise DataError(f"{deb}: has no {SOURCES_DIR}/ (expected Debian's python3.11-doc)")
        records = corpus_records(sources)
    write_corpus(records, out)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2d_jax.data.build_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("deb", type=Path, help="python3.11-doc_*.deb (apt-get download python3.11-doc)")
    parser.add_argument("--out", type=Path, default=EMBEDDED_CORPUS)
    args = parser.parse_args(argv)
    records = build_from_deb(args.deb, args.out)
    for split in SPLITS:
        docs = [r for r in records if r["split"] == split]
        print(f"{split:<12} {len(docs):4d} documents {sum(len(r['text']) for r in docs) / 1e6:6.2f} M chars")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
