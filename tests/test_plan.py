"""``m2d plan`` and the real model / mesh configs: parameter counts against the published totals, the planner's
per-device bytes against what the distillation stage really allocates, a TPU ahead-of-time compile (libtpu, no
TPU) with its JSON output, FITS / DOES NOT FIT, and libtpu staying out of ordinary CPU runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_helpers import build_models, tiny_config
from m2d_jax.info import load_config as checkpoint_config
from m2d_jax.info import summarize
from m2d_jax.mesh import MeshSpec, load_mesh_config, mesh_names
from m2d_jax.plan import load_model, model_config_names, student_config

REPO = Path(__file__).resolve().parents[1]

# (teacher total as published on the model card / safetensors index, the paper's dense student)
REAL_MODELS = {
    "qwen3_30b_a3b": (30_532_122_624, 3_340_449_792),
    "deepseek_v2_lite": (15_706_484_224, 2_659_708_416),
    "gpt_oss_20b": (20_914_757_184, 4_185_089_880),
    "olmoe_1b_7b": (6_919_161_856, None),
    "mixtral_8x7b": (46_702_792_704, None),
    # sizes assumed (configs/models/emo_1b14b.py); the shared expert's router row is not counted (never used)
    "emo_1b14b": (13_363_611_648, 1_279_854_592),
}


def libtpu_env() -> dict:
    """The environment for a subprocess that needs libtpu (the ``test`` extra installs it). Missing is a failure,
    never a skip."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed (pip install -e '.[test]' -c constraints.txt brings it)")
    return env


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_configs_have_the_published_parameter_counts(name):
    teacher, groups = load_model(name)
    total, student_total = REAL_MODELS[name]
    assert summarize(teacher)["total_params"] == total
    student = student_config(teacher, groups)
    assert not student.is_moe or student.moe.experts.num_experts == 1
    if student_total is not None:
        assert summarize(student)["total_params"] == student_total
    assert name in model_config_names()


def test_mesh_configs_load_with_their_topologies():
    names = mesh_names()
    assert {"v4-8", "v4-32", "v5e-16", "v5e-256", "v5p-8", "v5p-64", "v5p-128", "v6e-64", "gpu-1x8-h100",
            "gpu-2x8-h100", "gpu-1x8-h200"} <= set(names)
    chips = {"v4-8": 4, "v4-32": 16, "v5p-8": 4, "v5p-64": 32, "v5p-128": 64, "v5e-16": 16, "v5e-256": 256,
             "v6e-64": 64}  # v4 / v5p accelerator types count TensorCores (2 per chip), v5e / v6e count chips
    for name in names:
        spec = load_mesh_config(name)
        assert isinstance(spec, MeshSpec) and spec.name == name
        assert np.prod(list(spec.axis_sizes().values())) == spec.chips
        if name in chips:
            assert spec.chips == chips[name] == np.prod([int(n) for n in spec.topology.split(":")[1].split("x")])
    assert load_mesh_config("v5p_64").axis_sizes(tensor=4) == {"data": 1, "fsdp": 8, "tensor": 4, "expert": 1}
    with pytest.raises(ValueError, match="unknown mesh 'v9-8'"):
        load_mesh_config("v9-8")


def _device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("plan_models"))


@pytest.mark.parametrize("axes", [dict(fsdp=-1), dict(fsdp=2, tensor=2, expert=2)])
def test_planned_bytes_equal_what_distillation_allocates(models, tmp_path, axes):
    from m2d_jax.distill import train
    from m2d_jax.plan.programs import distill_program

    assert jax.device_count() == 8
    config = tiny_config(models, tmp_path, micro_batches=2, **{"data.batch_size": 16})
    config.mesh.update({**dict(data=1, fsdp=1, tensor=1, expert=1), **axes})
    trainer = train.prepare(config)
    allocated = {"teacher_params": _device0_bytes(trainer.teacher_params),
                 "student_params": _device0_bytes(trainer.state["params"]),
                 "optimizer_state": _device0_bytes(trainer.state["opt_state"]) + _device0_bytes(trainer.state["step"])}
    program = distill_program(config, checkpoint_config(models["teacher"])[0],
                              checkpoint_config(models["student"])[0], trainer.mesh)
    for key, actual in allocated.items():
        assert program.arguments[key] == pytest.approx(actual, rel=0.02), key
    assert allocated["teacher_params"] < summarize(trainer.teacher_config)["bytes_by_dtype"]["float32"]  # sharded


