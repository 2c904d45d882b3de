"""The stages of a run on a mesh of 4 devices: calibration, the conversion of the teacher from those statistics
(``m2d convert``), 3 distillation steps, perplexity of the trained student, its HF export, a local lm-eval task and
greedy generation. ``run_stages`` runs them in this process (tests/test_multihost.py's single-process reference);
as a script it is one process of a 2-process run (2 fake CPU devices each, launched through the JAX_* variables
that ``m2d_jax.distributed.initialize_distributed`` reads):

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT JOB.json

JOB.json: {"models": {...}, "out": DIR}; each process writes its result dict to JOB.json.result-PROCESS_ID.json.
"""

import json
import os
import sys
from pathlib import Path

MESH = {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}  # parameters and batches over the devices of both processes


def run_stages(models: dict, out: Path, devices=None) -> dict:
    import jax

    from distill_helpers import tiny_config
    from m2d_jax.cli import main
    from m2d_jax.distill import train
    from m2d_jax.distill.sharding import make_mesh
    from m2d_jax.eval.generate import generate_tokens
    from m2d_jax.eval.lm_eval_backend import M2DLM
    from m2d_jax.eval.ppl import evaluate_perplexity
    from m2d_jax.eval.tasks import evaluate_tasks
    from m2d_jax.hf.export import export_checkpoint
    from m2d_jax.pipeline import calibrate_files

    mesh = make_mesh(MESH, devices)
    stats = calibrate_files(models["teacher"], [models["data"]], out / "stats.npz", seq_len=32, num_seqs=12,
                            gram_tokens=200, batch_size=4, gram_chunk=32, show_progress=False, mesh=mesh)
    # the command line, as a pod runs it on every worker (multi-process default mesh: every device on fsdp = MESH)
    assert main(["convert", "--model", str(models["teacher"]), "--stats", str(out / "stats.npz"), "--experts", "2",
                 "--groups", "1", "--out", str(out / "converted"), "--hf-out", str(out / "converted_hf")]) == 0
    config = tiny_config(models, out / "distill", steps=3, **{f"mesh.{k}": v for k, v in MESH.items()},
                         **{"schedule.warmup_steps": 1, "schedule.decay_steps": 1})
    distilled = train.run(config, devices)
    ppl = evaluate_perplexity(distilled["student"], [models["eval"]], seq_len=32, batch_size=4,
                              tokenizer_path=models["tokenizer"], mesh=mesh)
    export_checkpoint(distilled["student"], out / "hf", tokenizer_from=models["tokenizer"], progress=False,
                      mesh=mesh)
    lm = M2DLM(distilled["student"], batch_size=4, tokenizer=str(models["tokenizer"]), mesh=mesh)
    tasks = evaluate_tasks(lm, ["m2d_test_mc"], include_path=models["tasks"],
                           include_defaults=False, output=out / "tasks.json")
    prompts = [lm.tok_encode(text) for text in ("The", "In the year", "A small", "It was")]
    generated = generate_tokens(lm.model, prompts, 6, mesh=lm.mesh)  # greedy
    # the backend's scoring forward on the decoded continuations: (log-likelihood, is greedy)
    scored = lm._loglikelihood_tokens([(None, p, g) for p, g in zip(prompts, generated)], disable_tqdm=True)
    return {"stats_digest": stats.digest(), "tokens": stats.metadata["tokens_seen"], "loss": distilled["metrics"],
            "ppl": ppl.to_dict(), "student": distilled["student"], "tasks": tasks["results"]["m2d_test_mc"],
            "generated": generated, "scored": scored, "process_index": jax.process_index(),
            "process_count": jax.process_count(), "devices": jax.device_count()}


def main():
    process_id, num_processes, port, job_file = sys.argv[1:]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=num_processes,
                      JAX_PROCESS_ID=process_id)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from m2d_jax.distributed import initialize_distributed

    assert initialize_distributed(initialization_timeout=120)
    import jax

    job = json.loads(Path(job_file).read_text())
    result = run_stages({k: Path(v) for k, v in job["models"].items()}, Path(job["out"]))
    Path(f"{job_file}.result-{process_id}.json").write_text(json.dumps(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
