"""``m2d demo``: the method end to end on the project's own teachers, with the paper's comparisons, on a CPU.

1. teachers: the shipped MoE and dense teachers (``m2d_jax.data.teachers``), or tiny random ones built with
   transformers (``teachers="random"``: the pipeline runs, the numbers mean nothing); ``m2d import`` the MoE teacher
   and check its logits against transformers for every MoE dispatch strategy;
2. ``m2d calibrate`` on the corpus' calibration split;
3. ``m2d convert`` with each of the 7 scorings at K = k (pure pruning; the DO-ACP student's HF export checked
   against transformers), the random-FFN baseline and the dense-to-dense (D2D) baseline: the dense teacher pruned to
   the converted students' parameter count;
4. held-out perplexity of all of them before distillation;
5. distillation of the DO-ACP, SF, random-FFN students (from the MoE teacher) and the D2D student (from the dense
   teacher) with one recipe and token budget, held-out perplexity every ``distill.eval_every`` steps;
6. held-out perplexity and accuracy on the local multiple-choice task (``m2d_jax.eval.local_mc``) after it;
7. the distillation step time (tokens/s) with the MoE teacher vs the dense teacher: the same student and batch,
   interleaved, best of ``step_time.rounds``;
8. ``report.md``, ``results.json`` and PNG plots in the output directory, a short table on the terminal.

The held-out split is read only by the evaluations (perplexity, multiple choice). ``checks`` in the result are what
the demo asserts: exact parity, the export, finite numbers, distillation lowering every student's perplexity.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |delta logit| in float32
DISPATCHES = ("dense", "capacity", "blocks", "ragged")
SCORING_LABELS = {"selection_freq": "SF", "preselect_prob": "PP", "postselect_prob": "PS", "conditional_prob": "CP",
                  "reap": "ACP", "gram_logdet": "DO-CP", "gld_reap": "DO-ACP"}  # the paper's names
BASELINE_LABELS = {"random_ffn": "random-FFN", "d2d": "D2D"}
MOE_TEACHER, DENSE_TEACHER = "MoE teacher", "dense teacher"
REPORT, RESULTS = "report.md", "results.json"
PLOT_PRE, PLOT_CURVES = "pre_distillation_ppl.png", "distillation_ppl.png"


@dataclasses.dataclass(frozen=True)
class Teachers:
    moe: Path  # HF directory of the MoE teacher (with the shared tokenizer)
    dense: Path  # HF directory of the dense teacher of about the MoE's total size
    source: str  # "shipped" | "random"


def label(name: str) -> str:
    """The report's name of a student: a scoring's paper name (``SCORING_LABELS``) or a baseline's."""
    return SCORING_LABELS.get(name) or BASELINE_LABELS[name]


def prepare_teachers(config: ConfigDict, scratch: Path) -> Teachers:
    """The shipped teachers, or (``teachers="random"``) tiny random ones with a BPE tokenizer trained on the first
    documents of the corpus' train split."""
    if config.teachers == "shipped":
        from m2d_jax.data.teachers import teacher_dir

        return Teachers(teacher_dir("moe"), teacher_dir("dense"), "shipped")
    if config.teachers != "random":
        raise ValueError(f"config field teachers={config.teachers!r}: expected 'shipped' or 'random'")
    import shutil

    from m2d_jax.data import corpus_documents, train_bpe_tokenizer
    from m2d_jax.hf.oracle import make_hf_checkpoint

    r = config.random_teachers
    dirs = {}
    for offset, name in enumerate(("moe", "dense")):
        dirs[name] = make_hf_checkpoint(r[name].to_dict(), scratch / f"{name}_hf", seed=config.seed + offset,
                                        init_std=r.init_std)
    train_bpe_tokenizer(corpus_documents("train")[:r.tokenizer_docs], r.tokenizer_vocab, dirs["moe"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dirs["moe"] / name, dirs["dense"] / name)
    return Teachers(dirs["moe"], dirs["dense"], "random")


def write_train_sample(out: Path, chars: int, seed: int) -> Path:
    """Documents of the corpus' train split in a seeded order, up to ``chars`` characters (the distillation data:
    enough text for the token budget without tokenising the whole split for every run), as a JSON-lines file."""
    from m2d_jax.artifacts import atomic_write
    from m2d_jax.data import corpus_documents

    docs = corpus_documents("train")
    picked, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        if total >= chars:
            break
        picked.append(docs[i])
        total += len(docs[i])
    return atomic_write(out, lambda tmp: tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in picked)))


