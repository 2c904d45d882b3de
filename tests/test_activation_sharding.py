"""Activation sharding in the compiled distillation step (docs/METHOD.md §11): on a data x fsdp mesh of 8 CPU devices
the train step of a tiny MoE teacher and dense student keeps every activation's batch sharded — no instruction of the
optimised per-device program holds a whole micro-batch of rows — and its all-reduces carry no more than the
gradients (before the constraints the partitioner all-reduced partial activations over the sharded model dimension).
The calibration and perplexity forwards on the same mesh keep the batch sharded likewise. Without a mesh the
constraints are the identity."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2d_jax.distill.sharding import activation_sharding, make_mesh
from m2d_jax.models.layers import constrain
from m2d_jax.plan.hlo import _arrays, program_costs

BATCH, SEQ, MICRO_BATCHES = 48, 40, 2  # 24 rows per micro-batch, 3 per device; no model dimension is 24 or 40
GRAM_CHUNK = 16  # calibration: Gram tokens per all-experts block


@pytest.fixture(scope="module")
def compiled():
    from m2d_jax.mesh import load_mesh_config
    from m2d_jax.plan.planner import PlanOptions, _distill_config, _models
    from m2d_jax.plan.programs import distill_program

    mesh = make_mesh({"data": 2, "fsdp": 4})
    options = PlanOptions(batch=BATCH, seq=SEQ, micro_batches=MICRO_BATCHES, teacher_top_k=4, groups=2,
                          dispatch="ragged")
    teacher, student = _models("qwen3_moe_tiny", "distill", options)
    config = _distill_config(options, teacher, 8, load_mesh_config("gpu-1x8-h100"))
    program = distill_program(config, teacher, student, mesh)
    student_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(program.abstract["params"]))
    return program.lower().compile().as_text(), student_bytes


@pytest.fixture(scope="module")
def forwards():
    """The compiled calibration step (observed forward with the all-experts Gram) and perplexity forward of the
    tiny teacher on the same mesh, one [BATCH // MICRO_BATCHES, SEQ] batch each (``m2d plan``'s programs, i.e. the
    stages' own jitted steps)."""
    from m2d_jax.models import load_runtime
    from m2d_jax.plan.models import load_model
    from m2d_jax.plan.programs import calibrate_program, eval_program

    mesh = make_mesh({"data": 2, "fsdp": 4})
    teacher, _ = load_model("qwen3_moe_tiny")
    runtime, rows = load_runtime("float32"), BATCH // MICRO_BATCHES
    programs = {"calibrate": calibrate_program(teacher, runtime, mesh, rows, SEQ, num_seqs=2 * rows,
                                               gram_tokens=4 * SEQ, gram_chunk=GRAM_CHUNK),
                "eval": eval_program(teacher, runtime, mesh, rows, SEQ)}
    texts = {stage: program.lower().compile().as_text() for stage, program in programs.items()}
    # bytes of the teacher's weights sharded over fsdp, whole: what gathering each of them once per step comes to
    sharded = [x for x in jax.tree.leaves(programs["calibrate"].abstract["params"])
               if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec))]
    return texts, sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in sharded)


def _whole_batch_arrays(text: str, rows: int) -> list[str]:
    """Per-device arrays of the optimised program over all ``rows`` rows of a batch: activations [rows, seq, width]
    or tokens [rows * seq, width], width one of hidden, vocabulary, FFN widths (the tiny teacher's routing,
    [tokens, experts | k], is still gathered by the partitioner: not checked)."""
    routing = (16, 4)  # qwen3_moe_tiny: 16 experts, k' = 4
    return sorted({f"{dtype}{list(shape)}" for line in text.splitlines() if " = " in line
                   for dtype, shape in _arrays(line.split(" = ", 1)[1].split("(")[0])
                   if (shape[:2] == (rows, SEQ) or shape[:1] == (rows * SEQ,)) and shape[-1] not in routing})


def test_no_instruction_holds_a_whole_micro_batch(compiled):
    text, _ = compiled
    rows = BATCH // MICRO_BATCHES
    assert _whole_batch_arrays(text, rows) == []
    assert re.search(rf"\[{rows // 8},{SEQ},", text)  # the per-device rows of the activations


@pytest.mark.parametrize("stage", ["calibrate", "eval"])
def test_calibration_and_perplexity_forwards_keep_the_batch_sharded(forwards, stage):
    """Before they were traced under the activation layout, both forwards ran the MoE dispatch on all rows * seq
    tokens on every device; their results equal the unsharded run (tests/test_plan.py, tests/test_multihost.py)."""
    rows = BATCH // MICRO_BATCHES
    text = forwards[0][stage]
    assert _whole_batch_arrays(text, rows) == []
    assert re.search(rf"\[{rows // 8},{SEQ},", text)


def test_all_reduces_carry_only_the_gradients(compiled):
    text, student_bytes = compiled
    all_reduce = program_costs(text)["collective_bytes"].get("all_reduce", 0)
    # each micro-batch's gradients all-reduced whole count 2 x the buffer; measured 4,142,296 bytes = 2.4 x that per
    # micro-batch (the excess is not attributed yet); before the constraints 57 MB, 17x the gradients' 2 x 2 x 0.86 MB
    assert all_reduce <= MICRO_BATCHES * 3 * student_bytes, (all_reduce, student_bytes)


def test_constraints_are_the_identity_without_a_mesh_and_keep_values_with_one():
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    assert constrain(x, ("batch", "seq", "embed")) is x
    mesh = make_mesh({"data": 2, "fsdp": 4})

    @jax.jit
    def f(x):
        with activation_sharding(mesh):
            return constrain(x * 2, ("batch", "seq", "embed"))

    y = f(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    assert y.sharding.spec[0] == ("data", "fsdp") and y.sharding.shard_shape(y.shape) == (1, 6, 4)
    with pytest.raises(ValueError, match="do not match shape"):
        jax.jit(lambda x: _under(mesh, lambda: constrain(x, ("batch",))))(x)


def _under(mesh, fn):
    with activation_sharding(mesh):
        return fn()


def test_calibration_runs_the_gram_experts_on_token_shards(forwards):
    """The all-experts Gram block [E, chunk, d] is computed on each device's tokens with the layer's weights gathered
    once: the all-reduces carry the per-chunk sums only, under one f32 block per Gram chunk and layer (measured
    457,232 bytes; before the tokens were constrained the partial blocks themselves were all-reduced: 3,403,272 >= 2
    blocks each), and each weight is gathered once (measured 2,293,632 bytes for 2,247,936 of fsdp-sharded weights;
    before: 3,866,496, and once per Gram chunk in the TPU compile)."""
    from m2d_jax.calibration.sampling import gram_slots

    rows = BATCH // MICRO_BATCHES
    experts, hidden, layers = 16, 64, 4  # qwen3_moe_tiny
    blocks = layers * gram_slots(rows, 2 * rows, 4 * SEQ, SEQ, GRAM_CHUNK) // GRAM_CHUNK
    texts, sharded_weight_bytes = forwards
    collectives = program_costs(texts["calibrate"])["collective_bytes"]
    assert 0 < collectives["all_reduce"] < blocks * experts * GRAM_CHUNK * hidden * 4, (collectives, blocks)
    assert collectives["all_gather"] <= 1.1 * sharded_weight_bytes, (collectives, sharded_weight_bytes)
