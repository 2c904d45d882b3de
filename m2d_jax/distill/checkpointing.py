"""Train-state checkpoints: Orbax ``CheckpointManager`` over {state: params, optimizer state, step; data:
the grain iterator state}. Saves asynchronously every N steps, keeps the last n, and writes each checkpoint to a
temporary directory that Orbax renames when complete: a crash never leaves a half-written step, only a temporary
directory that is not a step (never restored) and that the next run removes."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from m2d_jax.errors import CheckpointError

log = logging.getLogger(__name__)


class TrainCheckpointer:
    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Save at ``step`` if it is a multiple of ``every`` (or ``force``); the device-to-host copy is synchronous,
        the write is not, so ``state`` may be donated to the next step right away."""
        if (step % self.every and not force) or step in self._manager.all_steps():
            return False
        saved = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 data=ocp.args.JsonSave(data_state)), force=True)
        if saved:
            log.info("checkpoint: step %d -> %s", step, self.directory)
        return saved

    def restore(self, step: int, like) -> tuple[object, dict]:
        """(state, data iterator state) at ``step``; ``like`` (arrays or ShapeDtypeStructs with shardings) gives
        the structure, dtypes and target shardings (resharding on restore is allowed)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                           data=ocp.args.JsonRestore()))
        except ValueError as err:  # e.g. a different student, or a train state saved by another version
            detail = " ".join(str(err).split("If this mismatch is intentional")[0].split())  # Orbax's hint: n/a
            raise CheckpointError(f"{self.directory / str(step)}: the saved train state does not fit this run "
                                  f"({detail}); resume it with the run that wrote it, or use a new checkpoint.dir"
                                  ) from err
        return restored["state"], restored["data"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
