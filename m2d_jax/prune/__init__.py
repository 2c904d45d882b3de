"""Dense-to-dense (D2D) pruning baseline: structured FFN / head / hidden / depth pruning of a dense decoder to a
parameter target with Minitron-style activation importance (docs/METHOD.md, "Dense-to-dense pruning baseline").

```python
from m2d_jax.prune import prune_dense

pruned, report = prune_dense(teacher, windows, target_params=1_200_000, axes=("ffn", "heads"))
```
"""

from m2d_jax.prune.importance import Importance, compute_importance
from m2d_jax.prune.plan import (DEFAULT_AXES, DEFAULT_MIN_FRACTION, PRUNE_AXES, PrunedShape, parse_param_count,
                                plan_shape)
from m2d_jax.prune.prune import KeptUnits, PruneReport, prune_dense, prune_to, select_units

__all__ = ["DEFAULT_AXES", "DEFAULT_MIN_FRACTION", "Importance", "KeptUnits", "PRUNE_AXES", "PruneReport",
           "PrunedShape", "compute_importance", "parse_param_count", "plan_shape", "prune_dense", "prune_to",
           "select_units"]
