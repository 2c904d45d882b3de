"""``m2d demo``: the whole method end to end on an embedded default, in a few minutes on a CPU.

1. build a tiny random Qwen3-MoE teacher with transformers and a BPE tokenizer on the embedded real-text corpus;
2. ``m2d import`` it and check logits against transformers for every MoE dispatch strategy;
3. ``m2d calibrate``: routing statistics and the expert-output Gram matrix in one streaming pass;
4. ``m2d score``: DO-ACP (``gld_reap``) log-det selection per layer;
5. ``m2d convert`` into the dense Qwen3 student, exported to HF and checked against transformers' own forward;
   the random-FFN baseline (teacher attention, fresh FFN) for comparison;
6. ``m2d distill`` (forward KL from the teacher) of both;
7. ``m2d eval ppl`` on held-out documents.
The teacher is random (the project does not train its own MoE teacher yet), so the numbers show the pipeline
working — exact parity, KL falling, finite perplexities — not the paper's quality: a random teacher's experts carry
little, and the random-FFN baseline can be as close to it as the converted student. The checks printed at the end
are what the demo asserts.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

PARITY_TOLERANCE = 1e-4  # max |delta logit| in float32


def _write_corpus(workdir: Path, heldout: int) -> tuple[Path, Path, list[str]]:
    from m2d_jax.data import EMBEDDED_CORPUS, read_documents

    docs = read_documents([EMBEDDED_CORPUS])
    train, test = workdir / "train.jsonl", workdir / "heldout.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:-heldout]))
    test.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[-heldout:]))
    return train, test, docs[:-heldout]


def heldout_kl(teacher, model, windows: np.ndarray) -> float:
    """Mean per-token KL(p_teacher || p_model) on fixed held-out windows [N, seq] (one jitted call per model)."""
    import jax
    from flax import nnx

    from m2d_jax.distill import token_forward_kl

    kl = nnx.jit(lambda t, m, ids: jax.numpy.mean(token_forward_kl(t(ids), m(ids))))
    return float(kl(teacher, model, windows))


def _max_valid_diff(got, want, mask) -> float:
    return float(np.abs(np.asarray(got, np.float32) - want)[mask.astype(bool)].max())


def distill_config(teacher: Path, student: Path, train_file: Path, tokenizer: Path, d: ConfigDict,
                   learning_rate: float, workdir: Path) -> ConfigDict:
    """The ``m2d distill`` config of one demo run: ``configs/distill/base`` with the demo's sizes, on one device."""
    from m2d_jax.config_utils import load_config

    config = load_config("distill/base")
    config.teacher.path, config.teacher.dtype, config.student.path = str(teacher), "float32", str(student)
    config.data.files, config.data.tokenizer = (str(train_file),), str(tokenizer)
    config.data.seq_len, config.data.batch_size, config.steps = d.seq_len, d.batch_size, d.steps
    config.optimizer.learning_rate = float(learning_rate)
    config.schedule.warmup_steps, config.schedule.decay_steps = d.warmup_steps, d.decay_steps
    config.checkpoint.every, config.logging.every = d.steps, max(1, d.steps // 8)
    config.logging.tensorboard, config.logging.progress = False, False
    config.workdir, config.mesh.fsdp = str(workdir), 1
    return config


def run_demo(config: ConfigDict) -> dict:
    import jax

    from m2d_jax import from_pretrained
    from m2d_jax.convert import ConversionRecipe
    from m2d_jax.data import load_tokenizer, pack_documents, read_documents, tokenize_documents, train_bpe_tokenizer
    from m2d_jax.distill import run as distill
    from m2d_jax.eval.ppl import evaluate_perplexity
    from m2d_jax.hf.export import export_checkpoint
    from m2d_jax.hf.oracle import make_hf_checkpoint, padded_batch, reference_logits
    from m2d_jax.info import format_summary, summarize
    from m2d_jax.models import with_runtime
    from m2d_jax.pipeline import (calibrate_files, convert_checkpoint, import_checkpoint, random_ffn_checkpoint,
                                  select_from_files)

    results: dict = {"checks": {}}
    with tempfile.TemporaryDirectory(prefix="m2d_demo_") as tmp:
        work = Path(config.workdir or tmp).absolute()
        work.mkdir(parents=True, exist_ok=True)
        train_file, heldout_file, train_docs = _write_corpus(work, config.heldout_docs)
        teacher_cfg = config.teacher.to_dict()

        print(f"[1/7] tiny random {teacher_cfg['model_type']} teacher (transformers) + BPE tokenizer -> "
              f"{work / 'teacher_hf'}")
        hf_dir = make_hf_checkpoint(teacher_cfg, work / "teacher_hf", seed=config.seed, init_std=config.teacher_init_std)
        train_bpe_tokenizer(train_docs, config.tokenizer_vocab, hf_dir)

        print("[2/7] m2d import + parity against transformers (float32, padded batch)")
        teacher_ckpt = import_checkpoint(hf_dir, work / "teacher", overwrite=True)
        teacher = from_pretrained(teacher_ckpt)
        ids, mask = padded_batch(teacher.config.vocab_size, config.parity.batch_size, config.parity.seq_len,
                                 config.seed)
        want = reference_logits(hf_dir, ids, mask)
        for dispatch in ("dense", "capacity", "blocks", "ragged"):
            diff = _max_valid_diff(with_runtime(teacher, moe_dispatch=dispatch)(ids, mask), want, mask)
            results["checks"][f"teacher_parity_{dispatch}"] = diff <= PARITY_TOLERANCE
            print(f"      dispatch={dispatch:<9} max|dlogit| = {diff:.2e}")
        print(format_summary({"source": "m2d_jax checkpoint", **summarize(teacher.config, teacher.runtime)}))

        print("[3/7] m2d calibrate")
        c = config.calibration
        stats_path = work / "stats"
        calibrate_files(hf_dir, [train_file], stats_path, seq_len=c.seq_len, num_seqs=c.num_seqs,
                        gram_tokens=c.gram_tokens, batch_size=c.batch_size, seed=config.seed, overwrite=True)

        conv = config.conversion
        print(f"[4/7] m2d score --scoring {conv.scoring} --experts {conv.experts}")
        selection_path = work / "selection.json"
        selection = select_from_files(stats_path, conv.scoring, conv.experts, selection_path, model=teacher_ckpt,
                                      overwrite=True)
        for layer, row in zip(selection.moe_layers, selection.selected.tolist()):
            print(f"      layer {layer}: keeps experts {row}")

        print(f"[5/7] m2d convert (K={conv.experts} -> k={conv.groups}, {conv.grouping}, {conv.dp_scaling}) "
              "+ export to HF")
        student_ckpt = convert_checkpoint(hf_dir, stats_path, ConversionRecipe(conv.groups, conv.grouping,
                                                                               conv.dp_scaling),
                                          work / "student", hf_out=work / "student_hf", selection=selection_path,
                                          overwrite=True)
        student = from_pretrained(student_ckpt)
        diff = _max_valid_diff(student(ids, mask), reference_logits(work / "student_hf", ids, mask), mask)
        results["checks"]["student_export_parity"] = diff <= PARITY_TOLERANCE
        print(f"      student: {student.config.family}, FFN width {student.config.ffn.intermediate_size}; transformers "
              f"loads the export, max|dlogit| = {diff:.2e}")
        tokenizer = load_tokenizer(hf_dir)
        heldout = pack_documents(tokenize_documents(read_documents([heldout_file]), tokenizer),
                                 config.eval_seq_len)[:config.heldout_kl_windows]
        kl_converted = heldout_kl(teacher, student, heldout)

        random_ckpt = random_ffn_checkpoint(hf_dir, conv.groups, work / "random_ffn", seed=config.seed,
                                            overwrite=True)
        kl = {"converted": kl_converted, "random-FFN baseline": heldout_kl(teacher, from_pretrained(random_ckpt),
                                                                           heldout)}
        print(f"      held-out KL(teacher || student): converted {kl['converted']:.4f}, random-FFN baseline "
              f"(teacher attention + fresh FFN) {kl['random-FFN baseline']:.4f}")

        d = config.distill
        print(f"[6/7] m2d distill (forward KL, {d.steps} steps) of the converted student and of the baseline")
        distilled = {}
        for name, init, lr in (("converted", student_ckpt, d.learning_rate),
                               ("random-FFN baseline", random_ckpt, d.baseline_learning_rate)):
            run_dir = work / ("distill_" + name.split()[0].lower())
            start = time.perf_counter()
            out = distill(distill_config(teacher_ckpt, init, train_file, hf_dir, d, lr, run_dir),
                          devices=jax.devices()[:1])
            distilled[name] = out["student"]
            after = heldout_kl(teacher, from_pretrained(out["student"]), heldout)
            print(f"      {name:<20} held-out KL {kl[name]:.4f} -> {after:.4f} ({time.perf_counter() - start:.0f}s, "
                  f"lr {lr:g}); saved to {out['student']}")
            kl[name + " distilled"] = after
        results["heldout_kl"] = kl
        results["checks"]["distillation_reduces_kl"] = kl["converted distilled"] < kl["converted"]
        export_checkpoint(distilled["converted"], work / "distilled_hf", overwrite=True, progress=False)

        print(f"[7/7] m2d eval ppl on {config.heldout_docs} held-out documents (seq {config.eval_seq_len})")
        ppl = {}
        for name, path in (("teacher", teacher_ckpt), ("converted student", student_ckpt),
                           ("converted + distilled", distilled["converted"]),
                           ("random-FFN + distilled", distilled["random-FFN baseline"])):
            r = evaluate_perplexity(path, [heldout_file], seq_len=config.eval_seq_len, tokenizer_path=hf_dir)
            ppl[name] = r.ppl
            print(f"      {name:<24} ppl {r.ppl:10.2f}  ({r.tokens} tokens)")
        results["ppl"] = ppl
        results["checks"]["ppl_finite"] = all(np.isfinite(v) for v in ppl.values())
    results["passed"] = all(results["checks"].values())
    for name, ok in results["checks"].items():
        print(f"      check {name:<26} {'ok' if ok else 'FAILED'}")
    return results
