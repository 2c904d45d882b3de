"""``m2d sweep``: the design grid of docs/METHOD.md (scorings x groupings x DP scalings x K), pre-distillation
held-out perplexity of every configuration, then distillation of the best configuration of each scoring x grouping
pair and of the overall best with an expanded teacher (k' experts per token).

Override any field from the command line, e.g. ``m2d sweep --config.teacher=DIR --config.calibration.files="('a.jsonl',)"
--config.eval.files="('heldout.jsonl',)" --config.grid.k_multiples="(1, 2)" --config.distill.steps=200``. The
workdir holds everything; running the same command again resumes (finished rows and distillations are skipped).
"""

from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config
from m2d_jax.convert import DP_SCALINGS, GROUPINGS
from m2d_jax.scoring import SCORINGS


def get_config() -> ConfigDict:
    distill = load_config("distill/base")  # the ``m2d distill`` config of every distillation (its mesh included)
    distill.steps = 200
    distill.data.batch_size, distill.data.seq_len = 32, 512
    distill.schedule.warmup_steps, distill.schedule.decay_steps = 20, 40
    distill.checkpoint.every = 50
    distill.logging.tensorboard = False
    return ConfigDict(dict(
        teacher="",  # HF directory or m2d_jax checkpoint of the MoE teacher (required)
        tokenizer="",  # directory with tokenizer.json; "" = the teacher's
        dtype="float32",  # teacher (and so student) parameters for conversion and perplexity
        calibration=dict(
            stats=(),  # existing statistics file(s) (``m2d calibrate``, shards are summed); () = calibrate here
            files=(),  # local text/jsonl/parquet files to calibrate on; "embedded:calibration": the embedded split
            text_field="text",
            seq_len=2048, num_seqs=512, gram_tokens=32768, batch_size=8, seed=0,  # docs/METHOD.md §2 defaults
        ),
        grid=dict(
            scorings=SCORINGS,  # the 7 scorings of docs/METHOD.md §3
            groupings=GROUPINGS,  # the 5 groupings of §5
            dp_scalings=DP_SCALINGS,  # uniform, proportional (§7)
            k_multiples=(1, 2, 4, 8, 16),  # K = m * k for each m (K > E or K < top-k: recorded as invalid)
            groups=0,  # k, the groups (dense FFN blocks) per layer; 0 = the teacher's top-k
        ),
        eval=dict(
            files=(),  # held-out text files (never seen by calibration or distillation), required
            text_field="text",
            seq_len=2048,
            stride=0,  # 0 = seq_len (disjoint windows)
            batch_size=8,
            max_tokens=0,  # > 0: score only the first this many tokens of the held-out stream
        ),
        distill_best=True,  # distil the best configuration of each scoring x grouping pair, and the expanded variant
        expanded_top_k=0,  # the expanded teacher's k' for the overall best configuration; 0 = 2k (at most E)
        distill=distill,  # teacher / student paths, workdir and student_out are set per run by the sweep
        num_devices=0,  # devices the mesh (``distill.mesh``) spans; 0 = all
        workdir="runs/sweep",  # results.csv, distilled.csv, plots, statistics, students, distillation runs
        progress=True,
    ))
