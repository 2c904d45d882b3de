"""Faults, injected deterministically with SIGKILL in a subprocess (tests/fault_worker.py):

- a distillation killed in the middle of a train-checkpoint write resumes from the last complete checkpoint (what
  Orbax left behind is not taken as one) and ends bit-identical to an uninterrupted run;
- an HF export killed mid-write leaves nothing under the target name and a rerun succeeds; killed while an
  ``overwrite`` export removes the previous one, the target is a complete export (old or new), never a partial one.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from distill_helpers import build_models, tiny_config
import m2d_jax
from m2d_jax.distill import train
from m2d_jax.distill.checkpointing import TrainCheckpointer

WORKER = Path(__file__).parent / "fault_worker.py"
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("fault_models"))


def run_killed(kind: str, job: dict, tmp_path: Path) -> None:
    """Run the worker on ``job`` and check that it died by SIGKILL at its kill point."""
    job_file = tmp_path / f"{kind}_job.json"
    job_file.write_text(json.dumps(job, default=str))
    proc = subprocess.run([sys.executable, str(WORKER), kind, str(job_file)], env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


# ---- distillation killed while writing a train checkpoint -----------------------------------------------------------
def final_state(workdir: Path, step: int) -> dict:
    """Every leaf of the saved train state (params, Adam moments, step) at ``step``, as host arrays."""
    tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def logged(workdir: Path) -> dict[int, dict]:
    """The metrics of each step; a resumed run drops what the killed one logged past its checkpoint, so every step
    is logged once, in order."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    return {row["step"]: row for row in rows}


def temporary_entries(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.iterdir() if not p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert train.run(tiny_config(models, workdir))["step"] == 6
    return workdir


@pytest.mark.parametrize("kill_point", ["rename", pytest.param("items", marks=pytest.mark.slow)])
def test_distillation_killed_mid_checkpoint_resumes_bit_identical(models, uninterrupted, tmp_path, kill_point):
    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    # checkpoints every 2 steps: step 2 is complete, the write of step 4 is cut short
    run_killed("distill", {"models": models, "workdir": workdir, "changes": {}, "kill_step": 4,
                           "kill_point": kill_point}, tmp_path)
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2"]
    leftovers = temporary_entries(checkpoints)
    assert leftovers and all(name.startswith("4.") for name in leftovers), leftovers  # the cut-short write
    if kill_point == "rename":  # everything written, even the commit marker: only the rename was missing
        assert (checkpoints / leftovers[0] / "state").is_dir() and (checkpoints / leftovers[0] / "data").is_dir()
    assert max(logged(workdir)) >= 3 and not (workdir / "student").exists()  # killed at the save of step 4

    ckpt = TrainCheckpointer(checkpoints, every=2, keep=3)
    assert ckpt.latest_step() == 2  # the temporary directory is not a checkpoint
    ckpt.close()
    # resume, stopping before step 4 is written again: the next run removes what the killed one left behind
    first = train.run(tiny_config(models, workdir, stop_at_step=3))
    assert first["step"] == 3 and temporary_entries(checkpoints) == []
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [2, 3]
    result = train.run(tiny_config(models, workdir))
    assert result["step"] == 6 and not result["preempted"]
    assert_same_run(uninterrupted, workdir)


@pytest.mark.slow
def test_distillation_killed_while_saving_the_student_finishes_on_rerun(models, uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    run_killed("distill", {"models": models, "workdir": workdir, "changes": {}, "kill_point": "student"}, tmp_path)
    assert not (workdir / "student").exists()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".student.")]  # the cut-short write
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
    result = train.run(tiny_config(models, workdir))  # nothing left to train: only the student is saved
    assert result["step"] == 6 and result["student"] == str(workdir / "student")
    assert_same_run(uninterrupted, workdir)