# appended to the subprocess script: the HLO walk on the TPU forms of an expert matmul (einsum and ragged_dot)
TPU_MATMULS = """
import jax, jax.numpy as jnp
from m2d_jax.mesh import load_mesh_config
from m2d_jax.plan.hlo import program_costs
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
device = load_mesh_config("v4-8").topology_devices()[0]
sh = NamedSharding(Mesh([device], ("x",)), P())
E, C, d, m = 8, 128, 256, 512
f = lambda x, w, y, g: (jnp.einsum("ecd,edm->ecm", x, w), jax.lax.ragged_dot(y, w, g))
args = [jax.ShapeDtypeStruct(s, t, sharding=sh) for s, t in (((E, C, d), jnp.bfloat16), ((E, d, m), jnp.bfloat16),
        ((E * C, d), jnp.bfloat16), ((E,), jnp.int32))]
text = jax.jit(f).lower(*args).compile().as_text()
out.append({"counted": program_costs(text)["matmul_flops"], "expected": 2 * 2 * E * C * d * m})
from m2d_jax.models.splash import splash_attention
B, T, H, KV, D = 2, 1024, 4, 2, 128
qkv = [jax.ShapeDtypeStruct((B, T, n, D), jnp.bfloat16, sharding=sh) for n in (H, KV, KV)]
key_mask = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh)
attend = lambda m: lambda q, k, v: jnp.sum(splash_attention(q, k, v, m, 0, 1.0).astype(jnp.float32))
text = jax.jit(lambda q, k, v, m: jax.grad(attend(m), argnums=(0, 1, 2))(q, k, v)).lower(*qkv, key_mask).compile(
    ).as_text()
kernels = text.count('custom_call_target="tpu_custom_call"')
out.append({"counted": program_costs(text)["matmul_flops"], "kernels": kernels})
"""


