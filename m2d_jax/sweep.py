"""``m2d sweep``: the design grid of docs/METHOD.md, scorings x groupings x DP scalings x K, on one teacher.

1. statistics collected once (``pipeline.calibrate_files``, saved in the workdir; or given statistics files);
2. per scoring and K one ``select_experts``, reused by every grouping and DP scaling;
3. per configuration: the conversion plans (``convert.conversion_plans``), the student in memory
   (``convert.build_dense_student``) and its held-out perplexity (``eval.ppl.perplexity``); one row per
   configuration appended to ``results.csv`` (written, flushed and fsynced row by row). A configuration whose plans
   equal an earlier one's (K = k: every grouping gives singletons) is the same student: its row copies that row's
   numbers and names it in ``same_as``. K > E or K < top-k rows are recorded as ``invalid`` with the reason;
4. plots of the grid (``ppl_vs_K.png``, ``heatmap.png``);
5. the best configuration of every scoring x grouping pair distilled (``distill.run`` with ``config.distill``), and
   the overall best once more with the expanded teacher (top-k' = 2k); one row each in ``distilled.csv``.

Running the same command again resumes: finished rows and distillations are read back and skipped (an interrupted
distillation resumes from its own checkpoints), and the final files equal an uninterrupted run's row for row except
the ``seconds`` column (``TIMING_COLUMNS``). ``sweep.json`` records the settings the rows depend on; a workdir of
other settings is refused.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from ml_collections import ConfigDict

from m2d_jax.artifacts import atomic_write, is_primary_process, write_json
from m2d_jax.data.text import check_data_files
from m2d_jax.errors import OutputError

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("scoring", "grouping", "dp_scaling", "K", "k", "status", "student_params", "ppl", "nll", "tokens",
                  "plan_sha256", "same_as", "note", "seconds")
DISTILL_COLUMNS = ("name", "scoring", "grouping", "dp_scaling", "K", "k", "teacher_top_k", "steps", "train_tokens",
                   "ppl_before", "ppl", "nll", "train_loss", "plan_sha256", "same_as", "seconds")
TIMING_COLUMNS = ("seconds",)  # wall-clock: excluded when rows of two runs are compared
STATUSES = ("ok", "same", "invalid")  # computed / the same student as the row in same_as / not a valid configuration


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One configuration of the grid: scoring, grouping, DP scaling, K kept experts into k groups."""
    scoring: str
    grouping: str
    dp_scaling: str
    num_selected: int  # K
    groups: int  # k

    @property
    def key(self) -> tuple[str, str, str, str]:  # the row key of results.csv (its first four columns, as text)
        return self.scoring, self.grouping, self.dp_scaling, str(self.num_selected)


def row_name(row: dict) -> str:
    """``scoring/grouping/dp_scaling/K=...`` of a results row (what ``same_as`` refers to)."""
    return f"{row['scoring']}/{row['grouping']}/{row['dp_scaling']}/K={row['K']}"


def grid_points(grid: ConfigDict, top_k: int, num_experts: int) -> list[tuple[GridPoint, str | None]]:
    """Every configuration of ``grid`` in sweep order (scoring, K, grouping, DP scaling), each with the reason it is
    invalid for a teacher of ``num_experts`` experts and ``top_k`` (None when valid)."""
    from m2d_jax.convert import DP_SCALINGS, GROUPINGS
    from m2d_jax.scoring import SCORINGS

    for field, allowed in (("scorings", SCORINGS), ("groupings", GROUPINGS), ("dp_scalings", DP_SCALINGS)):
        values = tuple(grid[field])
        unknown = [v for v in values if v not in allowed]
        if not values or unknown or len(set(values)) != len(values):
            raise ValueError(f"config field grid.{field}: {values!r}: expected distinct entries of {allowed}")
    multiples = tuple(grid.k_multiples)
    if not multiples or len(set(multiples)) != len(multiples) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in multiples):
        raise ValueError(f"config field grid.k_multiples: {multiples!r}: expected distinct integers >= 1")
    if isinstance(grid.groups, bool) or not isinstance(grid.groups, int) or grid.groups < 0:
        raise ValueError(f"config field grid.groups: {grid.groups!r}: expected an integer k >= 1 (0 = top-k)")
    k = grid.groups or top_k
    points = []
    for scoring in grid.scorings:
        for num_selected in sorted(m * k for m in multiples):
            reason = None
            if num_selected > num_experts:
                reason = f"K={num_selected} > E={num_experts} experts"
            elif num_selected < top_k:
                reason = f"K={num_selected} < top-k={top_k} (selection needs top-k <= K)"
            for grouping in grid.groupings:
                for dp_scaling in grid.dp_scalings:
                    points.append((GridPoint(scoring, grouping, dp_scaling, num_selected, k), reason))
    return points


