"""``m2d eval tasks``: lm-eval downstream tasks on the in-process ``m2d`` backend with the paper's defaults.

docs/METHOD.md §12.2: winogrande 5-shot (acc), hellaswag 10-shot (acc_norm), arc_easy and arc_challenge 25-shot
(acc_norm), mmlu 5-shot (acc); "avg" is the unweighted mean of the reported metrics. Other tasks (e.g. local YAMLs
from ``include_path``) run with their own few-shot setting and report acc_norm if present, else acc.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Sequence

from m2d_jax.artifacts import sync_processes, write_json

log = logging.getLogger(__name__)

TASK_DEFAULTS = {  # task -> (num_fewshot, metric)
    "winogrande": (5, "acc"),
    "hellaswag": (10, "acc_norm"),
    "arc_easy": (25, "acc_norm"),
    "arc_challenge": (25, "acc_norm"),
    "mmlu": (5, "acc"),
}


def _metric_of(task: str, metrics: dict) -> str:
    if task in TASK_DEFAULTS:
        return TASK_DEFAULTS[task][1]
    names = {key.split(",")[0] for key in metrics}
    for name in ("acc_norm", "acc", "word_perplexity", "exact_match"):
        if name in names:
            return name
    raise ValueError(f"task {task!r}: no known metric among {sorted(names)}")


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: not a directory")
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """A clear error for task names lm-eval does not know (with close matches)."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown lm-eval task {task!r}{hint} (local task YAMLs: --include-path DIR)")


def evaluate_tasks(model, tasks: Sequence[str], num_fewshot: int | None = None,
                   include_path: str | Path | None = None, include_defaults: bool = True, batch_size: int = 16,
                   dtype: str = "float32", limit: int | float | None = None, output: str | Path | None = None,
                   seed: int = 0, mesh=None, **model_args) -> dict:
    """Run ``tasks`` through ``lm_eval.simple_evaluate`` on the ``m2d`` backend.

    ``model``: a checkpoint path or an ``M2DLM``. ``num_fewshot`` None = per-task defaults (``TASK_DEFAULTS``),
    else applied to every task. Returns {"tasks": {task: {metric, value, stderr, num_fewshot}}, "avg", "results"
    (lm-eval's own per-task results)}, written as JSON to ``output`` when given (once, by process 0). ``mesh``:
    the model's mesh when ``model`` is a path (see ``M2DLM``; multi-host: every process calls this the same way
    and gets the same results).
    """
    import lm_eval

    from m2d_jax.eval.lm_eval_backend import M2DLM

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    manager = task_manager(include_path, include_defaults)
    check_tasks(tasks, manager)
    lm = model if isinstance(model, M2DLM) else M2DLM(model, dtype=dtype, batch_size=batch_size, mesh=mesh,
                                                           **model_args)
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        shots = num_fewshot if num_fewshot is not None else TASK_DEFAULTS.get(task, (None, None))[0]
        groups.setdefault(shots, []).append(task)
    raw: dict[str, dict] = {}
    shots_of: dict[str, int | None] = {}
    for shots, names in groups.items():
        log.info("lm-eval tasks %s, %s-shot", names, "default" if shots is None else shots)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, task_manager=manager, limit=limit,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, log_samples=False)
        raw.update(out["results"])
        for name in out["results"]:
            shots_of[name] = out.get("n-shot", {}).get(name, shots)
    summary = {}
    for task in tasks:
        metrics = raw[task]
        metric = _metric_of(task, metrics)
        key = next(k for k in metrics if k.split(",")[0] == metric)
        stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
        summary[task] = {"metric": metric, "value": float(metrics[key]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "num_fewshot": shots_of.get(task)}
    result = {"tasks": summary, "avg": sum(s["value"] for s in summary.values()) / len(summary),
              "results": raw, "lm_eval_version": lm_eval.__version__}
    if output is not None:  # multi-host: every process has the results, process 0 writes them, the others wait
        write_json(result, output, overwrite=True)
        sync_processes(f"m2d eval tasks: wrote {output}")
    return result


def format_table(result: dict) -> str:
    """One line per task, then the unweighted average."""
    lines = [f"{'task':<24} {'shots':>5}  {'metric':<9} {'value':>7}  {'stderr':>7}"]
    for task, s in result["tasks"].items():
        stderr = f"{s['stderr']:.4f}" if s["stderr"] is not None else "-"
        shots = "-" if s["num_fewshot"] is None else str(s["num_fewshot"])
        lines.append(f"{task:<24} {shots:>5}  {s['metric']:<9} {s['value']:>7.4f}  {stderr:>7}")
    lines.append(f"{'avg':<24} {'':>5}  {'':<9} {result['avg']:>7.4f}")
    return "\n".join(lines)