def max_logit_diff(model, hf_dir: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    """max |logit - transformers' logit| over the valid positions of a padded batch, float32."""
    from m2d_jax.hf.oracle import reference_logits

    want = reference_logits(hf_dir, ids, mask)
    return float(np.abs(np.asarray(model(ids, mask), np.float32) - want)[mask.astype(bool)].max())


def d2d_student_checkpoint(dense_teacher: Path, calibration_file: Path, params_of: Path, out: Path,
                           d2d: ConfigDict, seed: int) -> Path:
    """The D2D baseline: ``dense_teacher`` pruned (``m2d prune-dense``) to the parameter count of the checkpoint
    ``params_of`` with activation importance on the calibration split."""
    from m2d_jax.pipeline import prune_dense_checkpoint

    saved, _ = prune_dense_checkpoint(dense_teacher, [calibration_file], out, params_of=params_of,
                                      axes=tuple(d2d.axes), seq_len=d2d.seq_len, num_seqs=d2d.num_seqs,
                                      batch_size=d2d.batch_size, seed=seed, overwrite=True, progress=False)
    return saved


def distill_config(teacher: Path, student: Path, train_file: Path, tokenizer: Path, d: ConfigDict,
                   workdir: Path) -> ConfigDict:
    """The ``m2d distill`` config of one demo student: ``configs/distill/base`` with the demo's recipe, one
    device, float32 teacher."""
    from m2d_jax.config_utils import load_config

    config = load_config("distill/base")
    config.teacher.path, config.teacher.dtype, config.student.path = str(teacher), "float32", str(student)
    config.data.files, config.data.tokenizer = (str(train_file),), str(tokenizer)
    config.data.seq_len, config.data.batch_size, config.steps = d.seq_len, d.batch_size, d.steps
    config.optimizer.learning_rate = float(d.learning_rate)
    config.schedule.warmup_steps, config.schedule.decay_steps = d.warmup_steps, d.decay_steps
    config.checkpoint.every, config.logging.tensorboard, config.logging.progress = d.steps, False, False
    config.workdir, config.mesh.fsdp = str(workdir), 1
    return config


def student_model(trainer, params):
    """The CausalLM of a trainer's student with ``params`` (the train state's pure dict)."""
    from flax import nnx

    from m2d_jax.models import abstract_model

    graphdef, state = nnx.split(abstract_model(trainer.student_config))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def distil(trainer, steps: int, tokens_per_step: int, eval_every: int, heldout_ppl, name: str
           ) -> tuple[dict, list, float]:
    """``steps`` optimizer steps of ``trainer`` (``m2d_jax.distill.train.prepare``; its initial state is donated),
    the held-out perplexity every ``eval_every`` steps and at the end. Returns (final train state, [(step, ppl)],
    training tokens/s over the steps after the first, which compiles; evaluation excluded)."""
    import jax
    from tqdm import tqdm

    state, curve, train_seconds = trainer.state, [], 0.0
    for step in tqdm(range(1, steps + 1), desc=f"distill {name}", unit="step"):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, trainer.teacher_params, next(trainer.stream))
        jax.block_until_ready(metrics)
        if step > 1:  # the first step compiles
            train_seconds += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            curve.append((step, heldout_ppl(student_model(trainer, state["params"]))))
    tokens_per_s = tokens_per_step * (steps - 1) / max(train_seconds, 1e-9)
    log.info("distilled %s: %d steps, %.0f tokens/s after the first (compiling) step", name, steps, tokens_per_s)
    return state, curve, tokens_per_s