# ---- row files ----------------------------------------------------------------------------------------------------
def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value).replace("\n", " ")


class RowFile:
    """A CSV file of finished rows keyed by their first columns, appended one durable row at a time.

    Opening reads the rows already there (a torn last line, from a kill in the middle of a write, is dropped and the
    file rewritten atomically without it); ``append`` writes one line, flushes and fsyncs. In a multi-process run
    process 0 writes; every process keeps the rows.
    """

    def __init__(self, path: Path, columns: Sequence[str], key_columns: Sequence[str]):
        self.path, self.columns, self.key_columns = Path(path), tuple(columns), tuple(key_columns)
        self.rows: dict[tuple, dict[str, str]] = {}
        if not self.path.exists():
            if is_primary_process():
                atomic_write(self.path, lambda tmp: tmp.write_text(self._line(self.columns)))
            return
        text = self.path.read_text()
        complete = text[:text.rfind("\n") + 1]
        records = list(csv.reader(io.StringIO(complete)))
        if not records or tuple(records[0]) != self.columns:
            raise OutputError(f"{self.path}: not a sweep file of columns {','.join(self.columns)} (header "
                              f"{records[0] if records else 'missing'}); use another workdir")
        for number, record in enumerate(records[1:], start=2):
            if len(record) != len(self.columns):
                raise OutputError(f"{self.path}: line {number} has {len(record)} fields, expected "
                                  f"{len(self.columns)}")
            row = dict(zip(self.columns, record))
            self.rows[self.key_of(row)] = row
        if complete != text and is_primary_process():
            log.warning("%s: dropped a torn last line (the previous run was killed while writing it)", self.path)
            atomic_write(self.path, lambda tmp: tmp.write_text(complete), overwrite=True)

    @staticmethod
    def _line(values) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_format(v) for v in values])
        return buffer.getvalue()

    def key_of(self, row: dict) -> tuple:
        return tuple(str(row[c]) for c in self.key_columns)

    def __contains__(self, key: tuple) -> bool:
        return tuple(map(str, key)) in self.rows

    def append(self, row: dict) -> dict[str, str]:
        line = self._line(row.get(c) for c in self.columns)  # a missing column is empty
        if is_primary_process():
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        stored = dict(zip(self.columns, next(csv.reader(io.StringIO(line)))))
        self.rows[self.key_of(stored)] = stored
        return stored


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a sweep CSV file (``results.csv`` or ``distilled.csv``) as dicts of strings, in file order."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compared(row: dict) -> dict:
    """A row without its wall-clock columns: what two runs of the same sweep must agree on."""
    return {c: v for c, v in row.items() if c not in TIMING_COLUMNS}


