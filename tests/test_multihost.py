"""Two processes on localhost (``jax.distributed`` through the JAX_* launch variables, 2 fake CPU devices each, gloo
collectives) run calibration, conversion, 3 distillation steps, perplexity, the HF export, a local lm-eval task and
greedy generation on one 4-device mesh spanning both: statistics, converted and exported weights, losses, perplexity,
task results and generated tokens equal the same mesh in one process, and exactly one set of files is written (by
process 0, or collectively by Orbax)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import corpus_documents
from distill_helpers import build_models
from eval_support import write_task_yamls
from m2d_jax import checkpoint
from m2d_jax.calibration import load_stats
from m2d_jax.distributed import launch_kind
from m2d_jax.errors import MeshError
from m2d_jax.hf import SafetensorsCheckpoint
from multihost_worker import run_stages
from test_multiprocess import launch_two_processes, student_params

WORKER = Path(__file__).parent / "multihost_worker.py"


def _two_processes(models: dict, out: Path) -> list[dict]:
    job = out.parent / f"{out.name}.job.json"
    job.write_text(json.dumps({"models": {k: str(v) for k, v in models.items()}, "out": str(out)}))
    return launch_two_processes(WORKER, job)


# directories whose contents are named per process or per run (counted by the directory): Orbax's per-step
# checkpoint contents and the students' Orbax parameters, by (leading path parts, depth of their contents)
PER_PROCESS = ((("distill", "checkpoints"), 4), (("distill", "student", "params"), 4), (("converted", "params"), 3))


def _files(root: Path) -> set[str]:
    """Every file and directory under ``root`` (relative), hidden temporaries included; the contents of
    ``PER_PROCESS`` directories and tensorboard event files (named by host and time) are counted by their
    directories."""
    names = set()
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(rel.parts[:len(lead)] == lead and len(rel.parts) >= depth for lead, depth in PER_PROCESS) \
                or "tensorboard" in rel.parts[:2] and len(rel.parts) > 2:
            continue
        names.add(str(rel))
    return names


def _tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        return {k: np.array(ckpt.read(k)) for k in ckpt.keys()}


@pytest.mark.slow
def test_two_processes_run_every_stage_like_one(tmp_path):
    models = build_models(tmp_path / "models")
    models["eval"] = tmp_path / "models" / "eval.txt"  # a few hundred tokens: 6 batches of 4 windows
    models["eval"].write_text("\n\n".join(corpus_documents(3, max_chars=300)))
    models["tasks"] = write_task_yamls(tmp_path / "tasks")  # local lm-eval tasks (m2d_test_mc: 6 questions)
    one = run_stages(models, tmp_path / "one", jax.devices()[:4])
    two = _two_processes(models, tmp_path / "two")

    assert [(r["process_index"], r["process_count"], r["devices"]) for r in two] == [(0, 2, 4), (1, 2, 4)]
    assert one["process_count"] == 1
    for r in two:  # every process ends with the results of the whole run
        assert r["stats_digest"] == two[0]["stats_digest"] and r["ppl"] == two[0]["ppl"]
        np.testing.assert_allclose(r["loss"]["loss"], one["loss"]["loss"], rtol=1e-5)
        np.testing.assert_allclose(r["ppl"]["ppl"], one["ppl"]["ppl"], rtol=1e-5)
        assert r["ppl"]["tokens"] == one["ppl"]["tokens"] and r["tokens"] == one["tokens"]
        assert r["generated"] == one["generated"] and all(r["generated"])  # greedy tokens, 4 prompts
        assert all(greedy for _, greedy in r["scored"])  # the scoring forward agrees with the KV-cache decoding
        np.testing.assert_allclose([s for s, _ in r["scored"]], [s for s, _ in one["scored"]], rtol=1e-5)
        assert r["tasks"]["acc,none"] == one["tasks"]["acc,none"] and r["tasks"] == two[0]["tasks"]
        np.testing.assert_allclose(r["tasks"]["acc_norm,none"], one["tasks"]["acc_norm,none"], rtol=1e-6)

    want, got = load_stats(tmp_path / "one" / "stats.npz"), load_stats(tmp_path / "two" / "stats.npz")
    for name in want.sums._fields:  # float32 per-batch sums, reduced in another order across 2 processes
        value = getattr(want.sums, name)
        np.testing.assert_allclose(getattr(got.sums, name), value, rtol=1e-5,
                                   atol=2e-6 * max(1.0, float(np.abs(value).max())), err_msg=name)
    rows = [json.loads(line) for line in (tmp_path / "two" / "distill" / "metrics.jsonl").read_text().splitlines()]
    want_rows = [json.loads(line) for line in (tmp_path / "one" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by process 0
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want_rows], rtol=1e-5)

    # the distilled student's export, then the converted student's. After 3 AdamW steps an element whose gradient is
    # near zero carries the float32 reduction-order noise of the 2-process sums amplified by Adam's 1 / sqrt(v): up to
    # 5e-6 here; the bound is 1% of one step at the learning rate 3e-3, hence the trained weights' larger tolerance
    for hf_dir, atol in (("hf", 3e-5), ("converted_hf", 2e-6)):
        exported, reference = _tensors(tmp_path / "two" / hf_dir), _tensors(tmp_path / "one" / hf_dir)
        assert exported.keys() == reference.keys()
        for key, value in reference.items():
            np.testing.assert_allclose(exported[key], value, rtol=2e-5, atol=atol, err_msg=f"{hf_dir}: {key}")
    converted, want_converted = (student_params(tmp_path / run / "converted") for run in ("two", "one"))  # Orbax
    assert converted.keys() == want_converted.keys()
    for key, value in want_converted.items():  # the same experts; DP scales from float32-reduced statistics
        np.testing.assert_allclose(converted[key], value, rtol=2e-5, atol=2e-6, err_msg=key)
    selections = [checkpoint.load_metadata(tmp_path / run / "converted")["selection"] for run in ("two", "one")]
    assert selections[0]["selected"] == selections[1]["selected"]
    assert json.loads((tmp_path / "two" / "tasks.json").read_text())["tasks"] == \
        json.loads((tmp_path / "one" / "tasks.json").read_text())["tasks"]
    # one file set: the same files as one process writes, no temporaries, no per-process copies
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert not [n for n in _files(tmp_path / "two") if ".tmp" in n or ".staged" in n]
    assert (tmp_path / "two" / "hf" / "tokenizer.json").exists()


def test_launch_kind_reads_the_launch_environment():
    assert launch_kind({}) is None  # this machine: no TPU chips
    assert launch_kind({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "env"
    assert launch_kind({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == "env"
    slurm = {"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert launch_kind(slurm) == "slurm"
    assert launch_kind({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: one process
    assert launch_kind({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # the batch script, not an srun step
    assert launch_kind({"TPU_WORKER_HOSTNAMES": "t1,t2"}, chips=0) == "tpu"
    assert launch_kind({}, chips=4) == "tpu"  # a TPU VM: jax's detection finds the slice's hosts
    assert launch_kind({"TPU_WORKER_HOSTNAMES": "localhost"}, chips=0) is None  # no TPU here, one host listed


@pytest.mark.parametrize("env, match", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two': expected an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"),
])
def test_bad_launch_variables_are_one_line_errors(monkeypatch, env, match):
    from m2d_jax.distributed import initialize_distributed

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(MeshError, match=match):
        initialize_distributed()


def test_one_process_launch_is_a_no_op(monkeypatch):
    from m2d_jax.distributed import initialize_distributed

    launch = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    assert initialize_distributed() is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_every_command_starts_with_the_launch_check(monkeypatch, tmp_path, capsys):
    """``m2d`` calls ``initialize_distributed`` before the command: bad launch variables fail in one line."""
    from m2d_jax.cli import main

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["m2d info: error: environment: JAX_NUM_PROCESSES, JAX_PROCESS_ID not set; a multi-process launch "
                   "needs JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID"]