def step_time(trainers: dict, states: dict, rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` seconds of one distillation step of each trainer (from its train state in ``states``) on
    one shared batch, interleaved (the order alternates every round), after one (compiling) step each."""
    import jax

    names = list(trainers)
    batch = next(trainers[names[0]].stream)
    states = dict(states)
    best = {n: math.inf for n in names}
    for r in range(rounds + 1):
        for n in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            states[n], metrics = trainers[n].train_step(states[n], trainers[n].teacher_params, batch)
            jax.block_until_ready(metrics)
            if r > 0:
                best[n] = min(best[n], time.perf_counter() - start)
    return best


class _Stages:
    """Numbered stage headers on the terminal and each stage's wall time."""

    def __init__(self, total: int):
        self.total, self.index, self.seconds, self._name, self._start = total, 0, {}, None, 0.0

    def start(self, name: str, text: str) -> None:
        self.stop()
        self.index += 1
        self._name, self._start = name, time.perf_counter()
        print(f"[{self.index}/{self.total}] {text}", flush=True)

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = time.perf_counter() - self._start
            self._name = None


def run_demo(config: ConfigDict) -> dict:
    from m2d_jax.artifacts import atomic_directory, check_outputs

    out = Path(config.workdir).absolute() if config.workdir else Path(tempfile.mkdtemp(prefix="m2d_demo_"))
    check_outputs(out, overwrite=config.overwrite or not config.workdir)  # before any work
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="m2d_demo_work_") as scratch:
        results = _run(config, Path(scratch))
    results["total_seconds"] = time.perf_counter() - started
    results["passed"] = all(results["checks"].values())
    atomic_directory(out, lambda tmp: write_report(results, tmp), overwrite=True)
    results["out"] = str(out)
    print(format_summary(results))
    print(f"report: {out / REPORT} (plots {PLOT_PRE}, {PLOT_CURVES}; all numbers in {RESULTS})")
    return results


def _run(config: ConfigDict, work: Path) -> dict:
    import jax

    from m2d_jax import from_pretrained
    from m2d_jax.convert import ConversionRecipe
    from m2d_jax.data import load_tokenizer, read_documents, write_split
    from m2d_jax.distill.train import prepare
    from m2d_jax.eval.local_mc import build_choice_task, evaluate_choice_task
    from m2d_jax.eval.ppl import perplexity
    from m2d_jax.hf.oracle import padded_batch
    from m2d_jax.info import load_config, summarize
    from m2d_jax.models import with_runtime
    from m2d_jax.pipeline import (calibrate_files, convert_checkpoint, import_checkpoint, random_ffn_checkpoint,
                                  select_from_files)
    from m2d_jax.scoring import SCORINGS

    stages, checks = _Stages(8), {}
    e, d, ch = config.eval, config.distill, config.choice

    stages.start("teachers", f"teachers ({config.teachers}) + m2d import + parity against transformers")
    teachers = prepare_teachers(config, work)
    teacher_ckpt = import_checkpoint(teachers.moe, work / "moe", overwrite=True)
    teacher = from_pretrained(teacher_ckpt, progress=False)
    ids, mask = padded_batch(teacher.config.vocab_size, config.parity.batch_size, config.parity.seq_len, config.seed)
    for dispatch in DISPATCHES:
        diff = max_logit_diff(with_runtime(teacher, moe_dispatch=dispatch), teachers.moe, ids, mask)
        checks[f"teacher_parity_{dispatch}"] = diff <= PARITY_TOLERANCE
        print(f"      dispatch={dispatch:<9} max|dlogit| = {diff:.2e}")
    dense_teacher = from_pretrained(teachers.dense, dtype="float32", progress=False)
    summaries = {MOE_TEACHER: summarize(teacher.config), DENSE_TEACHER: summarize(dense_teacher.config)}
    for name, s in summaries.items():
        print(f"      {name}: {s['family']}, {s['layers']} layers, hidden {s['hidden_size']}, "
              f"{s['experts'] or 'no'} experts (top-{s['top_k']}), {s['total_params']:,} params "
              f"({s['active_params']:,} active)")
    tokenizer_dir = teachers.moe
    tokenizer = load_tokenizer(tokenizer_dir)
    splits = {split: write_split(split, work / f"{split}.jsonl") for split in ("calibration", "heldout")}
    splits["train"] = write_train_sample(work / "train_sample.jsonl", d.train_chars, config.seed)
    heldout_docs = read_documents([splits["heldout"]])
    (stream,) = tokenizer.encode_batch(["\n\n".join(heldout_docs)])  # as m2d eval ppl: joined, tokenised once
    heldout = np.asarray(stream[:e.tokens], np.int32)

    def heldout_ppl(model) -> float:
        return perplexity(model, heldout, seq_len=e.seq_len, batch_size=e.batch_size).ppl

    task = build_choice_task(tokenizer.encode_batch(heldout_docs), ch.num_items, ch.context_len,
                             ch.continuation_len, ch.choices, seed=config.seed)

    stages.start("calibrate", f"m2d calibrate on the calibration split ({config.calibration.num_seqs} x "
                              f"{config.calibration.seq_len} tokens)")
    c = config.calibration
    stats_path = work / "stats"
    calibrate_files(teacher_ckpt, [splits["calibration"]], stats_path, seq_len=c.seq_len, num_seqs=c.num_seqs,
                    gram_tokens=c.gram_tokens, batch_size=c.batch_size, seed=config.seed, tokenizer_dir=tokenizer_dir,
                    overwrite=True)

    conv = config.conversion
    k = conv.groups or summaries[MOE_TEACHER]["top_k"]
    recipe = ConversionRecipe(k, conv.grouping, conv.dp_scaling)
    stages.start("convert", f"m2d convert with the 7 scorings at K = k = {k} ({conv.grouping}, {conv.dp_scaling}) "
                            "+ random-FFN + D2D baselines")
    students, selections = {}, {}
    for scoring in SCORINGS:
        selection = select_from_files(stats_path, scoring, k, model=teacher_ckpt)
        selections[scoring] = selection.selected.tolist()
        hf_out = work / f"{scoring}_hf" if scoring == "gld_reap" else None
        students[scoring] = convert_checkpoint(teacher_ckpt, stats_path, recipe, work / scoring, hf_out=hf_out,
                                               selection=selection, overwrite=True, progress=False)
    do_acp = from_pretrained(students["gld_reap"], progress=False)
    diff = max_logit_diff(do_acp, work / "gld_reap_hf", ids, mask)
    checks["student_export_parity"] = diff <= PARITY_TOLERANCE
    print(f"      DO-ACP student: {do_acp.config.family}, FFN width {do_acp.config.ffn.intermediate_size}; "
          f"transformers loads its export, max|dlogit| = {diff:.2e}")
    students["random_ffn"] = random_ffn_checkpoint(teacher_ckpt, k, work / "random_ffn", seed=config.seed,
                                                   overwrite=True, progress=False)
    students["d2d"] = d2d_student_checkpoint(teachers.dense, splits["calibration"], students["gld_reap"],
                                             work / "d2d", config.d2d, config.seed)
    params = {name: summarize(load_config(path)[0])["total_params"] for name, path in students.items()}

    stages.start("ppl", f"held-out perplexity before distillation ({len(heldout)} tokens, seq {e.seq_len})")
    pre = {MOE_TEACHER: heldout_ppl(teacher), DENSE_TEACHER: heldout_ppl(dense_teacher)}
    for name, path in students.items():
        pre[label(name)] = heldout_ppl(from_pretrained(path, progress=False))

    teacher_of = {name: (DENSE_TEACHER if name == "d2d" else MOE_TEACHER) for name in d.students}
    teacher_paths = {MOE_TEACHER: teacher_ckpt, DENSE_TEACHER: teachers.dense}
    stages.start("distill", f"m2d distill {', '.join(label(n) for n in teacher_of)}: {d.steps} steps x "
                            f"{d.batch_size} x {d.seq_len} tokens each, lr {d.learning_rate:g}")
    distilled, distilled_models, trainers, states = {}, {}, {}, {}
    for name in teacher_of:
        trainer = prepare(distill_config(teacher_paths[teacher_of[name]], students[name], splits["train"],
                                         tokenizer_dir, d, work / f"distill_{name}"), devices=jax.devices()[:1])
        state, curve, tokens_per_s = distil(trainer, d.steps, d.batch_size * d.seq_len, d.eval_every, heldout_ppl,
                                            label(name))
        distilled_models[label(name)] = student_model(trainer, state["params"])
        distilled[label(name)] = {"teacher": teacher_of[name], "ppl_before": pre[label(name)],
                                  "curve": [(0, pre[label(name)])] + curve, "ppl_after": curve[-1][1],
                                  "train_tokens_per_s": tokens_per_s}
        print(f"      {label(name):<10} (from the {teacher_of[name]}) held-out ppl {pre[label(name)]:.2f} -> "
              f"{curve[-1][1]:.2f}")
        if name == "gld_reap":  # reused for the step-time comparison (same student and batch)
            trainers[MOE_TEACHER], states[MOE_TEACHER] = trainer, state
    checks["distillation_lowers_ppl"] = all(r["ppl_after"] < r["ppl_before"] for r in distilled.values())

    stages.start("choice", f"held-out multiple choice ({task.num_items} items, {ch.choices} choices, context "
                           f"{ch.context_len} -> continuation {ch.continuation_len} tokens)")
    choice = {MOE_TEACHER: evaluate_choice_task(teacher, task, ch.batch_size)["accuracy"],
              DENSE_TEACHER: evaluate_choice_task(dense_teacher, task, ch.batch_size)["accuracy"]}
    for name, model in distilled_models.items():
        choice[name] = distilled[name]["choice_accuracy"] = evaluate_choice_task(model, task, ch.batch_size)["accuracy"]

    stages.start("step_time", f"distillation step time, MoE vs dense teacher (DO-ACP student, one batch, best of "
                              f"{config.step_time.rounds} interleaved)")
    for name, path in ((MOE_TEACHER, teacher_ckpt), (DENSE_TEACHER, teachers.dense)):
        if name not in trainers:
            trainers[name] = prepare(distill_config(path, students["gld_reap"], splits["train"], tokenizer_dir, d,
                                                    work / f"time_{name.split()[0]}"), devices=jax.devices()[:1])
            states[name] = trainers[name].state
    best = step_time(trainers, states, config.step_time.rounds)
    tokens = d.batch_size * d.seq_len
    timing = {name: {"seconds": s, "tokens_per_s": tokens / s} for name, s in best.items()}
    timing["speedup"] = best[DENSE_TEACHER] / best[MOE_TEACHER]
    stages.start("report", "report")
    stages.stop()

    numbers = [*pre.values(), *choice.values(), timing["speedup"]] + [p for r in distilled.values()
                                                                       for _, p in r["curve"]]
    checks["numbers_finite"] = bool(np.all(np.isfinite(numbers)))
    return {
        "teachers": {"source": teachers.source, "moe_hf": str(teachers.moe), "dense_hf": str(teachers.dense),
                     **{name: {key: s[key] for key in ("family", "layers", "hidden_size", "experts", "top_k",
                                                      "total_params", "active_params")}
                        for name, s in summaries.items()}},
        "checks": checks,
        "conversion": {"K": k, "k": k, "grouping": conv.grouping, "dp_scaling": conv.dp_scaling,
                       "selected_experts": {SCORING_LABELS[s]: rows for s, rows in selections.items()}},
        "params": {label(name): n for name, n in params.items()},
        "heldout": {"tokens": int(len(heldout)), "seq_len": e.seq_len, "documents": len(heldout_docs)},
        "pre_distillation_ppl": pre,
        "distillation": {"recipe": {"steps": d.steps, "batch_size": d.batch_size, "seq_len": d.seq_len,
                                    "tokens": d.steps * d.batch_size * d.seq_len, "learning_rate": d.learning_rate,
                                    "warmup_steps": d.warmup_steps, "decay_steps": d.decay_steps,
                                    "objective": "forward KL"},
                         "students": distilled},
        "choice": {"items": task.num_items, "choices": ch.choices, "context_len": ch.context_len,
                   "continuation_len": ch.continuation_len, "accuracy": choice},
        "step_time": {"batch_tokens": tokens, "rounds": config.step_time.rounds, **timing},
        "seconds": stages.seconds,
    }


# ---- report --------------------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pre_distillation_rows(results: dict) -> list[list]:
    """[model, parameters, held-out ppl] for the teachers, the 7 scorings and the two baselines."""
    t, pre, params = results["teachers"], results["pre_distillation_ppl"], results["params"]
    rows = [[name, f"{t[name]['total_params']:,} ({t[name]['active_params']:,} active)", f"{pre[name]:.2f}"]
            for name in (MOE_TEACHER, DENSE_TEACHER)]
    return rows + [[name, f"{params[name]:,}", f"{pre[name]:.2f}"] for name in pre if name in params]


def post_distillation_rows(results: dict) -> list[list]:
    """[student, teacher, ppl before, ppl after, multiple-choice accuracy]; the teachers' accuracy as reference."""
    acc = results["choice"]["accuracy"]
    rows = [[name, r["teacher"], f"{r['ppl_before']:.2f}", f"{r['ppl_after']:.2f}", f"{r['choice_accuracy']:.3f}"]
            for name, r in results["distillation"]["students"].items()]
    pre = results["pre_distillation_ppl"]
    return rows + [[name, "-", f"{pre[name]:.2f}", "-", f"{acc[name]:.3f}"] for name in (MOE_TEACHER, DENSE_TEACHER)]


def step_time_rows(results: dict) -> list[list]:
    s = results["step_time"]
    return [[name, f"{s[name]['seconds'] * 1e3:.1f}", f"{s[name]['tokens_per_s']:,.0f}"]
            for name in (MOE_TEACHER, DENSE_TEACHER)]


def format_summary(results: dict) -> str:
    """The short terminal table: pre- and post-distillation perplexity, accuracy, step time, checks."""
    lines = ["", f"{'model':<14} {'params':>30} {'ppl (pre)':>10}"]
    lines += [f"{m:<14} {p:>30} {v:>10}" for m, p, v in pre_distillation_rows(results)]
    lines += ["", f"{'distilled':<14} {'teacher':<14} {'ppl before':>10} {'ppl after':>10} {'MC acc':>7}"]
    lines += [f"{m:<14} {t:<14} {b:>10} {a:>10} {c:>7}" for m, t, b, a, c in post_distillation_rows(results)]
    s = results["step_time"]
    lines += ["", f"distillation step: MoE teacher {s[MOE_TEACHER]['tokens_per_s']:,.0f} tokens/s, dense teacher "
                  f"{s[DENSE_TEACHER]['tokens_per_s']:,.0f} tokens/s ({s['speedup']:.2f}x)"]
    lines += [f"check {name:<28} {'ok' if ok else 'FAILED'}" for name, ok in results["checks"].items()]
    lines.append(f"total {results['total_seconds']:.0f}s")
    return "\n".join(lines)


def format_report(results: dict) -> str:
    t, r, c = results["teachers"], results["distillation"]["recipe"], results["conversion"]
    h, ch, s = results["heldout"], results["choice"], results["step_time"]
    source = ("the shipped self-trained teachers (m2d_jax.data.teachers)" if t["source"] == "shipped" else
              "tiny RANDOM teachers (teachers=\"random\"): the pipeline runs, the numbers mean nothing")
    parts = [
        "# m2d demo report", "",
        f"Teachers: {source}. Held-out split: {h['documents']} documents, the first {h['tokens']:,} tokens scored "
        f"in windows of {h['seq_len']}. Total time {results['total_seconds']:.0f}s.", "",
        "## Before distillation: held-out perplexity", "",
        f"Converted students: K = k = {c['k']} experts per layer (pure pruning), {c['grouping']} grouping, "
        f"{c['dp_scaling']} down-projection scaling. D2D: the dense teacher pruned to the converted students' "
        "parameter count.", "",
        _table(["model", "parameters", "held-out ppl"], pre_distillation_rows(results)), "",
        f"![pre-distillation perplexity]({PLOT_PRE})", "",
        "## After distillation", "",
        f"Forward KL, {r['steps']} steps x {r['batch_size']} x {r['seq_len']} = {r['tokens']:,} tokens each, lr "
        f"{r['learning_rate']:g} (warmup {r['warmup_steps']}, decay {r['decay_steps']}); the MoE students learn from "
        "the MoE teacher, D2D from the dense teacher. Multiple choice: the true continuation of a held-out context "
        f"among {ch['choices']} ({ch['items']} items, {ch['context_len']} -> {ch['continuation_len']} tokens; "
        f"chance {1 / ch['choices']:.2f}).", "",
        _table(["model", "teacher", "ppl before", "ppl after", "choice accuracy"], post_distillation_rows(results)),
        "", f"![held-out perplexity during distillation]({PLOT_CURVES})", "",
        "## Distillation step time", "",
        f"The DO-ACP student on one batch of {s['batch_tokens']:,} tokens, best of {s['rounds']} interleaved steps:",
        "", _table(["teacher", "ms / step", "tokens/s"], step_time_rows(results)), "",
        f"The MoE teacher's step is {s['speedup']:.2f}x as fast as the dense teacher's.", "",
        "## Checks", "",
        _table(["check", "result"], [[n, "ok" if ok else "FAILED"] for n, ok in results["checks"].items()]), "",
        "Stage times (s): " + ", ".join(f"{n} {v:.0f}" for n, v in results["seconds"].items()), "",
    ]
    return "\n".join(parts)


def plot_pre_distillation(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = results["pre_distillation_ppl"]
    names = [n for n in pre if n not in (MOE_TEACHER, DENSE_TEACHER)]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:blue" if n in SCORING_LABELS.values() else "tab:gray" for n in names]
    ax.bar(names, [pre[n] for n in names], color=colors)
    for name, style in ((MOE_TEACHER, "--"), (DENSE_TEACHER, ":")):
        ax.axhline(pre[name], color="black", linestyle=style, label=f"{name} ({pre[name]:.1f})")
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("Before distillation: converted students (K = k) and baselines")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results["distillation"]["students"].items():
        steps, ppl = zip(*r["curve"])
        ax.plot(steps, ppl, marker="o", label=f"{name} (from the {r['teacher']})")
    for name, style in ((MOE_TEACHER, "--"), (DENSE_TEACHER, ":")):
        ax.axhline(results["pre_distillation_ppl"][name], color="black", linestyle=style, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict, directory: Path) -> None:
    """report.md, results.json and the two plots into ``directory``."""
    (directory / REPORT).write_text(format_report(results))
    (directory / RESULTS).write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot_pre_distillation(results, directory / PLOT_PRE)
    plot_curves(results, directory / PLOT_CURVES)