# ---- the sweep ----------------------------------------------------------------------------------------------------
def _settings(config: ConfigDict) -> tuple[dict, dict]:
    """What the rows depend on (recorded in ``sweep.json``): for results.csv the teacher, data, evaluation and k; for
    distilled.csv the distillation recipe. The grid itself may grow between runs; paths, mesh, logging and
    checkpointing may change."""
    distill = config.distill.to_dict()
    for field in ("workdir", "student_out", "stop_at_step", "mesh", "logging", "checkpoint"):
        distill.pop(field, None)
    distill["teacher"].pop("path", None)
    distill["student"].pop("path", None)
    calibration = config.calibration.to_dict()
    calibration["files"] = check_data_files(calibration["files"], "config field calibration.files") \
        if not calibration["stats"] else []
    calibration["stats"] = [str(Path(p).absolute()) for p in calibration["stats"]]
    evaluation = {**config.eval.to_dict(), "files": check_data_files(config.eval.files, "config field eval.files")}
    grid = {"teacher": str(Path(config.teacher).absolute()), "tokenizer": config.tokenizer, "dtype": config.dtype,
            "calibration": calibration, "eval": evaluation, "groups": config.grid.groups}
    distilled = {"expanded_top_k": config.expanded_top_k, "distill": distill}
    return tuple(json.loads(json.dumps(part)) for part in (grid, distilled))  # tuples -> lists, as read back


def _check_settings(path: Path, part: str, settings: dict) -> None:
    """Record ``settings`` as ``part`` of ``path`` the first time; afterwards refuse other settings."""
    recorded = json.loads(path.read_text()) if path.exists() else {}
    if part not in recorded:
        if is_primary_process():
            write_json({**recorded, part: settings}, path, overwrite=True)
        return
    recorded = recorded[part]
    for field in sorted(set(recorded) | set(settings)):
        if recorded.get(field) != settings.get(field):
            raise OutputError(f"{path}: this workdir holds a sweep with other settings (field {field!r}: "
                              f"{json.dumps(recorded.get(field))[:120]} there, {json.dumps(settings.get(field))[:120]} "
                              "here); use another workdir")


def _statistics(config: ConfigDict, work: Path):
    """The calibration statistics (collected once into WORKDIR/stats.npz, or the given files) and their paths."""
    from m2d_jax.pipeline import calibrate_files, load_statistics

    c = config.calibration
    if c.stats:
        paths = [Path(p).absolute() for p in c.stats]
    else:
        paths = [work / "stats.npz"]
        if not paths[0].exists():
            print(f"calibrating {config.teacher} on {len(c.files)} file(s) -> {paths[0]}")
            calibrate_files(config.teacher, c.files, paths[0], seq_len=c.seq_len,
                            num_seqs=c.num_seqs, gram_tokens=c.gram_tokens, batch_size=c.batch_size, seed=c.seed,
                            tokenizer_dir=config.tokenizer or None, text_field=c.text_field, dtype=config.dtype,
                            show_progress=config.progress)
    return load_statistics(paths), paths  # read back from the file in every run: a resumed run sees the same sums


def _eval_tokens(config: ConfigDict, vocab_size: int) -> np.ndarray:
    from m2d_jax.data import DataError, load_tokenizer, read_documents
    from m2d_jax.eval.ppl import protocol_tokens

    e = config.eval
    tokenizer = load_tokenizer(config.tokenizer or config.teacher)
    tokens = protocol_tokens(read_documents(e.files, e.text_field), tokenizer)
    if e.max_tokens > 0:
        tokens = tokens[:e.max_tokens]
    if tokens.max() >= vocab_size:
        raise DataError(f"tokenizer of {tokenizer.directory} produced id {int(tokens.max())} >= the teacher's "
                        f"vocab_size {vocab_size}")
    return tokens


def _on_mesh(model, mesh):
    """``model`` with its parameters placed on ``mesh`` by the logical-axis rules (as ``load_for_mesh`` places a
    loaded model)."""
    import jax
    from flax import nnx

    from m2d_jax.distill.sharding import param_shardings

    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.device_put(state.to_pure_dict(), param_shardings(model, mesh)))
    nnx.update(model, state)
    return model


