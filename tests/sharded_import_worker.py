"""One process of tests/test_sharded_import.py's memory test: import an HF checkpoint (sharded over a mesh of all
processes' devices, or whole onto one device) and report the bytes it read, the keys it read, the bytes its devices
hold and how much its peak resident memory (VmHWM) grew during the import.

    python tests/sharded_import_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS JOB.json

JOB.json: {"path": HF_DIR, "mesh": {axis: size} or null}; writes JOB.json.result-PROCESS_ID.json.
"""

import json
import os
import sys

process_id, num_processes, port, devices_each, job_file = sys.argv[1:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_each}"
if int(num_processes) > 1:  # the launch variables initialize_distributed reads
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=num_processes,
                      JAX_PROCESS_ID=process_id)

from m2d_jax.distributed import initialize_distributed  # noqa: E402

initialize_distributed()

import jax  # noqa: E402

from m2d_jax.distill.sharding import make_mesh, param_shardings  # noqa: E402
from m2d_jax.hf import load_hf  # noqa: E402
from m2d_jax.hf.load import hf_model_config  # noqa: E402
from m2d_jax.hf.safetensors_io import SafetensorsFile  # noqa: E402
from m2d_jax.models import abstract_model  # noqa: E402


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main():
    job = json.loads(open(job_file).read())
    reads = {"bytes": 0, "keys": set()}
    read_slice = SafetensorsFile.read_slice

    def counting(self, key, index):
        out = read_slice(self, key, index)
        reads["bytes"] += out.nbytes
        reads["keys"].add(key)
        return out

    SafetensorsFile.read_slice = counting
    sharding = None
    if job["mesh"] is not None:
        mesh = make_mesh(job["mesh"])
        shardings = param_shardings(abstract_model(hf_model_config(job["path"])), mesh)

        def sharding(keys, _):
            tree = shardings
            for key in keys:
                tree = tree[key]
            return tree

    jax.block_until_ready(jax.device_put(1.0))  # the backend is up before the baseline
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    model = load_hf(job["path"], progress=False, sharding=sharding)
    from flax import nnx

    leaves = [v.get_value() for _, v in nnx.state(model).flat_state()]
    jax.block_until_ready(leaves)
    growth = _status_bytes("VmHWM") - before
    held = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    result = {"bytes_read": reads["bytes"], "keys_read": sorted(reads["keys"]), "held_bytes": held,
              "rss_growth": growth, "devices": jax.device_count()}
    with open(f"{job_file}.result-{process_id}.json", "w") as f:
        json.dump(result, f)
    if int(num_processes) > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
