"""``m2d plan``: will a stage fit on a mesh, and how fast might it run — from the compiler, without weights or a TPU.

For a TPU mesh the stage's own jitted step (``programs``) is lowered with abstract sharded arguments and compiled
ahead of time for the topology's compile-only devices (libtpu); memory per chip is the compiler's
``memory_analysis``. For a GPU mesh (no compile target without the CUDA plugin and devices) parameters and optimizer
state per device are exact from the shardings and temporaries are an analytic estimate, labelled as such.

Time is an ESTIMATE: a roofline max(compute, HBM traffic, collective traffic) with perfect overlap against the mesh
config's peaks. On TPU its inputs are the compiled program's own per-device matmul FLOPs, HBM and collective bytes,
summed over the optimised HLO with every loop's trip count (``hlo.program_costs``; XLA's ``cost_analysis`` counts each
``scan`` body once — layers, micro-batches, loss chunks — and is reported beside, not used). On GPU they are
analytic: the model FLOPs (``distill.metrics``, + one student forward for remat), the gathered weights each device
streams per micro-batch plus the optimizer pass, and the FSDP all-gather / reduce-scatter bytes. MFU = analytic model
FLOPs / (step time x chips x peak).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from pathlib import Path

import jax
import numpy as np

from m2d_jax.distill.metrics import forward_flops_per_token, train_flops_per_token
from m2d_jax.errors import M2DError, MeshError
from m2d_jax.mesh import MeshSpec, load_mesh_config, mesh_names
from m2d_jax.models import ModelConfig, load_runtime
from m2d_jax.plan.hlo import program_costs

log = logging.getLogger(__name__)

STAGES = ("calibrate", "distill", "eval")
DEFAULT_DISTILL_CONFIG = "distill/qwen3_30b_a3b"  # the paper's recipe (docs/METHOD.md §11)
FREE_MARGIN = 0.10  # a plan "fits comfortably" with at least this fraction of HBM free


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """What to plan. None = the stage's default (distill: ``distill_config``; calibrate / eval: the CLI's)."""
    batch: int | None = None  # sequences per step (distill) / per batch (calibrate, eval)
    seq: int | None = None
    micro_batches: int | None = None  # distill
    remat: bool | None = None  # distill: student remat
    teacher_top_k: int | None = None  # distill: expanded teacher routing k' (0 = as trained)
    objective: str | None = None  # distill: "kl" (the student from the teacher) or "lm" (train the model itself)
    dispatch: str | None = None  # MoE dispatch of the teacher (every stage)
    attention: str = "auto"  # attention kernel (RuntimeConfig.attention; "auto" resolved for the mesh's platform)
    dtype: str = "bfloat16"  # calibrate / eval: parameter + compute dtype
    groups: int | None = None  # k of the student (default: the model config's)
    eval_model: str = "student"  # eval: "student" or "teacher"
    num_seqs: int = 512  # calibrate: calibration set size (fixes the Gram quota per sequence)
    gram_tokens: int = 32768
    gram_chunk: int = 256
    distill_config: str = DEFAULT_DISTILL_CONFIG
    axes: dict = dataclasses.field(default_factory=dict)  # mesh axis overrides {data, fsdp, tensor, expert}

    def replace(self, **changes) -> "PlanOptions":
        return dataclasses.replace(self, **changes)


# ---- the models and runtimes of a stage ---------------------------------------------------------------------------
def _dispatch(dispatch: str | None, spec: MeshSpec) -> str:
    """The MoE dispatch the stage would use on the mesh's platform (``auto`` resolved for the target, not for the
    CPU doing the compile)."""
    from m2d_jax.models.moe import default_dispatch

    return default_dispatch(spec.platform) if dispatch in (None, "auto") else dispatch


def _distill_config(options: PlanOptions, teacher: ModelConfig, batch_shards: int, spec: MeshSpec):
    """The distillation config with the plan's changes. Without ``micro_batches`` the config's count is kept if the
    mesh can split it, else the largest smaller count that it can (each micro-batch divisible by data x fsdp)."""
    from m2d_jax.config_utils import load_config

    c = load_config(options.distill_config)
    for value, (group, key) in ((options.batch, ("data", "batch_size")), (options.seq, ("data", "seq_len")),
                                (options.remat, ("student", "remat")), (options.teacher_top_k, ("teacher", "top_k")),
                                (options.dispatch, ("teacher", "moe_dispatch"))):
        if value is not None:
            c[group][key] = value
    c.teacher.moe_dispatch = _dispatch(c.teacher.moe_dispatch, spec)
    c.student.moe_dispatch = _dispatch(c.student.moe_dispatch, spec)
    if options.objective is not None:
        c.objective = options.objective
    if options.micro_batches is not None:
        c.micro_batches = options.micro_batches
    else:
        b = c.data.batch_size
        c.micro_batches = next((n for n in range(c.micro_batches, 0, -1)
                                if b % n == 0 and (b // n) % batch_shards == 0), c.micro_batches)
    if c.objective != "lm" and teacher.moe is not None and c.teacher.top_k > min(teacher.moe_layer_experts):
        raise M2DError(f"{options.distill_config}: teacher.top_k={c.teacher.top_k} exceeds the teacher's "
                       f"{min(teacher.moe_layer_experts)} experts; pass --teacher-top-k")
    return c


def _models(model: str, stage: str, options: PlanOptions) -> tuple[ModelConfig, ModelConfig | None]:
    """(teacher / the model, its student or None) for ``stage``."""
    from m2d_jax.plan.models import load_model, student_config

    teacher, groups = load_model(model)
    groups = options.groups or groups
    needs_student = ((stage == "distill" and options.objective != "lm")
                     or (stage == "eval" and options.eval_model == "student"))
    if not needs_student or not teacher.is_moe:
        return teacher, None
    if not groups:
        raise M2DError(f"--model {model}: give --groups k, the student's groups per layer")
    return teacher, student_config(teacher, groups)


# ---- analytic FLOPs and traffic -----------------------------------------------------------------------------------
def _gram_flops(teacher: ModelConfig, slots: int) -> float:
    """The all-experts Gram of one calibration batch: every expert on ``slots`` tokens, then [E, E] products."""
    e, d, m = teacher.moe.experts.num_experts, teacher.hidden_size, teacher.moe.experts.intermediate_size
    return len(teacher.moe_layers) * (slots * e * 3 * 2 * d * m + 2 * e * e * slots * d)


def _gather_bytes(tree, axis: str = "fsdp") -> tuple[int, int]:
    """(bytes one device receives to all-gather every leaf sharded over ``axis``, bytes of the gathered leaves it
    then reads). A reduce-scatter of the same tree moves the same bytes."""
    received = gathered = 0
    for leaf in jax.tree.leaves(tree):
        shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        spec = [a for part in leaf.sharding.spec if part is not None
                for a in (part if isinstance(part, tuple) else (part,))]
        n = leaf.sharding.mesh.shape[axis] if axis in spec else 1
        received += shard * (n - 1)
        gathered += shard * n
    return received, gathered


def _link_bandwidth(spec: MeshSpec) -> float:
    """Bytes/s per chip for the FSDP collectives: ICI within a TPU slice; on a multi-node GPU pod the slowest link
    (InfiniBand between nodes)."""
    if spec.platform == "tpu" or spec.hosts == 1 or not spec.dcn_bandwidth:
        return spec.ici_bandwidth
    return min(spec.ici_bandwidth, spec.dcn_bandwidth)


def _roofline(spec: MeshSpec, hardware_flops: float, hbm_bytes: float, collective_bytes: float) -> dict:
    times = {"compute_s": hardware_flops / (spec.chips * spec.peak_bf16_flops_per_chip),
             "hbm_s": hbm_bytes / spec.hbm_bandwidth,
             "collective_s": collective_bytes / _link_bandwidth(spec)}
    bound = max(times, key=times.get)
    return {**times, "step_s": times[bound], "bound_by": bound[:-2]}


# ---- one plan -----------------------------------------------------------------------------------------------------
def _build(model: str, stage: str, spec: MeshSpec, options: PlanOptions, mesh):
    """(program, analytic dict) of one stage on ``mesh``."""
    from m2d_jax.plan import programs

    teacher, student = _models(model, stage, options)
    if stage == "distill":
        c = _distill_config(options, teacher, mesh.shape["data"] * mesh.shape["fsdp"], spec)
        program = programs.distill_program(c, teacher, student or teacher, mesh, options.attention, spec.platform)
        tokens = c.data.batch_size * c.data.seq_len
        seq, n = c.data.seq_len, c.micro_batches
        target = student or teacher
        uses_teacher = c.objective != "lm"
        model_flops = train_flops_per_token(target, teacher if uses_teacher else None, seq,
                                            c.teacher.top_k) * tokens
        hardware = model_flops + (forward_flops_per_token(target, seq) * tokens if c.student.remat else 0.0)
        abstract = program.abstract
        t_recv, t_read = _gather_bytes(abstract["teacher"]) if uses_teacher else (0, 0)
        s_recv, s_read = _gather_bytes(abstract["params"])
        own = program.arguments["student_params"] + program.arguments["optimizer_state"]
        collective = n * (t_recv + 3 * s_recv)  # teacher gathered once, student twice (fwd, bwd) + grad scatter
        hbm = n * (t_read + 3 * s_read) + 4 * own  # gathered weights streamed; AdamW reads / writes its shards
        detail = {"tokens_per_step": tokens, "micro_batches": n, "seq_len": seq, "batch": c.data.batch_size,
                  "teacher_top_k": c.teacher.top_k, "remat": c.student.remat,
                  "teacher_dispatch": c.teacher.moe_dispatch, "objective": c.objective,
                  "attention": program.attention}
    else:
        batch = options.batch or 8
        seq = options.seq or 2048
        target = teacher if stage == "calibrate" or student is None else student
        # these steps run without an activation layout: "auto" stays on xla (m2d_jax.models.splash.attention_kernel)
        if options.attention == "splash":
            raise M2DError(f"--attention splash: the {stage} step is not traced under an activation layout, so the "
                           "kernel cannot be placed on a mesh (distill only); use auto or xla")
        runtime = programs.target_runtime(target, load_runtime(options.dtype, moe_dispatch=_dispatch(
            options.dispatch, spec), attention=options.attention), seq, None)
        if stage == "calibrate":
            if not teacher.is_moe:
                raise M2DError(f"--model {model}: a {teacher.family} model has no MoE layers to calibrate")
            program = programs.calibrate_program(teacher, runtime, mesh, batch, seq, options.num_seqs,
                                                 options.gram_tokens, options.gram_chunk)
            from m2d_jax.calibration.sampling import gram_slots

            slots = gram_slots(batch, options.num_seqs, options.gram_tokens, seq, options.gram_chunk)
            model_flops = forward_flops_per_token(teacher, seq) * batch * seq + _gram_flops(teacher, slots)
        else:
            program = programs.eval_program(target, runtime, mesh, batch, seq)
            model_flops = forward_flops_per_token(target, seq) * batch * seq
        hardware = model_flops
        recv, read = _gather_bytes(program.abstract["params"])
        collective, hbm = recv, read
        tokens = batch * seq
        detail = {"tokens_per_step": tokens, "batch": batch, "seq_len": seq, "dtype": options.dtype,
                  "model": "teacher" if target is teacher else "student", "dispatch": runtime.moe_dispatch,
                  "attention": runtime.attention}
    analytic = {"model_flops_per_step": model_flops, "hardware_flops_per_step": hardware,
                "hbm_bytes_per_chip": hbm, "collective_bytes_per_chip": collective, **detail}
    return program, analytic, teacher, student


# libtpu's refusal to compile a program that cannot fit: "... the total memory required for HLO temporaries (34.20G)
# exceeds available HBM (30.75G)." (G = GiB)
_OUT_OF_HBM = re.compile(r"Ran out of memory on HBM.*?temporaries \(([0-9.]+)([KMGT])\)")


def _out_of_hbm(program, error: Exception, seconds: float) -> dict:
    """The memory record of a program the TPU compiler refused for lack of HBM: the arguments from the shardings,
    the temporaries the compiler says it needed (so the plan reads DOES NOT FIT and the alternatives are tried)."""
    match = _OUT_OF_HBM.search(str(error))
    if match is None:
        raise error
    temporaries = int(float(match.group(1)) * 2 ** (10 * "KMGT".index(match.group(2)) + 10))
    arguments = sum(program.arguments.values())
    return {"source": "compiler (TPU AOT): refused, out of HBM", "compile_seconds": round(seconds, 1),
            "arguments": arguments, "outputs": 0, "aliased": 0, "temporaries": temporaries, "code": 0,
            "peak": arguments + temporaries}


def _memory_from_compile(program, spec: MeshSpec) -> dict:
    started = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except jax.errors.JaxRuntimeError as err:  # RESOURCE_EXHAUSTED: the compiler proves it cannot fit
        return _out_of_hbm(program, err, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    program = program_costs(text)
    if os.environ.get("M2D_PLAN_HLO_DIR"):  # keep the optimised HLO for inspection
        Path(os.environ["M2D_PLAN_HLO_DIR"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["M2D_PLAN_HLO_DIR"]) / f"{spec.name}_{time.strftime('%H%M%S')}.hlo.txt").write_text(text)
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return {"source": "compiler (TPU AOT)", "compile_seconds": round(seconds, 1),
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
            "code": int(mem.generated_code_size_in_bytes), "peak": int(peak),
            "xla_cost_analysis_flops_loops_once": float(cost.get("flops", 0.0)),
            "program": {"matmul_flops": program["matmul_flops"], "hbm_bytes": program["hbm_bytes"],
                        "collective_bytes": program["collective_bytes"],
                        "loop_trip_counts": sorted(loop["trip_count"] or 1 for loop in program["loops"]),
                        "unknown_trip_loops": len(program["unknown_trip_loops"])}}


def _memory_analytic(program, analytic: dict, model: ModelConfig, stage: str) -> dict:
    """GPU: arguments exact from the shardings; temporaries ESTIMATED as the largest gathered layer (twice: the
    next one prefetched), the layer inputs kept for the backward pass, and the loss / logits chunk buffers."""
    args = sum(program.arguments.values())
    rows = analytic["tokens_per_step"] // analytic.get("micro_batches", 1)
    shards = program.batch_shards
    tokens_dev = rows / shards
    _, read = _gather_bytes(program.abstract["params"])
    layer = 2 * read / max(model.num_layers, 1)
    saved = model.num_layers * tokens_dev * model.hidden_size * 2 * (1 if stage == "distill" else 0)
    logits = 3 * tokens_dev * min(256, analytic["seq_len"]) / analytic["seq_len"] * model.vocab_size * 4
    temps = int(layer + saved + logits)
    return {"source": "analytic ESTIMATE, not compiled", "arguments": args, "outputs": 0,
            "aliased": 0, "temporaries": temps, "code": 0, "peak": args + temps}


def _mesh_for(spec: MeshSpec, options: PlanOptions, use_compiler: bool):
    from m2d_jax.distill.sharding import MESH_AXES, make_mesh

    sizes = spec.axis_sizes(**options.axes)
    if use_compiler:
        return make_mesh(sizes, spec.topology_devices()), sizes
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES), sizes


def plan_once(model: str, stage: str, mesh: str | MeshSpec, options: PlanOptions = PlanOptions(),
              analytic: bool = False) -> dict:
    """One plan (no search): memory per chip, FITS / DOES NOT FIT, FLOPs and the step-time ESTIMATE. ``analytic``:
    do not compile a TPU mesh either (GPU meshes always are analytic)."""
    if stage not in STAGES:
        raise M2DError(f"--stage {stage!r}: expected one of {STAGES}")
    spec = mesh if isinstance(mesh, MeshSpec) else load_mesh_config(mesh)
    _models(model, stage, options)  # bad --model / --groups fail before libtpu starts
    use_compiler = spec.platform == "tpu" and not analytic
    jax_mesh, sizes = _mesh_for(spec, options, use_compiler)
    program, analytic, teacher, student = _build(model, stage, spec, options, jax_mesh)
    memory = (_memory_from_compile(program, spec) if use_compiler
              else _memory_analytic(program, analytic, student or teacher, stage))
    hbm = spec.hbm_bytes_per_chip
    free = hbm - memory["peak"]
    compiled = memory.pop("program", None)
    if compiled is not None:  # the compiled program's own matmul FLOPs and traffic, with loop trip counts
        roof = _roofline(spec, compiled["matmul_flops"] * spec.chips, compiled["hbm_bytes"],
                         compiled["collective_bytes"]["total"])
        source = "compiled program (HLO, loop trip counts)"
    else:
        roof = _roofline(spec, analytic["hardware_flops_per_step"], analytic["hbm_bytes_per_chip"],
                         analytic["collective_bytes_per_chip"])
        source = "analytic"
    mfu = analytic["model_flops_per_step"] / (roof["step_s"] * spec.chips * spec.peak_bf16_flops_per_chip)
    return {
        "model": str(model), "stage": stage, "mesh": spec.name, "topology": spec.topology, "platform": spec.platform,
        "chips": spec.chips, "hosts": spec.hosts, "axes": sizes,
        "per_chip": {**{k: int(v) for k, v in program.arguments.items()}, **memory, "hbm": hbm, "free": int(free),
                     "free_fraction": free / hbm},
        "fits": free >= 0, "fits_with_margin": free >= FREE_MARGIN * hbm,
        "flops": {"model_per_step": analytic["model_flops_per_step"],
                  "analytic_hardware_per_step": analytic["hardware_flops_per_step"],
                  "compiled_matmul_per_step": None if compiled is None else compiled["matmul_flops"] * spec.chips,
                  "xla_cost_analysis_per_step_loops_once":
                      memory.pop("xla_cost_analysis_flops_loops_once", 0.0) * spec.chips},
        "compiled": compiled,
        "analytic": {"hbm_bytes_per_chip": analytic["hbm_bytes_per_chip"],
                     "collective_bytes_per_chip": analytic["collective_bytes_per_chip"]},
        "estimate": {"label": f"ESTIMATE (roofline from the {source}, perfect overlap)", **roof, "mfu": mfu,
                     "tokens_per_s": analytic["tokens_per_step"] / roof["step_s"]},
        "config": {k: v for k, v in analytic.items() if not k.endswith(("flops_per_step", "_per_chip"))},
        "student_params": None if student is None else _count(student),
        "teacher_params": _count(teacher),
    }


def _count(config: ModelConfig) -> int:
    from m2d_jax.info import summarize

    return summarize(config)["total_params"]


def _alternatives(stage: str, spec: MeshSpec, options: PlanOptions, result: dict):
    """What might fit instead, cheapest change first: more micro-batches (distill) or a smaller batch, remat,
    a tensor axis, then the next larger mesh of the same chip."""
    if stage == "distill":
        n = result["config"]["micro_batches"]
        for factor in (2, 4):
            yield f"--micro-batches {n * factor}", spec, options.replace(micro_batches=n * factor)
        if not result["config"]["remat"]:
            yield "--remat", spec, options.replace(remat=True)
    else:
        batch = result["config"]["batch"]
        if batch > 1:
            yield f"--batch {max(1, batch // 4)}", spec, options.replace(batch=max(1, batch // 4))
    for tensor in (2, 4):
        if spec.chips % tensor == 0 and options.axes.get("tensor", 1) < tensor:
            yield f"--tensor {tensor}", spec, options.replace(axes={**options.axes, "tensor": tensor, "fsdp": -1})
    family = spec.name.split("-")[0]
    larger = sorted((load_mesh_config(n) for n in mesh_names() if n.split("-")[0] == family),
                    key=lambda s: s.chips)
    for other in larger:
        if other.chips > spec.chips and other.platform == spec.platform:
            yield f"--mesh {other.name}", other, options
            break


def plan(model: str, stage: str, mesh: str, options: PlanOptions = PlanOptions(), suggest: bool = True,
         max_tries: int = 4, analytic: bool = False) -> dict:
    """``plan_once`` and, when it does not fit, the first alternative that does (each tried by compiling it)."""
    result = plan_once(model, stage, mesh, options, analytic)
    result["suggestion"] = None
    if result["fits"] or not suggest:
        return result
    spec = load_mesh_config(mesh)
    tried = []
    for change, other_spec, other_options in _alternatives(stage, spec, options, result):
        if len(tried) >= max_tries:
            break
        try:
            other = plan_once(model, stage, other_spec, other_options, analytic)
        except MeshError as err:  # e.g. the batch no longer divides the mesh
            tried.append({"change": change, "error": str(err)})
            continue
        tried.append({"change": change, "fits": other["fits"], "peak": other["per_chip"]["peak"],
                      "free_fraction": other["per_chip"]["free_fraction"]})
        if other["fits"]:
            result["suggestion"] = {"change": change, "plan": other}
            break
    result["tried"] = tried
    return result


# ---- output --------------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2 ** 30:8.2f} GiB"


def format_plan(result: dict) -> str:
    p, e, f = result["per_chip"], result["estimate"], result["flops"]
    cfg = result["config"]
    lines = [f"{result['stage']} of {result['model']} on {result['mesh']} ({result['topology']}, {result['chips']} "
             f"chips, {result['hosts']} hosts), mesh axes {result['axes']}",
             "  " + ", ".join(f"{k}={v}" for k, v in cfg.items()),
             f"per chip ({p['source']}):"]
    for key in ("teacher_params", "model_params", "student_params", "optimizer_state", "batch"):
        if key in p:
            lines.append(f"  {key:<22}{_gib(p[key])}")
    for key in ("arguments", "outputs", "aliased", "temporaries", "peak", "hbm"):
        lines.append(f"  {key:<22}{_gib(p[key])}")
    lines.append(f"  {'free':<22}{_gib(p['free'])} ({100 * p['free_fraction']:.1f}%)  ->  "
                 f"{'FITS' if result['fits'] else 'DOES NOT FIT'}"
                 f"{'' if result['fits_with_margin'] or not result['fits'] else ' (less than 10% free)'}")
    lines.append(f"FLOPs per step: model {f['model_per_step']:.3e} (analytic)" + (
        f", analytic hardware {f['analytic_hardware_per_step']:.3e} (+ remat)" if f["compiled_matmul_per_step"] is None
        else f", compiled matmuls {f['compiled_matmul_per_step']:.3e} (HLO with loop trip counts; XLA cost_analysis, "
             f"each loop body once: {f['xla_cost_analysis_per_step_loops_once']:.3e})"))
    lines.append(f"{e['label']}: step {e['step_s']:.3f} s (compute {e['compute_s']:.3f}, HBM {e['hbm_s']:.3f}, "
                 f"collectives {e['collective_s']:.3f}; bound by {e['bound_by']}), {e['tokens_per_s']:.0f} tokens/s, "
                 f"MFU {100 * e['mfu']:.1f}%")
    if not result["fits"]:
        s = result.get("suggestion")
        tried = ", ".join(t["change"] for t in result.get("tried", []))
        lines.append(f"would fit: {s['change']} (peak {_gib(s['plan']['per_chip']['peak']).strip()}, "
                     f"{100 * s['plan']['per_chip']['free_fraction']:.1f}% free)" if s else
                     f"nothing tried fits ({tried or 'no alternatives'})")
    return "\n".join(lines)


__all__ = ["DEFAULT_DISTILL_CONFIG", "PlanOptions", "STAGES", "format_plan", "plan", "plan_once"]
