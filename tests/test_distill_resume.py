"""Exact resume across processes, best-effort save on SIGTERM (via the ``m2d distill`` CLI in subprocesses), and a
distillation run that actually reduces the KL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distill_helpers import as_overrides, build_models, tiny_config
from m2d_jax.distill import train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("distill_models"))


def distill_cmd(models, workdir, **changes):
    config = tiny_config(models, workdir, **{"mesh.data": 2, "mesh.tensor": 2, **changes})  # fsdp = the rest
    return [sys.executable, "-m", "m2d_jax.cli", "distill", *as_overrides(config)]


ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TOKENIZERS_PARALLELISM="false")


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def saved_params(workdir: Path, step: int) -> dict:
    tree = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_exact(models, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    subprocess.run(distill_cmd(models, straight), check=True, env=ENV, capture_output=True)
    first = subprocess.run(distill_cmd(models, split, stop_at_step=3), env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(losses(split)) == [1, 2, 3]
    assert sorted(int(p.name) for p in (split / "checkpoints").iterdir()) == [2, 3]  # every 2, and where it stopped
    assert not (split / "student").exists()  # only a completed run saves the trained student
    second = subprocess.run(distill_cmd(models, split), env=ENV, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 7))  # the second process started at step 4
    ref, got = losses(straight), losses(split)
    assert got == ref  # identical floats for every step
    a, b = saved_params(straight, 6), saved_params(split, 6)
    assert a.keys() == b.keys() and any("opt_state" in k for k in a) and "['step']" in a
    assert {k.split("]")[0] + "]" for k in a} == {"['params']", "['opt_state']", "['step']"}  # no unused RNG
    for key in a:  # params, Adam moments and step
        assert np.array_equal(a[key], b[key]), key
    # the completed runs saved the trained student as an ordinary m2d_jax checkpoint: the final params, exactly
    import m2d_jax
    from flax import nnx

    final = {k.replace("'", "")[len("[params]"):]: v for k, v in a.items() if k.startswith("['params']")}
    for workdir in (straight, split):
        student = m2d_jax.from_pretrained(workdir / "student")
        leaves = {jax.tree_util.keystr(k).replace("'", ""): np.asarray(v) for k, v in
                  jax.tree_util.tree_leaves_with_path(nnx.state(student, nnx.Param).to_pure_dict())}
        assert leaves.keys() == final.keys()
        assert all(np.array_equal(leaves[k], final[k]) for k in final)


def test_sigterm_saves_a_checkpoint_and_stops(models, tmp_path):
    workdir = tmp_path / "term"
    cmd = distill_cmd(models, workdir, steps=100000, **{"schedule.decay_steps": 10, "checkpoint.every": 1000})
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    last_logged = max(losses(workdir))
    assert result["preempted"] and 3 <= result["step"] == last_logged < 100000
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == result["step"]  # the step reached at SIGTERM was saved (1000-step interval not reached)


def test_a_checkpoint_of_another_run_is_a_one_line_error(models, tmp_path, capsys):
    """A train state that does not fit (here: the MoE teacher resumed as the student of a dense run's workdir)."""
    from m2d_jax import cli
    from m2d_jax.errors import CheckpointError

    config = tiny_config(models, tmp_path / "run", stop_at_step=2)
    assert train.run(config)["step"] == 2
    config.student.path = str(models["teacher"])
    with pytest.raises(CheckpointError, match=r"checkpoints/2: the saved train state does not fit this run \("):
        train.run(config)
    assert cli.main(["distill", *as_overrides(config)]) == 2  # the CLI prints it as one line
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the data and import progress bars)
    assert last.startswith("m2d distill: error: ") and "does not fit this run" in last
    assert last.endswith("resume it with the run that wrote it, or use a new checkpoint.dir")  # all on one line


@pytest.mark.slow
def test_distillation_reduces_kl(models, tmp_path):
    config = tiny_config(models, tmp_path / "long", steps=300, **{
        "optimizer.learning_rate": 3e-3, "schedule.warmup_steps": 20, "schedule.decay_steps": 60,
        "checkpoint.every": 1000, "logging.every": 10, "data.batch_size": 16, "teacher.moe_dispatch": "dense"})
    config.mesh.fsdp = 1
    result = train.run(config, devices=jax.devices()[:1])
    kl = [json.loads(line)["kl"] for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert result["step"] == 300 and len(kl) == 30
    print("KL every 10 steps:", [round(v, 4) for v in kl])
    assert np.mean(kl[-3:]) < 0.5 * kl[0], kl
