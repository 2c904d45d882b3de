"""One process of a multi-process run on this machine (``jax.distributed`` on localhost, gloo collectives, 2 fake
CPU devices per process); started by tests/test_multiprocess.py.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT JOB.json

JOB.json: {"models": {...}, "workdir": ..., "changes": {...}} runs ``distill.train.run`` on
``distill_helpers.tiny_config(models, workdir, **changes)``; each process writes its result dict to
JOB.json.result-PROCESS_ID.json.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402


def main():
    process_id, num_processes, port, job_file = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
    job = json.loads(open(job_file).read())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distill_helpers import tiny_config
    from m2d_jax.distill import train

    config = tiny_config(job["models"], job["workdir"], **job["changes"])
    result = train.run(config)
    result.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  devices=len(jax.devices()), local_devices=len(jax.local_devices()))
    with open(f"{job_file}.result-{process_id}.json", "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