@pytest.mark.slow
def test_plan_compiles_for_a_tpu_topology_and_reports_fits_and_does_not_fit(tmp_path):
    """A TPU AOT compile of the tiny teacher's distillation on v4-8 (4 chips, compile-only devices from libtpu) with
    the fused splash attention, its --json schema, and the same plan on a mesh whose chips have 1 MiB of HBM: DOES
    NOT FIT; the HLO walk's counts of the TPU kernels (grouped matmul, splash attention)."""
    tiny = dict(load_mesh_config("v4-8").__dict__, name="v4-8-tiny-hbm", hbm_bytes_per_chip=2 ** 20)
    mesh_file = tmp_path / "tiny_hbm.py"
    mesh_file.write_text("from ml_collections import ConfigDict\n\n\ndef get_config():\n"
                         f"    return ConfigDict({tiny!r})\n")
    common = ["plan", "--model", "qwen3_moe_tiny", "--groups", "2", "--stage", "distill", "--batch", "8", "--seq",
              "128", "--micro-batches", "2", "--teacher-top-k", "4", "--json"]
    script = ("import contextlib, io, json, sys\nfrom m2d_jax.cli import main\nout = []\n"
              f"for argv in {[common + ['--mesh', 'v4-8'], common + ['--mesh', str(mesh_file), '--no-suggest']]!r}:\n"
              "    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n        assert main(argv) == 0\n"
              "    out.append(json.loads(buf.getvalue()))\n" + TPU_MATMULS + "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=dict(libtpu_env(), M2D_PLAN_HLO_DIR=str(tmp_path / "hlo")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fits, tight, matmuls, splash = json.loads(proc.stdout.strip().splitlines()[-1])
    # TPU writes a batched matmul as a dilated convolution and ragged_dot as a grouped-matmul kernel: both counted
    assert matmuls["counted"] == matmuls["expected"] == 2 * 2 * 8 * 128 * 256 * 512
    # splash attention's forward, dq and dkv kernels: causal over 2 x 2 tiles of 512, the kernel computes 3 of them
    # whole; per score element and head 2 x D FLOPs per matmul: fwd QK^T, PV; dq QK^T, dO V^T, dS K; dkv 4 of them
    assert splash["kernels"] == 3 and splash["counted"] == 2 * 4 * 3 * 512 * 512 * 2 * 128 * (2 + 3 + 4)
    # on a TPU target "auto" attention is the fused kernel for both models: no [T, S] scores in the compiled step
    assert fits["config"]["attention"] == {"student": "splash", "teacher": "splash"}
    hlo = next((tmp_path / "hlo").glob("v4-8_*.hlo.txt")).read_text()
    assert "splash_mha_fwd" in hlo and "splash_mha_dkv" in hlo and "splash_mha_dq" in hlo
    assert fits["platform"] == "tpu" and fits["chips"] == 4 and fits["axes"]["fsdp"] == 4
    p = fits["per_chip"]
    assert p["source"].startswith("compiler")
    assert p["peak"] >= p["arguments"] + p["temporaries"] and p["hbm"] == 32 * 2 ** 30
    # the compiler's arguments hold the planned teacher + student + optimizer state + batch bytes; TPU layouts pad the
    # tiny model's small minor dimensions to (8, 128) tiles (the exact +-2% check is on CPU devices, above)
    planned = p["teacher_params"] + p["student_params"] + p["optimizer_state"] + p["batch"]
    assert planned <= p["arguments"] <= 4 * planned
    assert fits["fits"] and fits["fits_with_margin"] and fits["suggestion"] is None
    e = fits["estimate"]
    assert e["label"].startswith("ESTIMATE") and e["step_s"] == max(e["compute_s"], e["hbm_s"], e["collective_s"])
    assert 0 < e["mfu"] <= 1
    f = fits["flops"]  # the compiled matmuls with trip counts: the model's, plus what the program adds (remat, router)
    assert f["model_per_step"] <= f["compiled_matmul_per_step"] <= 2 * f["analytic_hardware_per_step"]
    assert f["xla_cost_analysis_per_step_loops_once"] < f["compiled_matmul_per_step"]
    assert fits["compiled"]["unknown_trip_loops"] == 0 and fits["compiled"]["collective_bytes"]["all_gather"] > 0
    assert not tight["fits"] and tight["per_chip"]["free"] < 0 and tight["per_chip"]["peak"] == p["peak"]


def test_program_costs_multiply_loop_bodies_by_their_trip_counts():
    """The HLO cost walk against exact arithmetic: grad of a 6-layer scanned tanh(h @ w) with w sharded over 8
    devices (XLA's cost_analysis counts the loop bodies once)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from m2d_jax.plan.hlo import program_costs

    layers, rows, width = 6, 512, 256
    mesh = Mesh(np.array(jax.devices()), ("x",))

    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
        return jnp.sum(h)

    w = jax.ShapeDtypeStruct((layers, width, width), jnp.float32, sharding=NamedSharding(mesh, P(None, "x", None)))
    x = jax.ShapeDtypeStruct((rows, width), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
    costs = program_costs(compiled.as_text())
    # per device: forward h @ w, backward dh @ w^T and h^T @ dh, on rows / 8 rows, in every layer
    assert costs["matmul_flops"] == 3 * 2 * (rows // 8) * width * width * layers
    assert sorted(loop["trip_count"] for loop in costs["loops"]) == [layers, layers]
    assert costs["unknown_trip_loops"] == []
    # each layer's weight is all-gathered in the forward and in the backward pass
    assert costs["collective_bytes"]["all_gather"] == 2 * layers * width * width * 4


def test_libtpu_stays_out_of_ordinary_cpu_runs():
    """With libtpu importable and no TPU on the machine, importing m2d_jax picks the CPU: no libtpu start-up (no
    TPU_* environment errors on stderr, no lockfile), and jax runs on the CPU."""
    code = "import m2d_jax, jax; print(jax.default_backend(), jax.device_count())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=libtpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", "1"]
    assert "TPU_" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr


def test_mesh_config_sets_the_distillation_mesh_and_checks_the_running_devices():
    from m2d_jax.config_utils import load_config

    config = load_config("distill/base")
    spec = load_mesh_config("v5p-64")
    spec.configure_distill(config)
    assert dict(config.mesh) == spec.axes and config.logging.peak_flops_per_device == 459e12
    with pytest.raises(ValueError, match="v5p-64: the config has 32 chips, this job sees 8 devices"):
        spec.running_mesh_sizes()


def _gpu_mesh(tmp_path, hbm: int) -> Path:
    spec = dict(load_mesh_config("gpu-1x8-h100").__dict__, name="gpu-test", hbm_bytes_per_chip=hbm)
    path = tmp_path / f"gpu_{hbm}.py"
    path.write_text(f"from ml_collections import ConfigDict\n\n\ndef get_config():\n    return ConfigDict({spec!r})\n")
    return path


def test_gpu_plan_is_analytic_and_the_search_finds_the_micro_batches_that_fit(tmp_path):
    """On a GPU mesh (no compile target) the plan is analytic; with HBM between the peaks of 2 and 4
    micro-batches, the search reports --micro-batches 4 as the change that fits, and its JSON round-trips."""
    from m2d_jax.plan import PlanOptions, plan, plan_once

    options = PlanOptions(batch=32, seq=64, micro_batches=2, teacher_top_k=4, groups=2)
    two = plan_once("qwen3_moe_tiny", "distill", str(_gpu_mesh(tmp_path, 2 ** 40)), options)
    four = plan_once("qwen3_moe_tiny", "distill", str(_gpu_mesh(tmp_path, 2 ** 40)),
                     options.replace(micro_batches=4))
    assert two["per_chip"]["source"].startswith("analytic") and two["compiled"] is None
    assert four["per_chip"]["temporaries"] < two["per_chip"]["temporaries"]
    assert four["per_chip"]["arguments"] == two["per_chip"]["arguments"]
    between = (two["per_chip"]["peak"] + four["per_chip"]["peak"]) // 2
    result = plan("qwen3_moe_tiny", "distill", str(_gpu_mesh(tmp_path, between)), options)
    assert not result["fits"] and result["suggestion"]["change"] == "--micro-batches 4"
    assert result["suggestion"]["plan"]["fits"] and result["tried"][0]["change"] == "--micro-batches 4"
    assert json.loads(json.dumps(result))["estimate"]["label"].startswith("ESTIMATE")
    nothing = plan("qwen3_moe_tiny", "distill", str(_gpu_mesh(tmp_path, 1024)), options)
    assert nothing["suggestion"] is None and len(nothing["tried"]) >= 3


def test_calibrate_and_perplexity_on_a_mesh_config_equal_the_single_device_run(models, tmp_path):
    """``--mesh`` on the running stages: the model sharded over the config's axes (gpu-1x8-h100 = the 8 test
    devices, fsdp 8) gives the same statistics and perplexity as the unsharded run."""
    from m2d_jax.eval.ppl import evaluate_perplexity
    from m2d_jax.pipeline import calibrate_files

    axes = load_mesh_config("gpu-1x8-h100").running_mesh_sizes()
    assert axes["fsdp"] == 8
    kwargs = dict(seq_len=32, num_seqs=8, gram_tokens=64, batch_size=8, gram_chunk=16, show_progress=False)
    plain = calibrate_files(models["teacher"], [models["data"]], **kwargs)
    sharded = calibrate_files(models["teacher"], [models["data"]], mesh=axes, **kwargs)
    for a, b in zip(plain.sums, sharded.sums):  # sharded batches sum in another order: float32 rounding of each
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(a))))  # field's largest term
    ppl = evaluate_perplexity(models["student"], [models["data"]], seq_len=32, batch_size=8)
    ppl_sharded = evaluate_perplexity(models["student"], [models["data"]], seq_len=32, batch_size=8, mesh=axes)
    assert ppl_sharded.ppl == pytest.approx(ppl.ppl, rel=1e-5) and ppl_sharded.tokens == ppl.tokens


SLICED_LAYERS_HLO = """HloModule sliced

