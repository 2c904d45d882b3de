"""``m2d``: a thin command line over the library (``m2d <stage> ...``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _cmd_import(args) -> int:
    from m2d_jax.api import import_checkpoint

    out = import_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_info(args) -> int:
    from m2d_jax.info import format_summary, load_config, summarize

    config, kind = load_config(args.path)
    summary = summarize(config)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary, kind))
    return 0


def _cmd_demo(args) -> int:
    from m2d_jax.config_utils import apply_overrides, load_config
    from m2d_jax.demo import run_demo

    config = apply_overrides(load_config(args.config), args.overrides)
    result = run_demo(config)
    print("demo:", "PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2d", description="MoE -> dense conversion and distillation (JAX)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="HF safetensors checkpoint -> m2d_jax (Orbax) checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("info", help="family, layers, experts, parameter counts of a checkpoint (HF or m2d_jax)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the main job on an embedded tiny teacher (override with --config.KEY=VALUE)")
    p.add_argument("--config", default="demo", help="config file or name under configs/")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown or (overrides and args.command != "demo"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from m2d_jax.hf.safetensors_io import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"m2d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
