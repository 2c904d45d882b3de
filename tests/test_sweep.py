"""``m2d sweep`` on a tiny random Qwen3-MoE teacher (E = 8, top-2): a reduced grid writes its rows and plots, a
row equals ``m2d convert`` + ``m2d eval ppl`` of that configuration, a SIGKILLed sweep resumes into the same rows,
invalid configurations are recorded, and the best configurations are distilled (resumably)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m2d_jax.config_utils import apply_overrides, load_config
from m2d_jax.errors import OutputError
from m2d_jax.sweep import (RESULT_COLUMNS, RowFile, compared, format_summary, grid_points, read_rows, row_name,
                           run_sweep)

from conftest import corpus_documents, make_checkpoint_with_tokenizer

TEACHER = dict(model_type="qwen3_moe", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=8,
               num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False)
# 2 scorings x 2 groupings x 2 DP scalings x K in (2, 4, 16): K = 16 > E is invalid, K = k = 2 makes the groupings equal
GRID = ["--config.grid.scorings=('selection_freq', 'gld_reap')", "--config.grid.groupings=('round_robin', "
        "'router_cluster')", "--config.grid.k_multiples=(1, 2, 8)"]
NUM_ROWS = 2 * 2 * 2 * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    docs = corpus_documents(44, max_chars=3000)
    teacher = make_checkpoint_with_tokenizer(TEACHER, root / "teacher", seed=3, tokenizer_vocab=240, docs=docs[:40])
    files = {}
    for name, part in (("train", docs[:40]), ("heldout", docs[40:])):  # held-out documents are never calibrated on
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    overrides = GRID + [
        f"--config.teacher={teacher}", f"--config.calibration.files=('{files['train']}',)",
        "--config.calibration.seq_len=32", "--config.calibration.num_seqs=16", "--config.calibration.gram_tokens=128",
        f"--config.eval.files=('{files['heldout']}',)", "--config.eval.seq_len=32",
        f"--config.distill.data.files=('{files['train']}',)", "--config.distill.steps=2",
        "--config.distill.data.batch_size=4", "--config.distill.data.seq_len=32",
        "--config.distill.schedule.warmup_steps=1", "--config.distill.schedule.decay_steps=1",
        "--config.distill.checkpoint.every=2", "--config.distill.mesh.fsdp=1", "--config.num_devices=1",
        "--config.distill_best=False", "--config.progress=False"]
    return {"root": root, "teacher": teacher, "files": files, "overrides": overrides}


def sweep_config(setup, workdir, *extra):
    return apply_overrides(load_config("sweep"), setup["overrides"] + [f"--config.workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def sweep_run(setup):
    workdir = setup["root"] / "uninterrupted"
    return run_sweep(sweep_config(setup, workdir)), workdir


def test_reduced_grid_writes_rows_and_plots(sweep_run):
    result, workdir = sweep_run
    rows = read_rows(workdir / "results.csv")
    assert [compared(r) for r in rows] == [compared(r) for r in result["rows"]]
    assert len(rows) == NUM_ROWS and result["computed"] == NUM_ROWS and list(rows[0]) == list(RESULT_COLUMNS)
    for row in rows:
        if row["K"] == "16":  # invalid entries are reported with the reason, not dropped
            assert row["status"] == "invalid" and row["note"] == "K=16 > E=8 experts" and row["ppl"] == ""
        elif row["K"] == "2" and row["grouping"] == "router_cluster":  # K = k: singletons, the round_robin student
            assert row["status"] == "same" and row["same_as"] == row_name({**row, "grouping": "round_robin"})
        else:
            assert row["status"] == "ok" and np.isfinite(float(row["ppl"])) and row["same_as"] == ""
    by_name = {row_name(r): r for r in rows}
    for row in rows:
        if row["status"] == "same":
            same = by_name[row["same_as"]]
            assert (row["ppl"], row["plan_sha256"]) == (same["ppl"], same["plan_sha256"])
    # the DP scalings and the groupings at K > k give different students, so different perplexities
    ok = [r for r in rows if r["status"] == "ok"]
    assert len({r["plan_sha256"] for r in ok}) == len(ok) == 12 and len({r["ppl"] for r in ok}) > 1
    for plot in result["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {Path(p).name for p in result["plots"]} == {"ppl_vs_K.png", "heatmap.png"}
    summary = format_summary(result)
    assert "24 configurations: 12 converted, 4 identical to an earlier one, 8 invalid" in summary


def test_row_equals_direct_convert_and_perplexity(setup, sweep_run, tmp_path):
    """Oracle: the stage functions ``m2d convert`` and ``m2d eval ppl`` use, from files, on the same configuration."""
    from m2d_jax.convert import ConversionRecipe
    from m2d_jax.eval.ppl import evaluate_perplexity
    from m2d_jax.info import load_config as load_model_config, summarize
    from m2d_jax.pipeline import convert_checkpoint

    _, workdir = sweep_run
    row = next(r for r in read_rows(workdir / "results.csv")
               if (r["scoring"], r["grouping"], r["dp_scaling"], r["K"]) == ("gld_reap", "router_cluster",
                                                                            "proportional", "4"))
    student = convert_checkpoint(setup["teacher"], workdir / "stats.npz",
                                 ConversionRecipe(2, "router_cluster", "proportional"), tmp_path / "student",
                                 scoring="gld_reap", num_selected=4, progress=False)
    want = evaluate_perplexity(student, [setup["files"]["heldout"]], seq_len=32, tokenizer_path=setup["teacher"])
    assert int(row["tokens"]) == want.tokens
    np.testing.assert_allclose(float(row["ppl"]), want.ppl, rtol=1e-6)
    np.testing.assert_allclose(float(row["nll"]), want.nll, rtol=1e-6)
    assert int(row["student_params"]) == summarize(load_model_config(student)[0])["total_params"]


def test_killed_sweep_resumes_into_identical_rows(setup, sweep_run):
    """``m2d sweep`` in a subprocess, SIGKILLed once some rows are written; the same command again skips them and
    ends with the uninterrupted run's rows (all but the wall-clock column)."""
    workdir = setup["root"] / "killed"
    csv_path = workdir / "results.csv"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "m2d_jax.cli", "sweep", *setup["overrides"], f"--config.workdir={workdir}"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if csv_path.exists() and csv_path.read_text().count("\n") - 1 >= 6:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished = len(RowFile(csv_path, RESULT_COLUMNS, RESULT_COLUMNS[:4]).rows)
    assert 6 <= finished < NUM_ROWS

    resumed = run_sweep(sweep_config(setup, workdir))
    assert resumed["computed"] == NUM_ROWS - finished
    uninterrupted = read_rows(sweep_run[1] / "results.csv")
    assert [compared(r) for r in read_rows(csv_path)] == [compared(r) for r in uninterrupted]


