"""``m2d``: a thin command line over the library (``m2d <stage> ...``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _cmd_import(args) -> int:
    from m2d_jax.pipeline import import_checkpoint

    out = import_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_info(args) -> int:
    from m2d_jax.info import default_runtime, format_summary, load_config, summarize

    config, kind = load_config(args.path)
    summary = {"source": kind, **summarize(config, default_runtime(args.path))}
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_demo(args) -> int:
    from m2d_jax.config_utils import apply_overrides, load_config
    from m2d_jax.demo import run_demo

    config = apply_overrides(load_config("demo_quick" if args.quick else args.config), args.overrides)
    result = run_demo(config)
    print("demo:", "PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


def _cmd_distill(args) -> int:
    from m2d_jax.config_utils import apply_overrides, load_config
    from m2d_jax.distill import run

    config = load_config(args.config)
    if args.mesh:
        from m2d_jax.mesh import load_mesh_config

        load_mesh_config(args.mesh).configure_distill(config)  # before the overrides: --config.mesh.* wins
    config = apply_overrides(config, args.overrides)
    for field, path in (("teacher", args.teacher), ("student", args.student)):
        if path:
            config[field].path = path
    result = run(config)  # validates the config (unknown keys, mesh, batch) before any data, model or compute
    print(json.dumps(result, indent=2))
    return 0


def _cmd_sweep(args) -> int:
    from m2d_jax.config_utils import apply_overrides, load_config
    from m2d_jax.sweep import format_summary, run_sweep

    config = apply_overrides(load_config(args.config), args.overrides)
    if args.teacher:
        config.teacher = args.teacher
    print(format_summary(run_sweep(config)))
def _cmd_train_teacher(args) -> int:
    from m2d_jax.config_utils import apply_overrides, load_config
    from m2d_jax.teachers import train_teacher

    out = train_teacher(apply_overrides(load_config(args.config), args.overrides), args.out, args.overwrite)
    record = json.loads((out / "training.json").read_text())
    print(f"wrote {out}: {record['tokens']} tokens in {record['train_seconds']:.0f}s, final train loss "
          f"{record['final_train_loss']:.3f}, held-out ppl {record['heldout']['ppl']:.2f}")
    return 0


def _cmd_calibrate(args) -> int:
    from m2d_jax.pipeline import calibrate_files

    stats = calibrate_files(args.model, args.data, args.out, seq_len=args.seq_len, num_seqs=args.num_seqs,
                            gram_tokens=args.gram_tokens, batch_size=args.batch_size, seed=args.seed,
                            gram_chunk=args.gram_chunk, tokenizer_dir=args.tokenizer, text_field=args.text_field,
                            shard_index=args.shard_index, shard_count=args.shard_count, dtype=args.dtype,
                            mesh=_running_mesh(args), overwrite=args.overwrite)
    m = stats.metadata
    print(f"wrote {args.out}: {m['tokens_seen']} tokens, {m['gram_tokens_seen']} Gram tokens, "
          f"{len(m['moe_layers'])} MoE layers, {m['tokens_seen'] / max(m['seconds'], 1e-9):.0f} tokens/s incl. compile")
    return 0


def _running_mesh(args) -> dict | None:
    from m2d_jax.mesh import load_mesh_config

    return load_mesh_config(args.mesh).running_mesh_sizes() if args.mesh else None


def _cmd_plan(args) -> int:
    from m2d_jax.plan import PlanOptions, format_plan, plan

    axes = {a: getattr(args, a) for a in ("data", "fsdp", "tensor", "expert") if getattr(args, a) is not None}
    options = PlanOptions(batch=args.batch, seq=args.seq, micro_batches=args.micro_batches, remat=args.remat,
                          teacher_top_k=args.teacher_top_k, objective=args.objective, dispatch=args.dispatch,
                          dtype=args.dtype, attention=args.attention,
                          groups=args.groups, eval_model=args.eval_model, distill_config=args.config, axes=axes)
    result = plan(args.model, args.stage, args.mesh, options, suggest=not args.no_suggest,
                  analytic=args.analytic)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _scoring_options(args) -> dict:
    return {k: v for k, v in (("acp_form", args.acp_form), ("beta", args.beta), ("ridge", args.ridge),
                              ("kernel", args.kernel)) if v is not None}


def _cmd_score(args) -> int:
    from m2d_jax.pipeline import select_from_files

    selection = select_from_files(args.stats, args.scoring, args.experts, args.out, model=args.model,
                                  overwrite=args.overwrite, **_scoring_options(args))
    if args.json:
        print(json.dumps(selection.to_dict()))
        return 0
    print(f"{selection.scoring}, K={selection.num_selected} of E={selection.num_experts} "
          "(layer: experts in selection order)")
    for layer, row in zip(selection.moe_layers, selection.selected.tolist()):
        print(f"layer {layer:3d}: {' '.join(map(str, row))}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _cmd_eval_ppl(args) -> int:
    from m2d_jax.eval.ppl import evaluate_perplexity
    from m2d_jax.artifacts import write_json

    result = evaluate_perplexity(args.model, args.data, seq_len=args.seq_len, stride=args.stride,
                                 batch_size=args.batch_size, dtype=args.dtype, text_field=args.text_field,
                                 tokenizer_path=args.tokenizer, mesh=_running_mesh(args)).to_dict()
    if args.output:
        write_json(result, args.output, overwrite=True)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_eval_tasks(args) -> int:
    from m2d_jax.eval.tasks import evaluate_tasks, format_table

    model_args = {"tokenizer": args.tokenizer} if args.tokenizer else {}
    result = evaluate_tasks(args.model, [t for t in args.tasks.split(",") if t], num_fewshot=args.num_fewshot,
                            include_path=args.include_path, include_defaults=not args.local_tasks_only,
                            batch_size=args.batch_size, dtype=args.dtype, limit=args.limit, output=args.output,
                            mesh=_running_mesh(args), **model_args)
    import jax

    if jax.process_index() == 0:
        print(format_table(result))
    return 0


def _cmd_generate(args) -> int:
    import jax

    from m2d_jax.data import load_tokenizer
    from m2d_jax.distributed import stage_mesh
    from m2d_jax.eval.generate import generate
    from m2d_jax.pipeline import load_model

    mesh = stage_mesh(_running_mesh(args))
    model = load_model(args.model, args.dtype, mesh)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    texts = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, until=args.until or (),
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, mesh=mesh)
    for prompt, text in zip(args.prompt, texts):
        if jax.process_index() == 0:
            print(json.dumps({"prompt": prompt, "completion": text}))
    return 0


def _cmd_convert(args) -> int:
    from m2d_jax.convert import ConversionRecipe
    from m2d_jax.pipeline import convert_checkpoint, random_ffn_checkpoint

    if args.random_ffn:
        out = random_ffn_checkpoint(args.model, args.groups, args.out, args.hf_out, dtype=args.dtype, seed=args.seed,
                                    overwrite=args.overwrite, mesh=_running_mesh(args))
    else:
        recipe = ConversionRecipe(args.groups, args.grouping, args.dp_scaling)
        out = convert_checkpoint(args.model, args.stats, recipe, args.out, args.hf_out, selection=args.selection,
                                 scoring=args.scoring, num_selected=args.experts,
                                 scoring_options=_scoring_options(args), dtype=args.dtype, overwrite=args.overwrite,
                                 mesh=_running_mesh(args))
    print(f"wrote {out}" + (f" and {args.hf_out}" if args.hf_out else ""))
    return 0


def _cmd_export(args) -> int:
    from m2d_jax.hf.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, tokenizer_from=args.tokenizer_from, dtype=args.dtype,
                            max_shard_bytes=int(args.max_shard_mb * 2 ** 20), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_prune_dense(args) -> int:
    from m2d_jax.pipeline import prune_dense_checkpoint

    out, report = prune_dense_checkpoint(
        args.model, args.data, args.out, target_params=args.params, params_of=args.params_of, hf_out=args.hf_out,
        axes=[a.strip() for a in args.axes.split(",")], min_fraction=args.min_fraction, seq_len=args.seq_len,
        num_seqs=args.num_seqs, batch_size=args.batch_size, seed=args.seed, tokenizer_dir=args.tokenizer,
        text_field=args.text_field, dtype=args.dtype, overwrite=args.overwrite, mesh=_running_mesh(args))
    print(f"pruned {report.teacher_params:,} -> {report.params:,} parameters (target {report.target_params:,}; "
          f"{report.params - report.target_params:+,}), shape {report.shape.to_dict()}")
    print(f"wrote {out}" + (f" and {args.hf_out}" if args.hf_out else ""))
    return 0


def _add_scoring_options(p) -> None:
    from m2d_jax.scoring import ACP_FORMS, DEFAULT_OPTIONS, KERNELS

    default = DEFAULT_OPTIONS
    p.add_argument("--acp-form", default=None, choices=ACP_FORMS,
                   help=f"ACP form of reap / gld_reap (default {default['acp_form']})")
    p.add_argument("--beta", type=float, default=None,
                   help=f"importance exponent of the log-det kernel (default {default['beta']})")
    p.add_argument("--ridge", type=float, default=None, help=f"ridge of the log-det kernel (default {default['ridge']})")
    p.add_argument("--kernel", default=None, choices=KERNELS, help=f"log-det kernel (default {default['kernel']})")


def build_parser() -> argparse.ArgumentParser:
    from m2d_jax.convert import DP_SCALINGS, GROUPINGS
    from m2d_jax.models.config import DTYPES
    from m2d_jax.pipeline import DEFAULT_SCORING
    from m2d_jax.scoring import SCORINGS

    parser = argparse.ArgumentParser(prog="m2d", description="MoE -> dense conversion and distillation (JAX)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="HF safetensors checkpoint -> m2d_jax (Orbax) checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("info", help="family, layers, experts, parameter counts of a checkpoint (HF or m2d_jax)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the method and the paper's comparisons on the shipped teachers (override with "
                                    "--config.KEY=VALUE)")
    p.add_argument("--config", default="demo", help="config file or name under configs/")
    p.add_argument("--quick", action="store_true", help="the same path on a tiny budget (--config demo_quick)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("convert", help="MoE teacher + calibration statistics + selection -> dense student "
                                       "(docs/METHOD.md)")
    p.add_argument("--model", required=True, help="HF or m2d_jax checkpoint directory of the MoE teacher")
    p.add_argument("--stats", nargs="+", help="calibration statistics file(s) (m2d calibrate; shards are summed)")
    p.add_argument("--selection", help="selection file (m2d score --out); or select here with --scoring/--experts")
    p.add_argument("--scoring", default=None, choices=SCORINGS,
                   help=f"expert scoring when there is no --selection (default {DEFAULT_SCORING})")
    p.add_argument("--experts", type=int, help="K: experts selected per MoE layer (without --selection)")
    _add_scoring_options(p)
    p.add_argument("--grouping", default="round_robin", choices=GROUPINGS)
    p.add_argument("--dp-scaling", default="uniform", choices=DP_SCALINGS, help="down-projection scaling")
    p.add_argument("--groups", type=int, required=True, help="k: groups (dense FFN blocks) per layer; K need not "
                                                             "be a multiple of k")
    p.add_argument("--out", required=True, help="output m2d_jax checkpoint directory (must not exist)")
    p.add_argument("--hf-out", help="also export the student as an HF checkpoint directory here")
    p.add_argument("--random-ffn", action="store_true", help="random-FFN baseline (teacher attention, new FFN)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-FFN baseline")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/): the devices the student is written "
                                                "from (multi-host: default all devices)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="m2d_jax checkpoint -> HF checkpoint directory (standard transformers class)")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer-from", help="HF directory to copy tokenizer files and generation_config.json from "
                                            "(default: the teacher recorded in the checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as saved)")
    p.add_argument("--max-shard-mb", type=float, default=2048.0, help="split safetensors beyond this size")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("distill", help="sharded forward-KL distillation of a student from a teacher "
                                       "(override with --config.KEY=VALUE)")
    p.add_argument("--config", default="distill/base", help="config file or name under configs/")
    p.add_argument("--teacher", default="", help="teacher checkpoint (HF or m2d_jax); sets config.teacher.path")
    p.add_argument("--student", default="", help="student checkpoint (HF or m2d_jax); sets config.student.path")
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/, e.g. v5p-64): sets config.mesh")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("sweep", help="scorings x groupings x DP scalings x K: pre-distillation perplexity of every "
                                     "configuration, then the best ones distilled; resumable (override with "
                                     "--config.KEY=VALUE)")
    p.add_argument("--config", default="sweep", help="config file or name under configs/")
    p.add_argument("--teacher", default="", help="MoE teacher checkpoint (HF or m2d_jax); sets config.teacher")
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("train-teacher", help="train a teacher from scratch on the embedded corpus' train split, "
                                             "export HF (override with --config.KEY=VALUE)")
    p.add_argument("config", help="teacher config file or name, e.g. configs/teachers/moe.py")
    p.add_argument("--out", default=None, help="output HF directory (default: config.out)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_train_teacher)

    p = sub.add_parser("calibrate", help="teacher routing / expert-output statistics in one pass (docs/METHOD.md §2)")
    p.add_argument("--model", required=True, help="HF or m2d_jax checkpoint directory of the MoE teacher")
    p.add_argument("--data", required=True, nargs="+", help="local text / jsonl / parquet files")
    p.add_argument("--out", required=True, help="statistics file to write (.npz)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--gram-tokens", type=int, default=32768, help="Gram subsample size n_G (all experts run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gram-chunk", type=int, default=256, help="tokens per [E, chunk, d] all-experts block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--shard-index", type=int, default=0, help="this host's shard (combine shards by addition)")
    p.add_argument("--shard-count", type=int, default=1)
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/): shard the teacher over its axes")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("score", help="select experts from calibration statistics: print the per-layer selection "
                                     "and write it as a selection file (--out)")
    p.add_argument("--stats", required=True, nargs="+", help="statistics file(s); several shards are summed")
    p.add_argument("--scoring", required=True, choices=SCORINGS)
    p.add_argument("--experts", type=int, required=True, help="K, experts kept per layer")
    _add_scoring_options(p)
    p.add_argument("--model", default=None, help="check that the statistics belong to this checkpoint")
    p.add_argument("--out", default=None, help="selection file to write (.json; m2d convert --selection)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the selection record as JSON")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("eval", help="evaluation: perplexity (ppl) and lm-eval downstream tasks (tasks)")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    p = eval_sub.add_parser("ppl", help="WikiText-2-protocol perplexity on local text/jsonl/parquet files")
    p.add_argument("--model", required=True, help="HF or m2d_jax checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help="local .txt/.jsonl/.json/.parquet files")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--stride", type=int, default=None, help="window stride (default: --seq-len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/): shard the model over its axes")
    p.set_defaults(func=_cmd_eval_ppl)
    p = eval_sub.add_parser("tasks", help="lm-eval tasks on the in-process m2d backend (docs/METHOD.md §12 defaults)")
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="winogrande,hellaswag,arc_easy,arc_challenge,mmlu")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="for every task (default: per-task, docs/METHOD.md §12.2)")
    p.add_argument("--include-path", default=None, help="directory of local task YAMLs")
    p.add_argument("--local-tasks-only", action="store_true", help="skip indexing lm-eval's built-in tasks")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--limit", type=float, default=None, help="examples per task (fraction if < 1)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--output", default=None, help="results JSON path")
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/): shard the model over its axes")
    p.set_defaults(func=_cmd_eval_tasks)

    p = sub.add_parser("generate", help="KV-cache decoding (greedy by default) from text prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--until", action="append", help="stop string (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/): shard the model over its axes")
    p.set_defaults(func=_cmd_generate)

    from m2d_jax.prune import DEFAULT_AXES, DEFAULT_MIN_FRACTION, PRUNE_AXES, parse_param_count

    p = sub.add_parser("prune-dense", help="dense-to-dense (D2D) baseline: prune a dense teacher to a parameter "
                                           "count with activation importance (docs/METHOD.md §17)")
    p.add_argument("--model", required=True, help="HF or m2d_jax checkpoint directory of the dense teacher")
    p.add_argument("--data", required=True, nargs="+", help="local text / jsonl / parquet calibration files")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--params", type=parse_param_count, help="target parameter count, e.g. 1200000 or 1.2M")
    target.add_argument("--params-of", help="match the total parameter count of this checkpoint (HF or m2d_jax)")
    p.add_argument("--axes", default=",".join(DEFAULT_AXES),
                   help=f"comma-separated subset of {','.join(PRUNE_AXES)} (default {','.join(DEFAULT_AXES)})")
    p.add_argument("--min-fraction", type=float, default=DEFAULT_MIN_FRACTION,
                   help="no axis keeps less than this fraction of its teacher size")
    p.add_argument("--out", required=True, help="output m2d_jax checkpoint directory (must not exist)")
    p.add_argument("--hf-out", help="also export the pruned model as an HF checkpoint directory here")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--mesh", default=None, help="mesh config (configs/mesh/): the devices the pruned model is written "
                                                "from (multi-host: default all devices)")
    p.set_defaults(func=_cmd_prune_dense)
    from m2d_jax.models.config import ATTENTION_KERNELS, DISPATCHES
    from m2d_jax.plan import DEFAULT_DISTILL_CONFIG, STAGES

    p = sub.add_parser("plan", help="compile a stage ahead of time for a mesh config: memory per chip, FITS / DOES "
                                    "NOT FIT, FLOPs, step-time ESTIMATE (no weights, no TPU needed)")
    p.add_argument("--model", required=True, help="model config name (configs/models/) or checkpoint directory")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--mesh", required=True, help="mesh config name (configs/mesh/, e.g. v5p-64) or file")
    p.add_argument("--batch", type=int, help="sequences per step / batch (default: the distill config's; 8)")
    p.add_argument("--seq", type=int, help="sequence length (default: the distill config's; 2048)")
    p.add_argument("--micro-batches", type=int, help="distill: gradient-accumulation micro-batches")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None, help="distill: student remat")
    p.add_argument("--teacher-top-k", type=int, help="distill: expanded teacher routing k' (0 = as trained)")
    p.add_argument("--objective", choices=("kl", "lm"), help="distill: lm = train --model itself (no teacher)")
    p.add_argument("--dispatch", choices=DISPATCHES, help="MoE dispatch of the teacher")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="calibrate / eval: parameter dtype")
    p.add_argument("--attention", default="auto", choices=ATTENTION_KERNELS,
                   help="attention kernel (auto: the fused splash kernel on TPU where supported)")
    p.add_argument("--groups", type=int, help="k of the student (default: the model config's)")
    p.add_argument("--eval-model", default="student", choices=("student", "teacher"), help="eval: which model")
    p.add_argument("--config", default=DEFAULT_DISTILL_CONFIG, help="distill: the distillation config")
    for axis in ("data", "fsdp", "tensor", "expert"):
        p.add_argument(f"--{axis}", type=int, help=f"mesh {axis} axis size (default: the mesh config's)")
    p.add_argument("--no-suggest", action="store_true", help="do not search for a plan that fits")
    p.add_argument("--analytic", action="store_true", help="no compile on a TPU mesh either (quick, estimated)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown or (overrides and args.command not in ("demo", "distill", "sweep", "train-teacher")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from m2d_jax.artifacts import sync_processes
    from m2d_jax.distributed import initialize_distributed
    from m2d_jax.errors import CheckpointError

    try:
        initialize_distributed()  # multi-host (TPU pod, SLURM, JAX_* variables); nothing for one process
        status = args.func(args)
        sync_processes(f"m2d {args.command}: done")  # multi-host: nobody exits before process 0 has written
        return status
    except (CheckpointError, FileExistsError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"m2d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
