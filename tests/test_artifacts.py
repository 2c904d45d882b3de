"""artifacts.py: output checks before any work, atomic files and directories, all-or-nothing outputs, Provenance."""

import json
import os
from pathlib import Path

import pytest

from m2d_jax.artifacts import Provenance, atomic_write, check_outputs, file_sha256, write_json, write_outputs
from m2d_jax.errors import CheckpointError, OutputError


def test_check_outputs(tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "a_file").write_text("x")
    want = [tmp_path / "new" / "deep" / "out", Path.cwd() / "rel"]
    assert check_outputs(tmp_path / "new" / "deep" / "out", None, "rel") == want  # absolute, None skipped
    with pytest.raises(FileExistsError, match="exists already exists"):
        check_outputs(tmp_path / "new", tmp_path / "exists")
    assert check_outputs(tmp_path / "exists", overwrite=True) == [tmp_path / "exists"]
    with pytest.raises(OutputError, match="a_file is not a directory"):
        check_outputs(tmp_path / "a_file" / "sub" / "out")
    for a, b in ((tmp_path / "x", tmp_path / "x"), (tmp_path / "x", tmp_path / "x" / "hf")):
        with pytest.raises(OutputError, match="overlap"):
            check_outputs(a, b)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if not os.access(read_only, os.W_OK):  # root may write anywhere
            with pytest.raises(OutputError, match="is not writable"):
                check_outputs(read_only / "out")
    finally:
        read_only.chmod(0o700)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    for directory in (False, True):
        with pytest.raises(RuntimeError):
            atomic_write(tmp_path / "out", fail if not directory else lambda d: fail(d / "f"), directory=directory)
        assert list(tmp_path.iterdir()) == []
    out = atomic_write(tmp_path / "out", lambda tmp: tmp.write_text("done"))
    assert out.read_text() == "done" and len(file_sha256(out)) == 64
    with pytest.raises(FileExistsError):
        write_json({}, out)
    write_json({"b": 1, "a": float("nan")}, out, overwrite=True)
    assert list(json.loads(out.read_text())) == ["a", "b"]


def test_write_outputs_all_or_nothing(tmp_path):
    def make_dir(path):
        path.mkdir()
        (path / "f").write_text("x")

    def broken(path):
        raise RuntimeError("second output failed")

    with pytest.raises(RuntimeError, match="second output failed"):
        write_outputs({tmp_path / "a": make_dir, None: broken, tmp_path / "b": broken})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    with pytest.raises(FileExistsError):  # checked before the first writer runs
        write_outputs({tmp_path / "c": make_dir, tmp_path / "a": make_dir})
    assert not (tmp_path / "c").exists()
    assert write_outputs({tmp_path / "c": make_dir, tmp_path / "a": make_dir}, overwrite=True) == [tmp_path / "c",
                                                                                                  tmp_path / "a"]
    assert (tmp_path / "a" / "f").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]


def test_provenance_record():
    import m2d_jax

    record = Provenance("dense_student", source_model="/m", source_hf_dir="/hf", recipe={"groups": 2}).to_dict()
    assert record["package_version"] == m2d_jax.__version__ and record["kind"] == "dense_student"
    assert Provenance.from_dict(json.loads(json.dumps(record))) == Provenance(**record)
    assert Provenance.from_dict({}).kind == "unknown"  # a model saved without a record
    with pytest.raises(CheckpointError, match=r"unknown fields \['source'\]"):
        Provenance.from_dict({"kind": "distilled", "source": "/s"})
