"""The sharded training step and loop: forward-KL distillation (or next-token LM training) over a device mesh.

One ``jax.jit`` step with explicit in/out shardings and a donated train state (the flax ``lm1b_nnx`` pattern:
``nnx.split`` outside, ``nnx.merge`` inside the loss). Inside the step, per micro-batch (``lax.scan``): the training
objective (``distill/objectives.py``: the frozen teacher's hidden states under ``stop_gradient``, the student's, and
the chunked loss); gradients of the exact token-mean over the whole batch; global-norm clipping; AdamW on a WSD
schedule. Only the student has optimizer state; nothing in the step is random.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from m2d_jax.config_utils import load_config
from m2d_jax.data.text import check_data_files
from m2d_jax.distill.objectives import OBJECTIVES, Objective, objective_from_config
from m2d_jax.distill.schedule import wsd_schedule
from m2d_jax.distill.sharding import (BATCH_AXES, activation_sharding, batch_sharding, check_batch, make_mesh,
                                      param_shardings, replicated)
from m2d_jax.models import CausalLM, ModelConfig, RuntimeConfig, abstract_model, load_runtime
from m2d_jax.models.config import DTYPES

log = logging.getLogger(__name__)


# ---- configuration ------------------------------------------------------------------------------------------------
def check_config(config: ConfigDict) -> None:
    """Every key of ``config`` must exist in ``configs/distill/base.py`` with a compatible type; values in range.

    Raises ``ValueError`` naming the field. Runs before any data, model or compute.
    """
    schema = load_config("distill/base")

    def walk(node, ref, prefix):
        unknown = sorted(set(node.keys()) - set(ref.keys()))
        if unknown:
            raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; known under "
                             f"'{prefix or 'config.'}': {sorted(ref.keys())}")
        for key in node.keys():
            value, expected = node[key], ref[key]
            if isinstance(expected, ConfigDict):
                if not isinstance(value, ConfigDict):
                    raise ValueError(f"config field {prefix}{key} must be a group of fields, got {value!r}")
                walk(value, expected, f"{prefix}{key}.")
            elif isinstance(expected, bool) != isinstance(value, bool) or not isinstance(
                    value, (float, int) if isinstance(expected, float) else type(expected)):
                raise ValueError(f"config field {prefix}{key}={value!r}: expected {type(expected).__name__}")

    walk(config, schema, "")

    def need(cond, field, msg):
        if not cond:
            raise ValueError(f"config field {field}: {msg}")

    need(config.objective in OBJECTIVES, "objective", f"{config.objective!r} not in {tuple(OBJECTIVES)}")
    need(bool(config.student.path), "student.path", "required (or --student PATH)")
    if OBJECTIVES[config.objective].uses_teacher:
        need(bool(config.teacher.path), "teacher.path",
             f"required for objective={config.objective!r} (or --teacher PATH)")
    need(config.teacher.dtype in DTYPES, "teacher.dtype", f"expected one of {DTYPES}")
    need(config.student.compute_dtype in DTYPES, "student.compute_dtype", f"expected one of {DTYPES}")
    need(config.teacher.top_k >= 0, "teacher.top_k", "must be >= 0")
    need(config.loss.temperature > 0, "loss.temperature", "must be > 0")
    need(config.loss.chunk >= 0, "loss.chunk", "must be >= 0")
    need(config.data.seq_len > 0 and config.data.batch_size > 0, "data.seq_len / data.batch_size", "must be > 0")
    check_data_files(config.data.files, "config field data.files")
    need(config.micro_batches >= 1, "micro_batches", "must be >= 1")
    need(config.steps > 0 and config.stop_at_step >= 0, "steps / stop_at_step", "steps > 0, stop_at_step >= 0")
    need(config.checkpoint.every > 0 and config.checkpoint.keep > 0, "checkpoint.every / checkpoint.keep",
         "must be > 0")
    need(config.logging.every > 0, "logging.every", "must be > 0")
    wsd_schedule(config.optimizer.learning_rate, config.steps, config.schedule.warmup_steps,
                 config.schedule.decay_steps, config.schedule.min_lr_ratio, config.schedule.decay_type)


# ---- models --------------------------------------------------------------------------------------------------------
def load_for_mesh(path: str | Path, mesh: Mesh, dtype: str | None, **runtime_fields) -> tuple[CausalLM, dict]:
    """A model from an HF or m2d_jax checkpoint with its parameters placed on ``mesh`` by the logical-axis rules,
    in ``dtype`` and with ``runtime_fields`` (``RuntimeConfig`` fields: compute dtype, remat, dispatch, top_k).

    Returns (model, parameter shardings). Either checkpoint kind loads straight into the sharded layout.
    """
    from m2d_jax import from_pretrained
    from m2d_jax.info import load_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model checkpoint not found")
    config, _ = load_config(path)
    runtime = load_runtime(dtype, **runtime_fields)
    shardings = param_shardings(abstract_model(config, runtime), mesh)
    model = from_pretrained(path, runtime=runtime, progress=False, sharding=lambda keys, _: _lookup(shardings, keys))
    return model, shardings


def _lookup(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def model_runtimes(config: ConfigDict) -> tuple[RuntimeConfig, RuntimeConfig]:
    """(student runtime, teacher runtime) of a distillation config: the student trained in float32 with its compute
    dtype, remat and dispatch; the teacher in ``teacher.dtype`` with its dispatch and expanded top-k'."""
    student = load_runtime("float32", compute_dtype=config.student.compute_dtype, remat=config.student.remat,
                           moe_dispatch=config.student.moe_dispatch)
    teacher = load_runtime(config.teacher.dtype, moe_dispatch=config.teacher.moe_dispatch, top_k=config.teacher.top_k)
    return student, teacher


