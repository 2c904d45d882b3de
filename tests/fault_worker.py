"""A run that kills itself with SIGKILL in the middle of a write; started by tests/test_faults.py.

    python tests/fault_worker.py distill JOB.json
    python tests/fault_worker.py export JOB.json

distill: JOB.json = {"models", "workdir", "changes", "kill_step", "kill_point"} runs ``distill.train.run`` on
``distill_helpers.tiny_config(models, workdir, **changes)`` and dies while Orbax writes the train checkpoint of step
``kill_step``: at ``kill_point`` "items" (the data state is written into the temporary step directory, the arrays
of the train state are being written) or "rename" (everything and the commit marker are written, the temporary
directory is about to be renamed to the step's name); or at "student" (the run is complete and the trained student fully written to its temporary
directory, not yet renamed to WORKDIR/student).

export: JOB.json = {"checkpoint", "out", "tokenizer_from", "max_shard_bytes", "dtype", "overwrite", and
"kill_after_safetensors": n or "kill_removing_previous_export": true} runs ``hf.export.export_checkpoint`` and dies
right after its n-th safetensors file is complete, or (overwrite) after the first file of the previous export
under ``out`` has been deleted.

Either way the process must not exit normally: exit code 3 says the kill point was never reached.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during_checkpoint(step: int, point: str) -> None:
    """Make Orbax's atomic-rename commit of step directory ``step`` kill the process at ``point``."""
    from orbax.checkpoint._src.path import async_path, atomicity

    def is_target(final_path) -> bool:
        return os.path.basename(str(final_path)) == str(step)

    if point == "items":
        from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

        original_save = JsonCheckpointHandler._save_fn

        async def save_json(self, item, directory):
            await original_save(self, item, directory)
            if any(part.startswith(f"{step}.") for part in Path(str(directory)).parts):
                die()

        JsonCheckpointHandler._save_fn = save_json
    elif point == "rename":
        original_rename = async_path.rename

        async def rename(src, dst):
            if is_target(dst):
                assert os.path.exists(os.path.join(str(src), atomicity.COMMIT_SUCCESS_FILE)), src
                die()
            return await original_rename(src, dst)

        async_path.rename = rename
    else:
        raise ValueError(f"kill_point {point!r}")


def kill_before_moving_into_place(name: str) -> None:
    """Make the rename of a finished temporary directory to ``name`` (an ``atomic_directory``) kill the process."""
    for function in ("rename", "replace"):
        original = getattr(os, function)

        def move(src, dst, *args, _original=original, **kwargs):
            if os.path.basename(str(dst)) == name and os.path.basename(str(src)).startswith(f".{name}."):
                die()
            return _original(src, dst, *args, **kwargs)

        setattr(os, function, move)


def distill(job: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distill_helpers import tiny_config
    from m2d_jax.distill import train

    if job["kill_point"] == "student":
        kill_before_moving_into_place("student")
    else:
        kill_during_checkpoint(job["kill_step"], job["kill_point"])
    train.run(tiny_config(job["models"], job["workdir"], **job["changes"]))


def export(job: dict) -> None:
    from m2d_jax.hf import export as hf_export

    if "kill_after_safetensors" in job:
        original_write, written = hf_export.write_safetensors, []

        def write_safetensors(path, tensors):
            original_write(path, tensors)
            written.append(path)
            if len(written) == job["kill_after_safetensors"]:
                die()

        hf_export.write_safetensors = write_safetensors
    if job.get("kill_removing_previous_export"):
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            shards = sorted(Path(path).rglob("model-*.safetensors"))
            if shards and any(Path(path).rglob("config.json")):  # a complete export is being removed
                os.unlink(shards[0])  # where rmtree is after its first file
                die()
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    hf_export.export_checkpoint(job["checkpoint"], job["out"], tokenizer_from=job["tokenizer_from"],
                                dtype=job.get("dtype"), max_shard_bytes=job["max_shard_bytes"],
                                overwrite=job.get("overwrite", False), progress=False)


def main():
    kind, job_file = sys.argv[1], sys.argv[2]
    {"distill": distill, "export": export}[kind](json.loads(open(job_file).read()))
    sys.exit(3)  # the kill point was never reached


if __name__ == "__main__":
    main()