%fused_slice (p0: f32[48,64,32], p1: s32[]) -> f32[1,64,32] {
  %p0 = f32[48,64,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,64,32]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,64,32}
}

%fused_update (q0: f32[48,64,32], q1: f32[1,64,32], q2: s32[]) -> f32[48,64,32] {
  %q0 = f32[48,64,32]{2,1,0} parameter(0)
  %q1 = f32[1,64,32]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %neg = f32[1,64,32]{2,1,0} negate(%q1)
  ROOT %dus = f32[48,64,32]{2,1,0} dynamic-update-slice(%q0, %neg, %q2, %z, %z)
}

%fused_outer (r0: f32[48,64,32], r1: s32[]) -> f32[1,64,32] {
  %r0 = f32[48,64,32]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %inner = f32[1,64,32]{2,1,0} fusion(%r0, %r1), kind=kLoop, calls=%fused_slice
  ROOT %twice = f32[1,64,32]{2,1,0} add(%inner, %inner)
}

ENTRY %main (w: f32[48,64,32], g: f32[48,64,32], i: s32[]) -> (f32[1,64,32], f32[48,64,32], f32[48,64,32]) {
  %w = f32[48,64,32]{2,1,0} parameter(0)
  %g = f32[48,64,32]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %slice = f32[1,64,32]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %upd = f32[48,64,32]{2,1,0} fusion(%g, %slice, %i), kind=kLoop, calls=%fused_update
  %plain = f32[48,64,32]{2,1,0} dynamic-update-slice(%w, %slice, %i, %i, %i)
  %nested = f32[1,64,32]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_outer
  ROOT %out = (f32[1,64,32]{2,1,0}, f32[48,64,32]{2,1,0}, f32[48,64,32]{2,1,0}) tuple(%slice, %upd, %plain)
}
"""


def test_hbm_bytes_count_a_dynamic_slice_and_an_in_place_update_by_the_slice():
    """A scanned layer reads its layer of the stacked weights and writes its layer of the stacked outputs: the
    traffic is the [1, 64, 32] slice, not the [48, 64, 32] stack, also when a nested fusion takes the slice
    (hand-counted on a hand-written module)."""
    from m2d_jax.plan.hlo import program_costs

    layer, index = 64 * 32 * 4, 4
    slice_fusion = layer + index + layer  # read the slice and the index, write the slice
    update_fusion = layer + index + layer  # read the update and the index, write it in place
    plain_update = 3 * index + 2 * layer  # the same without a fusion
    nested_slice = layer + index + layer  # the slice taken in a fusion nested in the fusion: the same as direct
    assert program_costs(SLICED_LAYERS_HLO)["hbm_bytes"] == slice_fusion + update_fusion + plain_update + nested_slice


# a while loop unrolled by 2 (two matmuls per body, the counter + 2 per body), as XLA writes windowed einsums on TPU
UNROLLED_LOOP_HLO = """HloModule unrolled

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8] get-tuple-element(%p), index=1
  %d0 = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d1 = f32[8,8] dot(%d0, %d0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[8,8]) tuple(%next, %d1)
}