# ---- the step ------------------------------------------------------------------------------------------------------
def optimizer_from_config(config: ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with clipping, its WSD schedule) as ``config.optimizer`` / ``config.schedule`` say."""
    schedule = wsd_schedule(config.optimizer.learning_rate, config.steps, config.schedule.warmup_steps,
                            config.schedule.decay_steps, config.schedule.min_lr_ratio, config.schedule.decay_type)
    return make_optimizer(config.optimizer, schedule), schedule


def make_optimizer(opt: ConfigDict | dict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay) on ``schedule``."""
    return optax.chain(optax.clip_by_global_norm(opt["grad_clip"]),
                       optax.adamw(schedule, b1=opt["b1"], b2=opt["b2"], eps=opt["eps"],
                                   weight_decay=opt["weight_decay"]))


def init_train_state(params: dict, tx: optax.GradientTransformation, mesh: Mesh,
                     params_shardings: dict) -> tuple[dict, dict]:
    """(state, state shardings): state = {params, opt_state, step}; optimizer moments shard like params."""
    shardings = train_state_shardings(params, tx, mesh, params_shardings)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    state = {"params": params, "opt_state": opt_state,
             "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}
    return state, shardings


def train_state_shardings(params, tx, mesh: Mesh, params_shardings: dict) -> dict:
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params_shardings,
                                          transform_non_params=lambda _: replicated(mesh))
    return {"params": params_shardings, "opt_state": opt_shardings, "step": replicated(mesh)}


