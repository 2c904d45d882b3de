"""Multi-process distillation (``jax.distributed`` on localhost, 2 processes x 2 CPU devices, gloo collectives): the
parameters are FSDP-sharded across both processes, each process reads its own shard of the data, and the run must
equal the same 4-device mesh in one process — training, the saved student (every process writes its own shards),
and a checkpoint written by 2 processes resumed by 1."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from distill_helpers import build_models, tiny_config
from m2d_jax import checkpoint
from m2d_jax.distill import train

WORKER = Path(__file__).parent / "multiprocess_worker.py"
MESH = {"mesh.data": 1, "mesh.fsdp": 4}  # parameters sharded over devices of both processes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("mp_models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(worker: Path, job: Path) -> list[dict]:
    """``worker PROCESS_ID 2 PORT JOB`` as two processes on localhost (logs beside ``job``); each process's result
    dict (``JOB.result-I.json``). A failed process kills the other (it would wait at a collective)."""
    port = free_port()
    logs = [job.parent / f"{job.name}.process-{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port), str(job)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            break
        time.sleep(0.5)
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.wait() == 0, f"process {i} failed:\n{log.read_text()[-4000:]}"
    return [json.loads(Path(f"{job}.result-{i}.json").read_text()) for i in range(2)]


def run_two_processes(models, workdir: Path, **changes) -> list[dict]:
    """``distill.train.run`` in 2 processes; returns each process's result dict."""
    job = workdir.parent / f"{workdir.name}.job.json"
    job.write_text(json.dumps({"models": {k: str(v) for k, v in models.items()}, "workdir": str(workdir),
                               "changes": {**MESH, **changes}}))
    return launch_two_processes(WORKER, job)


def student_params(path) -> dict:
    model = checkpoint.load_model(path)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param).to_pure_dict())}


def assert_same_params(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-6, err_msg=key)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(models, tmp_path):
    one = train.run(tiny_config(models, tmp_path / "one", **MESH), devices=jax.devices()[:4])
    want = student_params(one["student"])

    results = run_two_processes(models, tmp_path / "two")
    assert [(r["process_index"], r["process_count"], r["devices"], r["local_devices"]) for r in results] == \
        [(0, 2, 4, 2), (1, 2, 4, 2)]
    for r in results:
        assert r["step"] == 6 and r["student"] == str(tmp_path / "two" / "student")
        np.testing.assert_allclose(r["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
    # process 0 alone writes metrics
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 6
    assert_same_params(student_params(results[0]["student"]), want)
    assert not list(tmp_path.glob("two/.student.tmp*"))  # the collective temporary directory was renamed

    # 2 processes train to step 3 and checkpoint; 1 process resumes the same run to the end
    split = tmp_path / "split"
    partial = run_two_processes(models, split, stop_at_step=3)
    assert [r["step"] for r in partial] == [3, 3] and partial[0]["student"] is None
    resumed = train.run(tiny_config(models, split, **MESH), devices=jax.devices()[:4])
    assert resumed["step"] == 6
    np.testing.assert_allclose(resumed["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
    assert_same_params(student_params(resumed["student"]), want)