def test_sweep_on_a_two_device_mesh_equals_one_device(setup, sweep_run, tmp_path):
    """The teacher and every student placed on the distill config's mesh (fsdp=2), from given statistics files:
    the same rows up to float summation order."""
    config = sweep_config(setup, tmp_path / "mesh", "--config.num_devices=2", "--config.distill.mesh.fsdp=2",
                          f"--config.calibration.stats=('{sweep_run[1] / 'stats.npz'}',)",
                          "--config.grid.scorings=('gld_reap',)", "--config.grid.groupings=('router_cluster',)",
                          "--config.grid.dp_scalings=('proportional',)", "--config.grid.k_multiples=(1, 2)")
    rows = run_sweep(config)["rows"]
    want = {row_name(r): r for r in read_rows(sweep_run[1] / "results.csv")}
    assert [row_name(r) for r in rows] == ["gld_reap/router_cluster/proportional/K=2",
                                           "gld_reap/router_cluster/proportional/K=4"]
    for row in rows:
        assert row["plan_sha256"] == want[row_name(row)]["plan_sha256"]
        np.testing.assert_allclose(float(row["ppl"]), float(want[row_name(row)]["ppl"]), rtol=1e-5)


def test_grid_points_report_invalid_entries():
    from ml_collections import ConfigDict

    grid = ConfigDict(dict(scorings=("reap",), groupings=("round_robin",), dp_scalings=("uniform",),
                           k_multiples=(1, 2, 3, 8), groups=1))
    points = grid_points(grid, top_k=2, num_experts=6)
    assert [(p.num_selected, reason) for p, reason in points] == [
        (1, "K=1 < top-k=2 (selection needs top-k <= K)"), (2, None), (3, None), (8, "K=8 > E=6 experts")]
    with pytest.raises(ValueError, match="grid.groupings"):
        grid_points(ConfigDict({**grid.to_dict(), "groupings": ("nearest",)}), top_k=2, num_experts=6)
    with pytest.raises(ValueError, match="grid.k_multiples"):
        grid_points(ConfigDict({**grid.to_dict(), "k_multiples": (1, 1)}), top_k=2, num_experts=6)