def plan_digest(plans) -> str:
    """Fingerprint of conversion plans (groups, merge weights, DP scales of every layer): equal plans, equal
    student."""
    h = hashlib.sha256()
    for layer in sorted(plans):
        plan = plans[layer]
        h.update(json.dumps([layer, [list(g) for g in plan.groups]]).encode())
        h.update(np.ascontiguousarray(plan.alpha, np.float64).tobytes())
        h.update(np.ascontiguousarray(plan.scales, np.float64).tobytes())
    return h.hexdigest()[:16]


def _perplexity(model, tokens: np.ndarray, config: ConfigDict):
    from m2d_jax.eval.ppl import perplexity

    e = config.eval
    return perplexity(model, tokens, seq_len=e.seq_len, stride=e.stride or None, batch_size=e.batch_size,
                      progress=False)


def run_sweep(config: ConfigDict) -> dict:
    """Run (or resume) the sweep ``config`` describes (``configs/sweep.py``) in ``config.workdir``.

    Returns {"workdir", "teacher_ppl", "rows" (results.csv rows of this grid, in grid order), "distilled"
    (distilled.csv rows), "computed" (rows computed by this call), "rows_per_s", "plots"}.
    """
    import jax
    from tqdm.auto import tqdm

    from m2d_jax.convert import ConversionRecipe, build_dense_student, conversion_plans
    from m2d_jax.distill.sharding import make_mesh
    from m2d_jax.distill.train import check_config, load_for_mesh
    from m2d_jax.info import load_config, summarize
    from m2d_jax.scoring import select_experts

    if not config.teacher:
        raise ValueError("config field teacher: the MoE teacher's directory is required (--config.teacher=DIR)")
    if config.num_devices < 0:
        raise ValueError(f"config field num_devices: {config.num_devices}: expected >= 0 (0 = all devices)")
    if not load_config(config.teacher)[0].is_moe:  # the inputs are checked before any work: a readable MoE teacher,
        raise ValueError(f"config field teacher: {config.teacher} is a dense model (the sweep converts an MoE)")
    if not config.calibration.stats:  # existing data files,
        check_data_files(config.calibration.files, "config field calibration.files")
    check_data_files(config.eval.files, "config field eval.files")
    if config.distill_best:  # and the distillation recipe
        check_config(distill_run_config(config, Path(config.teacher), Path(config.workdir), 0))
    work = Path(config.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    grid_settings, distill_settings = _settings(config)
    devices = jax.devices()[:config.num_devices or None]
    mesh = make_mesh(dict(config.distill.mesh), devices)
    _check_settings(work / "sweep.json", "results", grid_settings)
    if config.distill_best:
        _check_settings(work / "sweep.json", "distilled", distill_settings)

    stats, stats_paths = _statistics(config, work)
    teacher, _ = load_for_mesh(config.teacher, mesh, config.dtype)
    stats.check_model(teacher.config)
    top_k, num_experts = stats.top_k, min(stats.experts_per_layer)  # E of the smallest MoE layer
    tokens = _eval_tokens(config, teacher.config.vocab_size)
    teacher_file = work / "teacher_ppl.json"
    if not teacher_file.exists():
        write_json(_perplexity(teacher, tokens, config).to_dict(), teacher_file)
    teacher_ppl = json.loads(teacher_file.read_text())["ppl"]

    points = grid_points(config.grid, top_k, num_experts)
    table = RowFile(work / "results.csv", RESULT_COLUMNS, RESULT_COLUMNS[:4])
    by_plan = {row["plan_sha256"]: row for row in table.rows.values() if row["status"] == "ok"}
    todo = [(p, reason) for p, reason in points if p.key not in table]
    print(f"sweep: {len(points)} configurations ({len(points) - len(todo)} finished in {table.path}), teacher "
          f"held-out ppl {teacher_ppl:.3f} on {len(tokens)} tokens")
    selections = {}  # (scoring, K) -> Selection: the current one only
    started, converted = time.perf_counter(), 0
    for point, reason in tqdm(todo, desc="sweep", unit="config", disable=not config.progress):
        row_start = time.perf_counter()
        row = {"scoring": point.scoring, "grouping": point.grouping, "dp_scaling": point.dp_scaling,
               "K": point.num_selected, "k": point.groups, "status": "invalid", "note": reason}
        if reason is None:
            selection_key = (point.scoring, point.num_selected)
            if selection_key not in selections:  # once per scoring and K; the grid order makes it consecutive
                selections = {selection_key: select_experts(stats, point.scoring, point.num_selected)}
            recipe = ConversionRecipe(point.groups, point.grouping, point.dp_scaling)
            plans = conversion_plans(teacher, stats, selections[selection_key], recipe)
            digest = plan_digest(plans)
            row["plan_sha256"] = digest
            if digest in by_plan:
                same = by_plan[digest]
                row.update(status="same", same_as=row_name(same), note="identical conversion plans (same student)",
                           **{c: same[c] for c in ("student_params", "ppl", "nll", "tokens")})
            else:
                student = _on_mesh(build_dense_student(teacher, plans, point.groups, progress=False), mesh)
                result = _perplexity(student, tokens, config)
                row.update(status="ok", student_params=summarize(student.config)["total_params"], ppl=result.ppl,
                           nll=result.nll, tokens=result.tokens)
                del student
                converted += 1
        row["seconds"] = round(time.perf_counter() - row_start, 3)
        stored = table.append(row)
        if stored["status"] == "ok":
            by_plan[stored["plan_sha256"]] = stored
    elapsed = time.perf_counter() - started
    rows_per_s = len(todo) / elapsed if todo else None
    if todo:
        log.info("sweep: %d rows (%d converted) in %.1fs, %.2f rows/s", len(todo), converted, elapsed, rows_per_s)
    rows = [table.rows[p.key] for p, _ in points]
    plots = write_plots(rows, teacher_ppl, work)
    del teacher

    distilled = []
    if config.distill_best:
        distilled = distill_best(config, rows, stats_paths, tokens, mesh, devices, top_k, num_experts, work)
    return {"workdir": str(work), "teacher_ppl": teacher_ppl, "rows": rows, "distilled": distilled,
            "computed": len(todo), "rows_per_s": rows_per_s, "plots": [str(p) for p in plots]}


# ---- best configurations and their distillation ----------------------------------------------------------------
def best_rows(rows: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """The lowest-perplexity row of every (scoring, grouping) pair, over DP scalings and K (ties: the earlier row
    in grid order); invalid rows never win."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["status"] == "invalid":
            continue
        pair = (row["scoring"], row["grouping"])
        if pair not in best or float(row["ppl"]) < float(best[pair]["ppl"]):
            best[pair] = row
    return best


def distill_run_config(config: ConfigDict, student: Path, workdir: Path, teacher_top_k: int) -> ConfigDict:
    """The ``m2d distill`` config of one distillation: ``config.distill`` with the sweep's teacher, ``student``, its
    own ``workdir`` (checkpoints, metrics, the trained student) and the teacher's top-k (0 = as trained)."""
    run = copy.deepcopy(config.distill)
    run.teacher.path, run.student.path = str(Path(config.teacher).absolute()), str(student)
    run.teacher.top_k = teacher_top_k
    run.data.tokenizer = run.data.tokenizer or str(Path(config.tokenizer or config.teacher).absolute())
    run.workdir, run.student_out = str(workdir), ""
    run.logging.progress = run.logging.progress and config.progress
    return run


def distill_best(config: ConfigDict, rows: Sequence[dict], stats_paths, tokens: np.ndarray, mesh, devices,
                 top_k: int, num_experts: int, work: Path) -> list[dict[str, str]]:
    """Distil the best configuration of every scoring x grouping pair, and the overall best with the expanded
    teacher (top-k' = ``config.expanded_top_k`` or 2k, at most E); rows of ``distilled.csv`` in that order."""
    from tqdm.auto import tqdm

    from m2d_jax.convert import ConversionRecipe
    from m2d_jax.distill import run as distill
    from m2d_jax.distill.train import load_for_mesh
    from m2d_jax.pipeline import convert_checkpoint

    best = best_rows(rows)
    if not best:
        return []
    runs = [(f"{s}__{g}", row, 0) for (s, g), row in best.items()]
    overall = min(best.values(), key=lambda r: float(r["ppl"]))  # min keeps the first of equal values
    expanded_k = config.expanded_top_k or min(2 * top_k, num_experts)
    if not top_k < expanded_k <= num_experts:
        raise ValueError(f"config field expanded_top_k: k'={expanded_k} must be in ({top_k}, E={num_experts}]")
    runs.append((f"expanded__{overall['scoring']}__{overall['grouping']}", overall, expanded_k))
    table = RowFile(work / "distilled.csv", DISTILL_COLUMNS, DISTILL_COLUMNS[:1])
    # distillations of the same student with the same teacher are one: (plan, teacher top-k) -> its row
    done = {(r["plan_sha256"], r["teacher_top_k"]): r for r in table.rows.values() if not r["same_as"]}
    tokens_per_step = config.distill.data.batch_size * config.distill.data.seq_len
    for name, row, teacher_k in tqdm(runs, desc="distill best", unit="run", disable=not config.progress):
        if (name,) in table:
            continue
        start = time.perf_counter()
        teacher_top_k = teacher_k or top_k
        record = {"name": name, **{c: row[c] for c in ("scoring", "grouping", "dp_scaling", "K", "k")},
                  "teacher_top_k": teacher_top_k, "steps": config.distill.steps,
                  "train_tokens": config.distill.steps * tokens_per_step, "ppl_before": row["ppl"],
                  "plan_sha256": row["plan_sha256"]}
        same = done.get((row["plan_sha256"], str(teacher_top_k)))
        if same is not None:
            record.update(same_as=same["name"], **{c: same[c] for c in ("ppl", "nll", "train_loss")})
        else:
            student_dir = work / "students" / f"{row['scoring']}__{row['grouping']}__{row['dp_scaling']}__K{row['K']}"
            if not student_dir.exists():
                convert_checkpoint(config.teacher, stats_paths, ConversionRecipe(int(row["k"]), row["grouping"],
                                                                                 row["dp_scaling"]),
                                   student_dir, scoring=row["scoring"], num_selected=int(row["K"]),
                                   dtype=config.dtype, progress=False)
            out = distill(distill_run_config(config, student_dir, work / "distill" / name, teacher_k),
                          devices=devices)
            if out["student"] is None:  # preempted (SIGTERM): checkpointed, the next run resumes it
                print(f"distillation {name} stopped at step {out['step']}; run the command again to resume")
                break
            student, _ = load_for_mesh(out["student"], mesh, "float32")
            result = _perplexity(student, tokens, config)
            record.update(ppl=result.ppl, nll=result.nll, train_loss=out["metrics"].get("loss"))
        record["seconds"] = round(time.perf_counter() - start, 3)
        stored = table.append(record)
        if not stored["same_as"]:
            done[(row["plan_sha256"], stored["teacher_top_k"])] = stored
    return [table.rows[(name,)] for name, _, _ in runs if (name,) in table]


# ---- plots and the terminal summary -------------------------------------------------------------------------------
def write_plots(rows: Sequence[dict], teacher_ppl: float, out_dir: Path) -> list[Path]:
    """``ppl_vs_K.png`` (per scoring, the best perplexity over groupings and DP scalings at each K) and
    ``heatmap.png`` (scoring x grouping, the best perplexity over DP scalings and K), written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    valid = [r for r in rows if r["status"] != "invalid"]
    if not valid:
        return []
    scorings = list(dict.fromkeys(r["scoring"] for r in valid))
    groupings = list(dict.fromkeys(r["grouping"] for r in valid))

    def best(select) -> float:
        values = [float(r["ppl"]) for r in valid if select(r)]
        return min(values) if values else math.nan

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for scoring in scorings:
        ks = sorted({int(r["K"]) for r in valid if r["scoring"] == scoring})
        ax.plot(ks, [best(lambda r: r["scoring"] == scoring and int(r["K"]) == k) for k in ks], marker="o",
                label=scoring)
    ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_ks = sorted({int(r["K"]) for r in valid})
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("K (experts kept per layer)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("before distillation; best over groupings and DP scalings", fontsize="medium")
    ax.legend(fontsize="small")
    paths = [_save_figure(fig, out_dir / "ppl_vs_K.png")]

    grid = np.array([[best(lambda r: r["scoring"] == s and r["grouping"] == g) for g in groupings] for s in scorings])
    fig = Figure(figsize=(1.6 * len(groupings) + 3, 0.5 * len(scorings) + 2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.log(grid), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(groupings)), groupings, rotation=30, ha="right")
    ax.set_yticks(range(len(scorings)), scorings)
    shade = image.norm(np.log(grid))  # 0 = lowest perplexity (light in viridis_r), 1 = highest (dark)
    for i in range(len(scorings)):
        for j in range(len(groupings)):
            ax.text(j, i, f"{grid[i, j]:.4g}", ha="center", va="center", fontsize="small",
                    color="white" if shade[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="log perplexity")
    ax.set_title("held-out perplexity before distillation; best over DP scalings and K", fontsize="medium")
    paths.append(_save_figure(fig, out_dir / "heatmap.png"))
    return paths


def _save_figure(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), overwrite=True)


def format_summary(result: dict) -> str:
    """The terminal summary: row counts and throughput, the best configuration per scoring, the distillations."""
    rows = result["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = [f"{len(rows)} configurations: {counts['ok']} converted, {counts['same']} identical to an earlier one, "
             f"{counts['invalid']} invalid" + (f"; {result['rows_per_s']:.2f} rows/s this run"
                                               if result["rows_per_s"] else ""),
             f"teacher held-out ppl {result['teacher_ppl']:.4g}", "",
             f"{'scoring':<18} {'best ppl':>10}  configuration"]
    for scoring in dict.fromkeys(r["scoring"] for r in rows):
        valid = [r for r in rows if r["scoring"] == scoring and r["status"] != "invalid"]
        if valid:
            r = min(valid, key=lambda r: float(r["ppl"]))
            lines.append(f"{scoring:<18} {float(r['ppl']):>10.4g}  {r['grouping']}, {r['dp_scaling']}, K={r['K']}")
    if result["distilled"]:
        lines += ["", f"{'distilled':<54} {'k_T':>4} {'ppl before':>11} {'ppl after':>10}"]
        for r in result["distilled"]:
            config = f"{r['scoring']}, {r['grouping']}, {r['dp_scaling']}, K={r['K']}"
            lines.append(f"{config:<54} {r['teacher_top_k']:>4} {float(r['ppl_before']):>11.4g} "
                         f"{float(r['ppl']):>10.4g}")
    written = ["results.csv"] + ["distilled.csv"] * bool(result["distilled"]) + [Path(p).name for p in result["plots"]]
    lines += ["", f"in {result['workdir']}: {', '.join(written)}"]
    return "\n".join(lines)


__all__ = ["DISTILL_COLUMNS", "GridPoint", "RESULT_COLUMNS", "RowFile", "TIMING_COLUMNS", "best_rows", "compared",
           "distill_best", "distill_run_config", "format_summary", "grid_points", "plan_digest", "read_rows",
           "row_name", "run_sweep", "write_plots"]