def assert_same_run(want_dir: Path, got_dir: Path) -> None:
    """Same metrics at every step, same final train state, same trained student: bit for bit."""
    want, got = logged(want_dir), logged(got_dir)
    assert sorted(got) == list(range(1, 7))
    for step in want:  # identical floats: same batches, same updates
        assert {k: v for k, v in got[step].items() if k not in ("tokens_per_s", "mfu")} == \
            {k: v for k, v in want[step].items() if k not in ("tokens_per_s", "mfu")}, step
    a, b = final_state(want_dir, 6), final_state(got_dir, 6)
    assert a.keys() == b.keys() and any("opt_state" in k for k in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    params = [jax.tree.leaves(nnx.state(m2d_jax.from_pretrained(w / "student"), nnx.Param).to_pure_dict())
              for w in (want_dir, got_dir)]
    assert len(params[0]) == len(params[1]) and all(np.array_equal(x, y) for x, y in zip(*params))


# ---- HF export killed mid-write ------------------------------------------------------------------------------------
MAX_SHARD_BYTES = 40_000  # the tiny teacher (~158 kB in float32) exports as several shards


@pytest.fixture(scope="module")
def exportable(models, tmp_path_factory):
    """(m2d_jax checkpoint, {dtype: the files of its uninterrupted export})."""
    from m2d_jax import checkpoint
    from m2d_jax.hf.export import export_checkpoint

    root = tmp_path_factory.mktemp("export")
    ckpt = checkpoint.save_model(m2d_jax.from_pretrained(models["teacher"]), root / "teacher_m2d")
    references = {}
    for dtype in ("float32", "bfloat16"):
        out = export_checkpoint(ckpt, root / f"reference_{dtype}", tokenizer_from=models["teacher"], dtype=dtype,
                                max_shard_bytes=MAX_SHARD_BYTES, progress=False)
        references[dtype] = files(out)
    assert sum(name.endswith(".safetensors") for name in references["float32"]) >= 3
    return ckpt, references


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def export_job(models, exportable, out: Path, **changes) -> dict:
    return {"checkpoint": exportable[0], "out": out, "tokenizer_from": models["teacher"],
            "max_shard_bytes": MAX_SHARD_BYTES, "dtype": "float32", **changes}


def test_export_killed_mid_write_leaves_no_target_and_a_rerun_succeeds(models, exportable, tmp_path):
    from m2d_jax.hf.export import export_checkpoint

    out = tmp_path / "student_hf"
    run_killed("export", export_job(models, exportable, out, kill_after_safetensors=2), tmp_path)
    assert not out.exists()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
    assert len(stale) == 1 and len(list(stale[0].iterdir())) == 3  # config.json and two of the shards
    export_checkpoint(exportable[0], out, tokenizer_from=models["teacher"], dtype="float32",
                      max_shard_bytes=MAX_SHARD_BYTES, progress=False)  # not blocked by the stale sibling
    assert files(out) == exportable[1]["float32"]


def test_overwrite_export_killed_while_removing_the_previous_one_leaves_a_complete_target(models, exportable,
                                                                                          tmp_path):
    from m2d_jax.hf.export import export_checkpoint

    out = tmp_path / "student_hf"
    export_checkpoint(exportable[0], out, tokenizer_from=models["teacher"], dtype="bfloat16",
                      max_shard_bytes=MAX_SHARD_BYTES, progress=False)  # the previous export
    run_killed("export", export_job(models, exportable, out, overwrite=True, kill_removing_previous_export=True),
               tmp_path)
    got = files(out) if out.exists() else {}
    complete_as = [dtype for dtype, reference in exportable[1].items() if got == reference]  # new or old
    assert complete_as, f"{out} is not a complete export: {sorted(got)}"
    export_checkpoint(exportable[0], out, tokenizer_from=models["teacher"], dtype="float32",
                      max_shard_bytes=MAX_SHARD_BYTES, overwrite=True, progress=False)
    assert files(out) == exportable[1]["float32"]
