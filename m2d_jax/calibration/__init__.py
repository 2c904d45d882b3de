"""The calibration stage: statistics of an MoE teacher in one streaming, jitted forward pass (docs/METHOD.md).

Every statistic is a **sum** over valid (non-padding) tokens, so batches, shards and hosts combine by addition
(``StatSums.__add__`` / ``combine_stats``); the fields are listed in ``m2d_jax.calibration.types``.

- ``types``: ``StatSums``, ``CalibrationStats``, ``validate``, ``combine_stats``;
- ``observe``: the observed forward (``batch_sums``) and host accumulation (``accumulate``);
- ``sampling``: the calibration set, its batches and the Gram subsample;
- ``stage``: ``calibrate(teacher, windows, ...) -> CalibrationStats`` in memory;
- ``io``: ``save_stats`` / ``load_stats``.
"""

from m2d_jax.calibration.io import load_stats, save_stats
from m2d_jax.calibration.observe import accumulate, batch_sums
from m2d_jax.calibration.sampling import (calibration_batches, calibration_windows, gram_positions, gram_quota,
                                          gram_slots)
from m2d_jax.calibration.stage import calibrate
from m2d_jax.calibration.types import (FORMAT, CalibrationStats, StatSums, combine_stats, config_hash,
                                       expected_shapes, validate)
from m2d_jax.errors import StatsError

__all__ = ["FORMAT", "CalibrationStats", "StatSums", "StatsError", "accumulate", "batch_sums", "calibrate",
           "calibration_batches", "calibration_windows", "combine_stats", "config_hash", "expected_shapes",
           "gram_positions", "gram_quota", "gram_slots", "load_stats", "save_stats", "validate"]
