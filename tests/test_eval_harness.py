"""The "m2d" lm-eval backend against lm-eval's own "hf" backend on the HF checkpoint of the same model."""

import json
import logging
import types

import lm_eval
import numpy as np
import pytest
from eval_support import checkpoint_with_tokenizer, write_task_yamls
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from m2d_jax.cli import main
from m2d_jax.eval import lm_eval_backend
from m2d_jax.eval.lm_eval_backend import M2DLM  # importing registers "m2d"
from m2d_jax.eval.scoring import _target_logprobs
from m2d_jax.eval.tasks import evaluate_tasks, format_table

TASKS = ["m2d_test_mc", "m2d_test_rolling", "m2d_test_gen"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task_yamls(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def local_tasks(task_dir):
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def run(model, model_args, manager, **kwargs):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
                                   log_samples=True, **kwargs)


def responses(out, task):
    return [doc["resps"] for doc in sorted(out["samples"][task], key=lambda d: d["doc_id"])]


@pytest.mark.parametrize("name", ["moe_gqa_norm_mlponly", pytest.param("dense_sliding_layers",
                                                                         marks=pytest.mark.slow)])
def test_m2d_backend_equals_hf_backend(tmp_path, local_tasks, name):
    ckpt = checkpoint_with_tokenizer(name, tmp_path / name)
    compiled = _target_logprobs._cache_size()
    ours = run("m2d", f"pretrained={ckpt},dtype=float32,batch_size=4", local_tasks)
    shapes = _target_logprobs._cache_size() - compiled
    ref = run("hf", f"pretrained={ckpt},device=cpu,dtype=float32", local_tasks, batch_size=4)

    for task in ("m2d_test_mc", "m2d_test_rolling"):  # loglikelihoods to 1e-4
        a, b = responses(ours, task), responses(ref, task)
        assert len(a) == len(b) > 0
        for doc_a, doc_b in zip(a, b):
            flat_a = [r[0] if isinstance(r[0], tuple) else (r[0], None) for r in doc_a]
            flat_b = [r[0] if isinstance(r[0], tuple) else (r[0], None) for r in doc_b]
            np.testing.assert_allclose([x[0] for x in flat_a], [x[0] for x in flat_b], atol=1e-4, rtol=1e-6)
            assert [x[1] for x in flat_a] == [x[1] for x in flat_b]  # is_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["m2d_test_mc"][metric] == ref["results"]["m2d_test_mc"][metric]
    np.testing.assert_allclose(ours["results"]["m2d_test_rolling"]["word_perplexity,none"],
                               ref["results"]["m2d_test_rolling"]["word_perplexity,none"], rtol=1e-5)
    assert responses(ours, "m2d_test_gen") == responses(ref, "m2d_test_gen")  # greedy generate_until texts
    assert sum(len(r[0]) for r in responses(ours, "m2d_test_gen")) > 0
    # > 20 loglikelihood requests and several rolling windows, padded to a few fixed lengths: <= 3 shapes
    assert 1 <= shapes <= 3


def test_evaluate_tasks_summary_json_and_cli(tmp_path, task_dir, local_tasks, capsys):
    ckpt = checkpoint_with_tokenizer("dense_tied_mha", tmp_path / "model")
    lm = M2DLM(str(ckpt), batch_size=4)
    out = tmp_path / "results.json"
    result = evaluate_tasks(lm, ["m2d_test_mc", "m2d_test_rolling"], include_path=task_dir, include_defaults=False,
                            output=out)
    assert json.loads(out.read_text())["tasks"] == result["tasks"]
    mc = result["tasks"]["m2d_test_mc"]
    assert mc["metric"] == "acc_norm" and mc["value"] == result["results"]["m2d_test_mc"]["acc_norm,none"]
    assert mc["num_fewshot"] == 0
    assert result["tasks"]["m2d_test_rolling"]["metric"] == "word_perplexity"
    table = format_table(result).splitlines()
    assert len(table) == 4 and table[1].startswith("m2d_test_mc") and table[-1].startswith("avg")

    request = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=("Question:", {"until": ["\n"], "top_k": 5}))
    with pytest.raises(ValueError, match=r"unsupported generation_kwargs \['top_k'\]"):
        lm.generate_until([request])

    two_shot = evaluate_tasks(lm, ["m2d_test_mc"], num_fewshot=2, include_path=task_dir, include_defaults=False)
    assert two_shot["tasks"]["m2d_test_mc"]["num_fewshot"] == 2

    # on a mesh (gpu-1x8-h100: the 8 test devices on fsdp, 8 rows per batch): the unsharded result
    assert main(["eval", "tasks", "--model", str(ckpt), "--tasks", "m2d_test_mc", "--include-path", str(task_dir),
                 "--local-tasks-only", "--batch-size", "8", "--mesh", "gpu-1x8-h100",
                 "--output", str(tmp_path / "cli.json")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("m2d_test_mc"))
    assert f"{mc['value']:.4f}" in line


def test_loglikelihood_logs_tokens_per_second_of_the_whole_call(tmp_path, monkeypatch, caplog):
    """The logged rate is real (unpadded) tokens / the call's wall time, measured here with a fake clock."""
    ckpt = checkpoint_with_tokenizer("dense_tied_mha", tmp_path / "model")
    lm = M2DLM(str(ckpt), batch_size=2)
    rng = np.random.default_rng(0)
    # 7 requests of one length bucket: 4 batches of 2, so the batch loop's index runs past 0
    requests = [(None, rng.integers(1, 300, 5 + i).tolist(), rng.integers(1, 300, 3).tolist()) for i in range(7)]
    real_tokens = sum(len(context) + len(continuation) - 1 for _, context, continuation in requests)
    clock = iter([1000.0, 1004.0])  # the call's start and end
    monkeypatch.setattr(lm_eval_backend, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with caplog.at_level(logging.INFO, logger=lm_eval_backend.__name__):
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    (record,) = [r for r in caplog.records if "tokens/s" in r.getMessage()]
    num_sequences, elapsed, tokens_per_second, _ = record.args
    assert (num_sequences, elapsed) == (7, 4.0)
    assert tokens_per_second == pytest.approx(real_tokens / 4.0)


def test_unknown_task_is_a_clear_error(tmp_path, task_dir, capsys):
    with pytest.raises(ValueError, match="unknown lm-eval task 'm2d_test_mcq'; did you mean m2d_test_mc"):
        evaluate_tasks("unused-model-path", ["m2d_test_mcq"], include_path=task_dir, include_defaults=False)
    assert main(["eval", "tasks", "--model", str(tmp_path), "--tasks", "nope", "--include-path", str(task_dir),
                 "--local-tasks-only"]) == 2
    assert "unknown lm-eval task 'nope'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate_tasks("unused", ["m2d_test_mc"], include_path=tmp_path / "missing")


@pytest.mark.slow
def test_unknown_task_with_builtin_index():
    with pytest.raises(ValueError, match="unknown lm-eval task 'hellaswagg'; did you mean .*hellaswag"):
        evaluate_tasks("unused-model-path", ["hellaswagg"])