def test_row_file_drops_a_torn_line(tmp_path):
    path = tmp_path / "rows.csv"
    table = RowFile(path, ("a", "b", "seconds"), ("a",))
    table.append({"a": "x", "b": 0.1, "seconds": 1.0})
    with open(path, "a") as f:
        f.write("y,0.")  # a kill in the middle of writing a row
    reopened = RowFile(path, ("a", "b", "seconds"), ("a",))
    assert list(reopened.rows) == [("x",)] and path.read_text() == "a,b,seconds\nx,0.1,1.0\n"
    reopened.append({"a": "y", "b": 0.2, "seconds": 2.0})
    assert [r["b"] for r in read_rows(path)] == ["0.1", "0.2"]
    with pytest.raises(OutputError, match="columns a,c"):
        RowFile(path, ("a", "c"), ("a",))


def test_workdir_of_other_settings_is_refused(setup, sweep_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(sweep_run[1], workdir)
    with pytest.raises(OutputError, match="field 'eval'"):
        run_sweep(sweep_config(setup, workdir, "--config.eval.seq_len=16"))
    with pytest.raises(ValueError, match="config field teacher"):
        run_sweep(sweep_config(setup, workdir, "--config.teacher="))


def test_bad_inputs_are_refused_before_the_workdir_is_made(setup, tmp_path):
    from m2d_jax.errors import CheckpointError

    workdir = tmp_path / "never"
    with pytest.raises(CheckpointError, match="no config.json"):
        run_sweep(sweep_config(setup, workdir, f"--config.teacher={tmp_path / 'missing'}"))
    with pytest.raises(ValueError, match="config field eval.files: .*absent.jsonl: data file not found"):
        run_sweep(sweep_config(setup, workdir, f"--config.eval.files=('{tmp_path / 'absent.jsonl'}',)"))
    assert not workdir.exists()


@pytest.mark.slow
def test_best_configurations_are_distilled_and_skipped_when_finished(setup, sweep_run, tmp_path, monkeypatch):
    """The best configuration of each scoring x grouping pair (here gld_reap x 2 groupings) and the overall best with
    the expanded teacher (k' = 2k = 4) are distilled; the post-distillation perplexity is that of the saved student;
    a second run distils nothing and returns the same rows."""
    import m2d_jax.distill
    from m2d_jax.eval.ppl import evaluate_perplexity

    workdir = tmp_path / "distilled"
    shutil.copytree(sweep_run[1], workdir)  # the grid is finished: only the distillations run
    config = sweep_config(setup, workdir, "--config.grid.scorings=('gld_reap',)", "--config.distill_best=True")
    result = run_sweep(config)
    assert result["computed"] == 0
    names = [r["name"] for r in result["distilled"]]
    best = {(r["scoring"], r["grouping"]): r for r in result["distilled"] if not r["name"].startswith("expanded")}
    assert set(best) == {("gld_reap", "round_robin"), ("gld_reap", "router_cluster")}
    for (scoring, grouping), row in best.items():
        candidates = [r for r in result["rows"] if (r["scoring"], r["grouping"]) == (scoring, grouping)
                      and r["status"] != "invalid"]
        assert float(row["ppl_before"]) == min(float(r["ppl"]) for r in candidates)
    expanded = result["distilled"][-1]
    overall = min(best.values(), key=lambda r: float(r["ppl_before"]))
    assert names[-1] == f"expanded__{overall['scoring']}__{overall['grouping']}"
    assert (expanded["teacher_top_k"], overall["teacher_top_k"]) == ("4", "2")
    for row in result["distilled"]:
        assert row["steps"] == "2" and row["train_tokens"] == str(2 * 4 * 32)
        if not row["same_as"]:
            want = evaluate_perplexity(workdir / "distill" / row["name"] / "student", [setup["files"]["heldout"]],
                                       seq_len=32, tokenizer_path=setup["teacher"])
            np.testing.assert_allclose(float(row["ppl"]), want.ppl, rtol=1e-6)
    assert float(expanded["ppl"]) != float(overall["ppl"])  # the expanded teacher trains a different student

    def no_training(*args, **kwargs):
        raise AssertionError("a finished distillation was run again")

    monkeypatch.setattr(m2d_jax.distill, "run", no_training)
    again = run_sweep(config)
    assert [compared(r) for r in again["distilled"]] == [compared(r) for r in result["distilled"]]
