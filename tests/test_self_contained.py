"""The repository stands on its own: no tracked text file refers to documents that live outside it.

The method is described in docs/METHOD.md; code, help texts, docs and tests cite that file, never the notes a
development team kept next to the checkout.
"""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Spelled in pieces so that this file does not match itself.
OUTSIDE_REFERENCES = tuple("".join(parts) for parts in (
    ("..", "/shared"),
    ("shared", "/SPEC"),
    ("SPEC", ".md"),
    ("SPEC", " §"),
    ("ENVIRONMENT", ".md"),
    ("HF_LAYOUTS", ".md"),
    ("STYLE", ".md"),
))


def tracked_text_files() -> list[Path]:
    """Every file git tracks that is UTF-8 text (binary files such as the embedded corpus are skipped)."""
    # the suite runs from a git checkout (CI clones the repository): no git listing is a failure, not a skip
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in listing.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def outside_references(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: text`` (relative to ``root``) for every line of ``path`` that mentions a document outside the
    repository."""
    hits = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if any(ref in line for ref in OUTSIDE_REFERENCES):
            hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_outside_references_are_detected(tmp_path):
    """The check itself: each pattern is found, with its file and line, and a clean line is not reported."""
    probe = tmp_path / "probe.md"
    lines = ["clean line, see docs/METHOD.md §4"] + [f"cites {ref} here" for ref in OUTSIDE_REFERENCES]
    probe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    hits = outside_references(probe, tmp_path)
    assert [hit.split(":")[1] for hit in hits] == [str(n) for n in range(2, len(OUTSIDE_REFERENCES) + 2)]
    assert all(hit.startswith("probe.md:") for hit in hits)


def test_no_tracked_file_refers_outside_the_repository():
    files = tracked_text_files()
    assert any(path.name == "METHOD.md" for path in files), "docs/METHOD.md is not tracked"
    hits = [hit for path in files for hit in outside_references(path)]
    if hits:
        pytest.fail(f"{len(hits)} line(s) refer to documents outside the repository (cite docs/METHOD.md instead):\n"
                    + "\n".join(hits), pytrace=False)
