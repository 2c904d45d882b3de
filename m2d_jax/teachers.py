"""``m2d train-teacher CONFIG``: train a teacher from scratch on the embedded corpus and write it as an HF directory.

The steps, all with the project's own pieces:
1. a byte-level BPE (``data.text.train_bpe_tokenizer``) on the corpus' train split (or an existing tokenizer);
2. a fresh model from the config's HF config kwargs (``config.model``: a Qwen3-MoE or Qwen3 ``config.json``), read
   by the family adapter and built randomly initialised by ``CausalLM(config, runtime, rngs)``;
3. next-token training with ``distill.train.run`` and ``objective="lm"`` (cross-entropy + the Switch load-balancing
   loss for an MoE) on the train split only;
4. export to HF (``hf.export.export_model``, weights in ``config.export_dtype``) with the tokenizer;
5. held-out perplexity (``eval.ppl.evaluate_perplexity``) of the exported directory and, for an MoE, the per-layer
   expert load (fraction of routed token slots per expert) on held-out windows;
6. ``training.json`` in the output directory: tokens, steps, wall time, final train loss, held-out perplexity,
   parameter counts, expert load.
The shipped teachers (``m2d_jax.data.teachers``) are made by ``configs/teachers/{moe,dense}.py``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from m2d_jax.artifacts import atomic_directory, check_outputs
from m2d_jax.errors import DataError

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


def prepare_tokenizer(config: ConfigDict, directory: Path) -> Path:
    """``directory`` with the run's tokenizer files: a copy of ``config.tokenizer`` (a directory with
    tokenizer.json), or a BPE of ``config.tokenizer_vocab`` tokens trained on the corpus' train split; plus a
    generation_config.json naming the EOS id (so exported and converted models carry it)."""
    from m2d_jax.data import corpus_documents, load_tokenizer, train_bpe_tokenizer
    from m2d_jax.hf.export import TOKENIZER_FILES

    directory.mkdir(parents=True, exist_ok=True)
    if config.tokenizer:
        source = Path(config.tokenizer)
        if not (source / "tokenizer.json").is_file():
            raise DataError(f"config field tokenizer: {source} has no tokenizer.json")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, directory / name)
        tokenizer = load_tokenizer(directory)
    else:
        started = time.perf_counter()
        tokenizer = train_bpe_tokenizer(corpus_documents("train"), config.tokenizer_vocab, directory)
        log.info("BPE tokenizer: %d tokens trained on the train split in %.1fs", tokenizer.vocab_size,
                 time.perf_counter() - started)
    (directory / GENERATION_CONFIG).write_text(json.dumps(
        {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id},
        indent=2) + "\n")
    return directory


def model_config(config: ConfigDict, vocab_size: int):
    """The ``ModelConfig`` of ``config.model`` (HF config.json fields) with the tokenizer's vocabulary size."""
    from m2d_jax.hf.adapters import adapter_for

    hf = {**config.model.to_dict(), "vocab_size": vocab_size}
    return adapter_for(hf.get("model_type"), "config.model").config_from_hf(hf, "config.model")


def lm_training_config(config: ConfigDict, init: Path, train_file: Path, tokenizer_dir: Path, workdir: Path
                       ) -> ConfigDict:
    """The ``distill.train.run`` config of the teacher's training: ``configs/distill/base`` with ``objective="lm"``
    and the sizes of ``config.train``, on one device."""
    from m2d_jax.config_utils import load_config

    t = config.train
    run = load_config("distill/base")
    run.objective, run.student.path = "lm", str(init)
    run.loss.load_balance_weight, run.loss.chunk = float(t.load_balance_weight), t.seq_len
    run.data.files, run.data.tokenizer = (str(train_file),), str(tokenizer_dir)
    run.data.seq_len, run.data.batch_size, run.data.seed = t.seq_len, t.batch_size, config.seed
    run.steps = t.steps
    run.optimizer.learning_rate, run.optimizer.weight_decay = float(t.learning_rate), float(t.weight_decay)
    run.schedule.warmup_steps, run.schedule.decay_steps = t.warmup_steps, t.decay_steps
    run.checkpoint.every, run.logging.every = t.steps, t.log_every
    run.logging.tensorboard = False
    run.workdir, run.mesh.fsdp = str(workdir), 1
    return run