def make_train_step(student_graphdef, teacher_graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, objective: Objective, micro_batches: int, mesh: Mesh,
                    state_shardings: dict, teacher_shardings: dict) -> Callable:
    """``step(state, teacher_params, batch) -> (state, metrics)``, jitted with explicit shardings; ``state`` is
    donated. ``batch``: {"input_ids", "attention_mask"} int32 [batch, seq] sharded over (data, fsdp), processed in
    ``micro_batches`` micro-batches. Metrics: loss, grad_norm, lr, tokens (the loss's token count) and the
    objective's own (e.g. kl, or ce and load_balance). Traced under ``activation_sharding(mesh)``: activations keep
    the batch sharded over (data, fsdp), and each micro-batch's gradients are reduce-scattered to the parameters'
    shards before they are accumulated."""

    def micro_loss(params, teacher_params, micro_batch, tokens):
        """One micro-batch's share of the batch loss and metrics (exact batch values after summing)."""
        student = nnx.merge(student_graphdef, params)
        teacher = nnx.merge(teacher_graphdef, teacher_params) if objective.uses_teacher else None
        return objective(student, teacher, micro_batch, tokens, micro_batches)

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def grad_fn(params, teacher_params, micro_batch, tokens):  # -> ((loss, metrics), grads sharded like params)
        (loss, metrics), grads = value_and_grad(params, teacher_params, micro_batch, tokens)
        return (loss, metrics), jax.lax.with_sharding_constraint(grads, state_shardings["params"])

    def step(state, teacher_params, batch):
        with activation_sharding(mesh):  # at trace time: activations keep the batch sharded (distill/sharding.py)
            return sharded_step(state, teacher_params, batch)

    def sharded_step(state, teacher_params, batch):
        b, s = batch["input_ids"].shape  # [B, S]
        n = micro_batches
        tokens = jnp.maximum(jnp.sum(objective.loss_tokens(batch["attention_mask"]).astype(jnp.float32)), 1.0)

        def split(x):  # [B, S] -> [n, B/n, S]; row r goes to micro-batch r % n, so each device keeps its rows
            x = x.reshape(b // n, n, s).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES, None)))

        def accumulate(totals, micro_batch):
            return jax.tree.map(jnp.add, totals, grad_fn(state["params"], teacher_params, micro_batch, tokens)), None

        stacked = {key: split(value) for key, value in batch.items()}  # the micro-batches, each [n, B/n, S]
        first = jax.tree.map(lambda x: x[0], stacked)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),  # ((loss, metrics), grads) of zeros
                             jax.eval_shape(grad_fn, state["params"], teacher_params, first, tokens))
        ((loss, objective_metrics), grads), _ = jax.lax.scan(accumulate, zeros, stacked)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"]),
                   "tokens": tokens, **objective_metrics}
        return new_state, metrics

    batch_sh = {"input_ids": batch_sharding(mesh), "attention_mask": batch_sharding(mesh)}
    return jax.jit(step, in_shardings=(state_shardings, teacher_shardings, batch_sh),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


# ---- the loop ------------------------------------------------------------------------------------------------------
class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint after the current step and ends the run."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no best-effort save
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after the current step, then stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built from a config: the mesh, the sharded train state, the jitted step, the frozen
    teacher parameters and the input stream."""
    mesh: Mesh
    state: dict
    state_shardings: dict
    train_step: Callable
    teacher_params: dict
    stream: Any
    student_config: ModelConfig
    teacher_config: ModelConfig | None


def prepare(config: ConfigDict, devices=None) -> Trainer:
    """Validate ``config`` (before any data, model or compute), build the mesh over ``devices`` (default: all),
    load the data and models onto it, and compile nothing yet."""
    from m2d_jax.distill.input import BatchStream, load_windows

    check_config(config)
    objective = objective_from_config(config)
    mesh = make_mesh(dict(config.mesh), devices)
    check_batch(config.data.batch_size, config.micro_batches, mesh)
    tokenizer_dir = config.data.tokenizer or next(
        (p for p in (config.student.path, config.teacher.path) if p and (Path(p) / "tokenizer.json").exists()), "")
    if not tokenizer_dir:
        raise ValueError("config field data.tokenizer: no tokenizer.json next to the student or teacher; set it")
    windows, tokenizer = load_windows(config.data.files, tokenizer_dir, config.data.seq_len, config.data.text_field)

    student_runtime, teacher_runtime = model_runtimes(config)
    student, student_shardings = load_for_mesh(config.student.path, mesh, None, runtime=student_runtime)
    teacher_config, teacher_params, teacher_shardings, teacher_graphdef = None, {}, {}, None
    if objective.uses_teacher:
        teacher, teacher_shardings = load_for_mesh(config.teacher.path, mesh, None, runtime=teacher_runtime)
        teacher_config = teacher.config
        if teacher_config.vocab_size != student.config.vocab_size:
            raise ValueError(f"teacher vocab_size {teacher_config.vocab_size} != student vocab_size "
                             f"{student.config.vocab_size}: forward KL needs one vocabulary")
        teacher_graphdef, teacher_state = nnx.split(teacher, nnx.Param)
        teacher_params = teacher_state.to_pure_dict()
    if tokenizer.vocab_size > student.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {student.config.vocab_size}")

    tx, schedule = optimizer_from_config(config)
    student_graphdef, student_state = nnx.split(student, nnx.Param)
    state, state_shardings = init_train_state(student_state.to_pure_dict(), tx, mesh, student_shardings)
    student_config = student.config
    train_step = make_train_step(student_graphdef, teacher_graphdef, tx, schedule, objective, config.micro_batches,
                                 mesh, state_shardings, teacher_shardings)

    stream = BatchStream(windows, config.data.batch_size, config.data.seed, mesh)
    return Trainer(mesh, state, state_shardings, train_step, teacher_params, stream, student_config, teacher_config)


def run(config: ConfigDict, devices=None) -> dict[str, Any]:
    """Train as ``config`` says (see ``configs/distill/base.py``); resume from the newest checkpoint if any.

    Returns {"step", "metrics" (last logged), "workdir", "checkpoint_dir", "preempted"}.
    """
    from tqdm import tqdm

    from m2d_jax.distill.checkpointing import TrainCheckpointer
    from m2d_jax.distill.metrics import MetricsWriter, train_flops_per_token

    trainer = prepare(config, devices)
    state, stream, train_step, teacher_params = trainer.state, trainer.stream, trainer.train_step, \
        trainer.teacher_params
    workdir = Path(config.workdir).absolute()
    ckpt = TrainCheckpointer(config.checkpoint.dir or workdir / "checkpoints", config.checkpoint.every,
                             config.checkpoint.keep, config.checkpoint.async_save)
    start = ckpt.latest_step()
    if start is not None:
        if start > config.steps:
            raise ValueError(f"{ckpt.directory}: checkpoint at step {start} is past config.steps={config.steps}")
        state, data_state = ckpt.restore(start, state)
        stream.restore(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    start = start or 0
    end = min(config.steps, config.stop_at_step or config.steps)

    writer = MetricsWriter(workdir, config.logging.tensorboard, resume_step=start)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = train_flops_per_token(trainer.student_config, trainer.teacher_config, config.data.seq_len,
                                           config.teacher.top_k) * tokens_per_step
    peak = config.logging.peak_flops_per_device * trainer.mesh.size
    last: dict[str, float] = {}
    step = start
    with _Preemption() as preemption, tqdm(total=config.steps, initial=start, desc="distill", unit="step",
                                           disable=not config.logging.progress or jax.process_index() != 0) as bar:
        window_start, window_steps = None, 0
        while step < end and not preemption.requested:
            state, metrics = train_step(state, teacher_params, next(stream))
            step += 1
            ckpt.save(step, state, stream.state())
            window_steps += 1
            if window_start is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if step % config.logging.every == 0 or step == end:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if window_steps:
                    elapsed = time.perf_counter() - window_start
                    last["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                    if peak > 0:
                        last["mfu"] = flops_per_step * window_steps / elapsed / peak
                    window_start, window_steps = time.perf_counter(), 0
                writer.write(step, last)
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "tokens_per_s")})
            bar.update(1)
    ckpt.save(step, state, stream.state(), force=True)
    ckpt.close()
    writer.close()
    student_out = None
    if step == config.steps and not preemption.requested:
        student_out = save_student(config, trainer.student_config, state["params"], step)
    return {"step": step, "metrics": last, "workdir": str(workdir), "checkpoint_dir": str(ckpt.directory),
            "preempted": preemption.requested, "student": None if student_out is None else str(student_out)}


def save_student(config: ConfigDict, student_config: ModelConfig, params: dict, step: int) -> Path:
    """The trained student as an ordinary m2d_jax checkpoint (``config.student_out``, default WORKDIR/student):
    loadable by ``from_pretrained``, exportable to HF with ``m2d export`` (provenance kept for the tokenizer).
    ``params`` stay sharded as trained: every process writes its own shards (collective in a multi-process run)."""
    from m2d_jax import checkpoint
    from m2d_jax.artifacts import Provenance
    from m2d_jax.models import abstract_model
    from m2d_jax.pipeline import source_provenance

    out = Path(config.student_out or Path(config.workdir) / "student")
    graphdef, abs_state = nnx.split(abstract_model(student_config))
    nnx.replace_by_pure_dict(abs_state, params)
    metadata = Provenance("distilled", **source_provenance(config.student.path),
                          teacher=str(Path(config.teacher.path).absolute()) if config.teacher.path else None,
                          details={"objective": config.objective, "steps": step,
                                   "tokens": step * config.data.batch_size * config.data.seq_len}).to_dict()
    return checkpoint.save_model(nnx.merge(graphdef, abs_state), out, metadata, overwrite=True)

