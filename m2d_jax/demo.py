"""``m2d demo``: the main job on an embedded default, honestly scoped to what the project does today.

1. build a tiny random Qwen3-MoE checkpoint with transformers (``configs/models/qwen3_moe_tiny.py``);
2. import it (streaming safetensors -> Orbax checkpoint);
3. restore it and check logits against transformers on a padded batch, for every MoE dispatch strategy;
4. print ``m2d info``.
Later stages (calibrate, convert, distil, export, evaluate) extend this job as they land.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4  # max |delta logit| in float32


def run_demo(config: ConfigDict) -> dict:
    from m2d_jax import from_pretrained
    from m2d_jax.api import import_checkpoint
    from m2d_jax.hf.oracle import make_hf_checkpoint, padded_batch, reference_logits
    from m2d_jax.info import format_summary, summarize
    from m2d_jax.models import with_config

    with tempfile.TemporaryDirectory(prefix="m2d_demo_") as tmp:
        workdir = Path(config.workdir or tmp)
        teacher_cfg = config.teacher.to_dict()
        print(f"[1/4] building a tiny random {teacher_cfg['model_type']} teacher with transformers "
              f"in {workdir / 'teacher_hf'}")
        hf_dir = make_hf_checkpoint(teacher_cfg, workdir / "teacher_hf", seed=config.seed)

        print(f"[2/4] m2d import -> {workdir / 'teacher'}")
        start = time.perf_counter()
        ckpt = import_checkpoint(hf_dir, workdir / "teacher", overwrite=bool(config.workdir))
        print(f"      imported in {time.perf_counter() - start:.2f}s")

        print("[3/4] parity against transformers (float32, padded batch)")
        model = from_pretrained(ckpt)
        ids, mask = padded_batch(model.config.vocab_size, config.batch_size, config.seq_len, config.seed)
        want = reference_logits(hf_dir, ids, mask)
        valid = mask.astype(bool)
        results = {}
        for dispatch in ("dense", "capacity", "blocks", "ragged"):
            got = np.asarray(with_config(model, moe_dispatch=dispatch)(ids, mask))
            results[dispatch] = float(np.abs(got - want)[valid].max())
            verdict = "ok" if results[dispatch] <= PARITY_TOLERANCE else "FAIL"
            print(f"      dispatch={dispatch:<9} max|dlogit| = {results[dispatch]:.2e}  [{verdict}]")

        print("[4/4] m2d info")
        print(format_summary({"source": "m2d_jax checkpoint", **summarize(model.config)}))
    return {"max_abs_logit_diff": results, "passed": all(v <= PARITY_TOLERANCE for v in results.values())}