%cond (q: (s32[], f32[8,8])) -> pred[] {
  %q = (s32[], f32[8,8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]) tuple(%zero, %a)
  %w = (s32[], f32[8,8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,8] get-tuple-element(%w), index=1
}
"""


def test_trip_count_follows_the_counter_step_of_an_unrolled_loop():
    """counter < 16 stepping by 2: 8 trips of two [8, 8] matmuls (counting 16 would double the windowed einsums'
    FLOPs on a large TPU slice)."""
    from m2d_jax.plan.hlo import program_costs

    costs = program_costs(UNROLLED_LOOP_HLO)
    assert [loop["trip_count"] for loop in costs["loops"]] == [8]
    assert costs["matmul_flops"] == 8 * 2 * 2 * 8 * 8 * 8


def test_a_program_the_tpu_compiler_refuses_for_lack_of_hbm_is_planned_as_not_fitting(monkeypatch):
    """libtpu refuses to compile a step whose temporaries exceed the chip (the recipe on v4-8 does: 34.20G of
    temporaries against 30.75G available); the plan then reads DOES NOT FIT with the compiler's figure, and the
    alternatives are tried, instead of a traceback."""
    from types import SimpleNamespace

    from m2d_jax.plan import planner

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(34.20G) exceeds available HBM (30.75G).")

    def refuse():
        raise jax.errors.JaxRuntimeError(message)

    program = SimpleNamespace(lower=lambda: SimpleNamespace(compile=refuse),
                              arguments={"teacher_params": 3 * 2 ** 30, "student_params": 2 ** 30})
    memory = planner._memory_from_compile(program, load_mesh_config("v4-8"))
    assert memory["temporaries"] == int(34.20 * 2 ** 30) and memory["arguments"] == 4 * 2 ** 30
    assert memory["peak"] == memory["arguments"] + memory["temporaries"] and "out of HBM" in memory["source"]
    other = SimpleNamespace(lower=lambda: SimpleNamespace(compile=lambda: (_ for _ in ()).throw(
        jax.errors.JaxRuntimeError("INTERNAL: something else"))), arguments={})
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):  # other compiler errors are not hidden
        planner._memory_from_compile(other, load_mesh_config("v4-8"))
