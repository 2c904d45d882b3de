"""The errors m2d_jax raises for bad input: one place, imported by every module that raises them.

Each is a ``ValueError`` whose message names the file and field (or key) and what was expected, so the CLI prints it
as one line (``m2d <stage>: error: ...``) instead of a traceback.
"""


class M2DError(ValueError):
    """Base of the errors about bad input (files, fields, options) that the CLI reports in one line."""


class CheckpointError(M2DError):
    """A checkpoint on disk is missing, malformed or does not match its config."""


class StatsError(M2DError):
    """A statistics file that is missing, malformed, non-finite, or from a different model."""


class DataError(M2DError):
    """Data files that are missing, unreadable, empty, or in an unknown format."""


class MeshError(M2DError):
    """A mesh or batch layout that cannot be realised on the available devices."""


class OutputError(M2DError):
    """An output path that cannot be written (its parent is not a writable directory, or two outputs overlap)."""


class SelectionError(M2DError):
    """A selection file that is missing, malformed, or does not match the statistics or model it is used with."""


class PruneError(M2DError):
    """A dense-to-dense pruning request that cannot be met (an MoE teacher, a target out of reach, unknown axes)."""


__all__ = ["CheckpointError", "DataError", "M2DError", "MeshError", "OutputError", "PruneError", "SelectionError",
           "StatsError"]