def expert_load(model, windows: np.ndarray, batch_size: int) -> list[list[float]]:
    """Per MoE layer, the fraction of routed token slots (tokens x top-k) each expert receives on ``windows``
    [N, seq] (full rows, no padding): [moe_layers][experts], each row summing to 1."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m2d_jax.distill.loss import router_load_observer

    @nnx.jit
    def fractions(m, ids):  # per stack [layers_in_stack, E], or None for a dense stack
        mask = jnp.ones(ids.shape, jnp.int32)
        _, observations = m.hidden_states(ids, mask, observe=router_load_observer(mask))
        return [None if obs is None else obs[0] for obs in observations]

    totals, batches = None, 0
    for i in range(0, len(windows) - batch_size + 1, batch_size):
        per_stack = jax.device_get(fractions(model, jnp.asarray(windows[i:i + batch_size])))
        layers = np.concatenate([f for f in per_stack if f is not None])  # [moe_layers, E]
        totals = layers if totals is None else totals + layers
        batches += 1
    if not batches:
        raise DataError(f"expert load: {len(windows)} held-out windows, fewer than one batch of {batch_size}")
    return (totals / batches).tolist()


def train_teacher(config: ConfigDict, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Train the teacher ``config`` describes (``configs/teachers/*.py``) and write it to ``out`` (default
    ``config.out``): an HF directory with tokenizer and ``training.json``. Returns the absolute output path."""
    import jax
    from flax import nnx

    from m2d_jax import checkpoint, from_pretrained
    from m2d_jax.artifacts import Provenance
    from m2d_jax.data import corpus_documents, load_tokenizer, pack_documents, tokenize_documents, write_split
    from m2d_jax.data.teachers import TRAINING_RECORD
    from m2d_jax.distill.train import run as train_run
    from m2d_jax.eval.ppl import evaluate_perplexity
    from m2d_jax.hf.export import export_model
    from m2d_jax.info import summarize
    from m2d_jax.models import CausalLM, RuntimeConfig

    out = Path(out or config.out)
    if not str(out) or str(out) == ".":
        raise ValueError("config field out: no output directory given (or --out DIR)")
    check_outputs(out, overwrite=overwrite)  # before any work
    if config.export_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config field export_dtype={config.export_dtype!r}: expected 'float32' or 'bfloat16'")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m2d_teacher_") as tmp:
        work = Path(config.workdir or tmp).absolute()
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = prepare_tokenizer(config, work / "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir)
        train_file = write_split("train", work / "train.jsonl", overwrite=True)
        heldout_file = write_split("heldout", work / "heldout.jsonl", overwrite=True,
                                   max_documents=config.eval.heldout_docs)

        arch = model_config(config, tokenizer.vocab_size)
        summary = summarize(arch)
        log.info("%s: %d parameters, %d active per token", arch.family, summary["total_params"],
                 summary["active_params"])
        init = checkpoint.save_model(CausalLM(arch, RuntimeConfig(), nnx.Rngs(config.seed)), work / "init",
                                     Provenance("random_init", details={"seed": config.seed}).to_dict(),
                                     overwrite=True)

        train_started = time.perf_counter()
        result = train_run(lm_training_config(config, init, train_file, tokenizer_dir, work / "train"),
                           devices=jax.devices()[:1])
        train_seconds = time.perf_counter() - train_started
        if result["student"] is None:
            raise RuntimeError(f"training stopped at step {result['step']} of {config.train.steps} (preempted)")
        trained = checkpoint.load_model(result["student"], dtype=config.export_dtype, progress=False)
        hf_dir = export_model(trained, work / "hf", tokenizer_from=tokenizer_dir, overwrite=True, progress=False)

        e = config.eval
        ppl = evaluate_perplexity(hf_dir, [heldout_file], seq_len=e.seq_len, batch_size=e.batch_size)
        load = None
        if arch.is_moe:
            heldout = corpus_documents("heldout")[:e.heldout_docs or None]
            windows = pack_documents(tokenize_documents(heldout, tokenizer), e.seq_len)
            load = expert_load(from_pretrained(hf_dir, dtype="float32", progress=False), windows, e.batch_size)
        t = config.train
        record = {
            "config": config.to_dict(),
            "family": arch.family,
            "total_params": summary["total_params"],
            "active_params": summary["active_params"],
            "tokenizer_vocab": tokenizer.vocab_size,
            "steps": result["step"],
            "tokens": result["step"] * t.batch_size * t.seq_len,
            "train_seconds": round(train_seconds, 1),
            "tokens_per_s": round(result["step"] * t.batch_size * t.seq_len / train_seconds, 1),
            "final_train_loss": result["metrics"].get("loss"),
            "final_train_ce": result["metrics"].get("ce"),
            "final_load_balance": result["metrics"].get("load_balance"),
            "heldout": {"split": "heldout", "documents": e.heldout_docs or len(corpus_documents("heldout")),
                        **ppl.to_dict()},
            "expert_load": load,
            "expert_load_min_max": None if load is None else [[min(row), max(row)] for row in load],
            "weights_dtype": config.export_dtype,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        if not math.isfinite(ppl.ppl):
            raise RuntimeError(f"held-out perplexity is {ppl.ppl}: training diverged")

        def write(tmp_out: Path):
            for path in hf_dir.iterdir():
                shutil.copy2(path, tmp_out / path.name)
            (tmp_out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")

        final = atomic_directory(out, write, overwrite)
    log.info("teacher %s: held-out ppl %.2f after %d tokens in %.0fs -> %s", arch.family, ppl.ppl, record["tokens"],
             train_seconds, final)
    return final
