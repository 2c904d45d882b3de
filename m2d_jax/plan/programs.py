"""The jitted step of each stage with abstract, sharded arguments (``jax.ShapeDtypeStruct`` with a
``NamedSharding``): no weights, no devices beyond the mesh's (compile-only TPU devices are enough).

Every program is the stage's own step builder — distill: ``distill.train.make_train_step``; calibrate:
``calibration.observe.observed_forward`` (the observed forward with the all-experts Gram); eval: the perplexity
forward ``eval.scoring._target_logprobs`` — so what is compiled here is what the stage runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from m2d_jax.distill.sharding import batch_sharding, param_shardings, replicated, unflatten_paths
from m2d_jax.models import ModelConfig, RuntimeConfig, abstract_model


@dataclasses.dataclass
class Program:
    """A stage step ready to lower: ``lower()`` -> ``jax.stages.Lowered``; ``arguments`` names the per-device bytes
    of each argument group (teacher / student parameters, optimizer state, batch)."""
    stage: str
    lower: Callable[[], Any]
    arguments: dict[str, int]
    abstract: dict  # {"params": the (student's) parameters, "teacher": the teacher's} as abstract sharded trees
    batch_shards: int  # data x fsdp: devices the batch is split over
    attention: dict = dataclasses.field(default_factory=dict)  # {"student", "teacher"}: each one's attention kernel


def per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry a sharding (its shard shape x itemsize)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(config: ModelConfig, runtime: RuntimeConfig, mesh: Mesh) -> tuple[Any, dict]:
    """(graphdef, abstract parameter pure-dict with the project's logical-axis shardings) of a model."""
    model = abstract_model(config, runtime)
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, _with_shardings(state.to_pure_dict(), param_shardings(model, mesh))


def abstract_state(config: ModelConfig, runtime: RuntimeConfig, mesh: Mesh) -> tuple[Any, dict]:
    """(graphdef, abstract full model state) for steps that take ``nnx.split(model)``: parameters sharded by the
    rules, any other variable replicated."""
    model = abstract_model(config, runtime)
    graphdef, state = nnx.split(model)
    shardings = param_shardings(model, mesh)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        node = shardings
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        sharding = node if isinstance(node, NamedSharding) else replicated(mesh)
        flat[path] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    abstract = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(abstract, unflatten_paths(flat))
    return graphdef, abstract


def _batch_shards(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _tokens(mesh: Mesh, batch: int, seq: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding(mesh))


def target_runtime(config: ModelConfig, runtime: RuntimeConfig, seq_len: int, platform: str | None) -> RuntimeConfig:
    """``runtime`` with its ``attention`` kernel resolved for the compile target's ``platform`` (None: jax's default
    backend), not for the CPU doing the compile (where "auto" means xla)."""
    from m2d_jax.models.splash import attention_kernel

    return runtime.replace(attention=attention_kernel(config, runtime, seq_len, platform))


def distill_program(distill_config, teacher: ModelConfig | None, student: ModelConfig, mesh: Mesh,
                    attention: str = "auto", platform: str | None = None) -> Program:
    """``make_train_step`` of ``distill_config`` (objective, optimizer, micro-batches, runtimes) over ``mesh``, both
    models' attention kernels ``attention`` resolved for ``platform``."""
    from m2d_jax.distill.objectives import objective_from_config
    from m2d_jax.distill.sharding import check_batch
    from m2d_jax.distill.train import make_train_step, model_runtimes, optimizer_from_config, train_state_shardings

    c = distill_config
    check_batch(c.data.batch_size, c.micro_batches, mesh)
    objective = objective_from_config(c)
    student_runtime, teacher_runtime = (target_runtime(m, r.replace(attention=attention), c.data.seq_len, platform)
                                        for m, r in zip((student, teacher or student), model_runtimes(c)))
    tx, schedule = optimizer_from_config(c)
    student_graphdef, params = abstract_params(student, student_runtime, mesh)
    params_shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = train_state_shardings(params, tx, mesh, params_shardings)
    state = _with_shardings({"params": params, "opt_state": jax.eval_shape(tx.init, params),
                             "step": jax.ShapeDtypeStruct((), jnp.int32)}, shardings)
    teacher_graphdef, teacher_params, teacher_shardings = None, {}, {}
    if objective.uses_teacher:
        teacher_graphdef, teacher_params = abstract_params(teacher, teacher_runtime, mesh)
        teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
    step = make_train_step(student_graphdef, teacher_graphdef, tx, schedule, objective, c.micro_batches, mesh,
                           shardings, teacher_shardings)
    batch = {"input_ids": _tokens(mesh, c.data.batch_size, c.data.seq_len),
             "attention_mask": _tokens(mesh, c.data.batch_size, c.data.seq_len)}
    return Program("distill", lambda: step.lower(state, teacher_params, batch),
                   {"teacher_params": per_device_bytes(teacher_params),
                    "student_params": per_device_bytes(state["params"]),
                    "optimizer_state": per_device_bytes(state["opt_state"]) + per_device_bytes(state["step"]),
                    "batch": per_device_bytes(batch)},
                   {"params": state["params"], "teacher": teacher_params}, _batch_shards(mesh),
                   {"student": student_runtime.attention, "teacher": teacher_runtime.attention})


def calibrate_program(teacher: ModelConfig, runtime: RuntimeConfig, mesh: Mesh, batch: int, seq: int,
                      num_seqs: int, gram_tokens: int, gram_chunk: int) -> Program:
    """The calibration step (``observed_forward``) on one [batch, seq] batch with its Gram slots."""
    from m2d_jax.calibration.observe import observed_forward
    from m2d_jax.calibration.sampling import gram_slots

    graphdef, state = abstract_state(teacher, runtime, mesh)
    slots = gram_slots(batch, num_seqs, gram_tokens, seq, gram_chunk)
    chunk = max(1, min(gram_chunk, slots))
    gram = jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=replicated(mesh))
    run = observed_forward(graphdef, chunk, mesh)
    ids = _tokens(mesh, batch, seq)
    return Program("calibrate", lambda: run.lower(state, ids, ids, gram, gram),
                   {"teacher_params": per_device_bytes(state), "batch": 2 * per_device_bytes(ids)},
                   {"params": state}, _batch_shards(mesh))


def eval_program(model: ModelConfig, runtime: RuntimeConfig, mesh: Mesh, batch: int, seq: int) -> Program:
    """The perplexity forward (``target_logprobs``' jitted program) on one [batch, seq] batch."""
    from m2d_jax.eval.scoring import LOGITS_CHUNK, _target_logprobs

    graphdef, state = abstract_state(model, runtime, mesh)
    ids = _tokens(mesh, batch, seq)
    lower = functools.partial(_target_logprobs.lower, graphdef, state, ids, ids, ids, chunk=LOGITS_CHUNK, mesh=mesh)
    return Program("eval", lower,
                   {"model_params": per_device_bytes(state), "batch": 3 * per_device_bytes(ids)},
                   {"params": state}, _batch_shards(mesh))
