"""Build the dense student (or the random-FFN baseline) from a teacher and per-layer plans.

Family differences are data: a ``StudentRule`` per teacher family says where the teacher's routed experts, shared
experts and dense FFNs live in a layer's parameter tree, where the student's dense FFN goes, how the router
normalises its weights (for DP scaling) and how the student config is derived. Everything that is not an FFN
(embeddings, attention, norms, LM head) is copied from the teacher leaf with the same path, layer by layer, so a
teacher with several scanned stacks (MoE and dense runs) becomes a student with its own stacks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from m2d_jax.convert.dense import DenseFFN, LayerPlan, concat_experts, pad_ffn, scale_output
from m2d_jax.models import CausalLM, ExpertWeights, ModelConfig, MoESpec, abstract_model

log = logging.getLogger(__name__)

Path = tuple[str, ...]  # a parameter path relative to one decoder layer, e.g. ("moe", "gate_proj")


@dataclasses.dataclass(frozen=True)
class StudentRule:
    """How one teacher family becomes its dense student.

    Path maps go from a ``DenseFFN`` / ``ExpertWeights`` field name (gate, up, down, gate_bias, up_bias, down_bias) to
    a layer-relative parameter path; a field absent from a map is absent in that family (e.g. no biases).
    """
    student_config: Callable[[ModelConfig, int], ModelConfig]  # (teacher config, FFN width) -> student config
    expert_paths: dict[str, Path]  # routed experts of an MoE layer, leaves [E, ...] per layer
    dense_paths: dict[str, Path]  # the FFN of a teacher's dense (non-MoE) layer
    student_paths: dict[str, Path]  # the student's dense FFN; a leaf may carry extra unit axes (1-expert form)
    shared_paths: dict[str, Path] = dataclasses.field(default_factory=dict)  # always-on shared experts (c = 1)
    # student leaves set to zero (GPT-OSS's kept 1-expert router: softmax over one logit is 1 whatever it is)
    zero_paths: tuple[Path, ...] = ()
    # True: the teacher's routing weights sum to 1 per token (normalised top-k); False: un-normalised (rho * p)
    normalized_router: Callable[[ModelConfig], bool] = lambda config: True
    # "routing_mass": uniform c = E[sum w] / k; "conditional_prob": c_g = rho * CP_g (released DeepSeek students)
    uniform_rule: str = "routing_mass"

    def routed_scaling_factor(self, config: ModelConfig) -> float:
        return float(config.moe.router.routed_scaling_factor)

    def shared_width(self, config: ModelConfig) -> int:
        return config.moe.experts.shared_size if self.shared_paths else 0

    def student_width(self, config: ModelConfig, k: int) -> int:
        """FFN width of the student: k * m + m_s (docs/METHOD.md §9)."""
        return k * config.moe.experts.intermediate_size + self.shared_width(config)


def _all_dense(teacher: ModelConfig, width: int, family: str | None = None) -> ModelConfig:
    """Every layer a dense FFN of ``width``; router, experts and shared experts removed (``moe=None``)."""
    return teacher.replace(family=family or teacher.family, ffn=teacher.ffn.replace(intermediate_size=width),
                           ffn_kinds=("dense",) * teacher.num_layers, moe=None)


def _llama(teacher: ModelConfig, width: int) -> ModelConfig:
    """FlexOlmo pre-norm variants -> Llama: all dense, Llama's RMSNorm (weight applied after the cast back)."""
    return _all_dense(teacher, width, "llama").replace(norm=teacher.norm.replace(weight_in_float32=False))


def _one_expert(teacher: ModelConfig, width: int) -> ModelConfig:
    """GPT-OSS student form (docs/METHOD.md §9): every layer one routed expert of ``width``, top-1, the router kept."""
    moe = MoESpec(router=teacher.moe.router.replace(top_k=1),
                  experts=teacher.moe.experts.replace(num_experts=1, intermediate_size=width))
    return teacher.replace(ffn=teacher.ffn.replace(intermediate_size=width), ffn_kinds=("moe",) * teacher.num_layers,
                           moe=moe)


def _named(prefix: Path, names=("gate", "up", "down"), leaf: tuple = ()) -> dict[str, Path]:
    return {n: prefix + (f"{n}_proj",) + leaf for n in names}


_SWIGLU_DENSE = _named(("mlp",), leaf=("kernel",))
_EXPERTS = _named(("moe",))
_EXPERT_BIASES = {f"{n}_bias": ("moe", f"{n}_bias") for n in ("gate", "up", "down")}

STUDENT_RULES: dict[str, StudentRule] = {
    # Qwen3-MoE -> plain Qwen3 (Qwen3ForCausalLM); normalised iff norm_topk_prob
    "qwen3_moe": StudentRule(
        student_config=lambda teacher, width: _all_dense(teacher, width, "qwen3"),
        expert_paths=_EXPERTS, dense_paths=_SWIGLU_DENSE, student_paths=_SWIGLU_DENSE,
        normalized_router=lambda config: config.moe.router.norm_topk_prob),
    # DeepSeek-V2: all layers dense of width k*m + m_s (layer 0 zero-padded), shared experts appended with c = 1,
    # un-normalised router (rho * p), released students scale routed groups by rho * CP_g
    "deepseek_v2": StudentRule(
        student_config=_all_dense, expert_paths=_EXPERTS, dense_paths=_SWIGLU_DENSE, student_paths=_SWIGLU_DENSE,
        shared_paths=_named(("moe", "shared"), leaf=("kernel",)), normalized_router=lambda config: False,
        uniform_rule="conditional_prob"),
    # GPT-OSS: a 1-expert GptOss (router kept, zeroed), expert biases merged (down biases summed with the scales)
    "gpt_oss": StudentRule(
        student_config=_one_expert, expert_paths={**_EXPERTS, **_EXPERT_BIASES},
        dense_paths={}, student_paths={**_EXPERTS, **_EXPERT_BIASES},
        zero_paths=(("moe", "router"), ("moe", "router_bias"))),
    # FlexOlmo -> OLMo2 (same post-norm layers and full q/k norm); normalised iff norm_topk_prob
    "flex_olmo": StudentRule(
        student_config=lambda teacher, width: _all_dense(teacher, width, "olmo2"), expert_paths=_EXPERTS,
        dense_paths=_SWIGLU_DENSE, student_paths=_SWIGLU_DENSE,
        normalized_router=lambda config: config.moe.router.norm_topk_prob),
    # FlexOlmo pre-norm variants -> Llama; the shared expert is appended with its own weight (experts.shared_scale:
    # 1 for the router's always-on last expert, 1/(k+1) for shared_mlp), routed groups carry rho = k/(k+1) in the
    # second through their DP scales
    **{family: StudentRule(
        student_config=_llama, expert_paths=_EXPERTS, dense_paths=_SWIGLU_DENSE, student_paths=_SWIGLU_DENSE,
        shared_paths=_named(("moe", "shared"), leaf=("kernel",)),
        normalized_router=lambda config: config.moe.router.norm_topk_prob)
       for family in ("flex_olmo_noqknorm_prenorm", "flex_olmo_noqknorm_prenorm_shared")},
    # OLMoE and Mixtral: no dense class shares their attention exactly (OLMoE's full q/k norm, clip_qkv), so the
    # student is the same class with one expert (softmax over one logit = 1), like GPT-OSS
    **{family: StudentRule(
        student_config=_one_expert, expert_paths=_EXPERTS, dense_paths={}, student_paths=_EXPERTS,
        zero_paths=(("moe", "router"),), normalized_router=lambda config: config.moe.router.norm_topk_prob)
       for family in ("olmoe", "mixtral")},
}


def student_rule(family: str) -> StudentRule:
    if family not in STUDENT_RULES:
        raise ValueError(f"no MoE -> dense student rule for family {family!r} "
                         f"(supported teachers: {', '.join(sorted(STUDENT_RULES))})")
    return STUDENT_RULES[family]


class TeacherLayers:
    """Per-global-layer access to a model's stacked layer parameters: ``get(layer, path) -> array`` (or None)."""

    def __init__(self, model: CausalLM):
        self.config = model.config
        state = nnx.state(model, nnx.Param)
        self.leaves = {tuple(k): v.get_value() for k, v in state.flat_state()}
        self._where = {}
        for s, (kind, start, num) in enumerate(self.config.stacks):
            for local in range(num):
                self._where[start + local] = (s, local, kind)

    def kind(self, layer: int) -> str:
        return self._where[layer][2]

    def get(self, layer: int, path: Path):
        s, local, _ = self._where[layer]
        key = ("stacks", s) + tuple(path)
        if key not in self.leaves:
            return None
        return self.leaves[key][local]

    def ffn(self, layer: int, paths: dict[str, Path], cls):
        values = {}
        for name, path in paths.items():
            value = self.get(layer, path)
            if value is None:
                raise ValueError(f"teacher layer {layer} has no parameter {'/'.join(path)} "
                                 f"(expected by the {self.config.family} student rule)")
            values[name] = value
        return cls(**values)


def student_ffns(teacher: CausalLM, plans: dict[int, LayerPlan], rule: StudentRule, width: int,
                 progress: bool = True):
    """Yields (layer, DenseFFN float32 of ``width``) for every layer: MoE layers merged/scaled/concatenated per
    ``plans[layer]``, dense layers copied and zero-padded."""
    layers = TeacherLayers(teacher)
    config = teacher.config
    for layer in tqdm(range(config.num_layers), desc="concatenate experts", disable=not progress):
        if layers.kind(layer) == "moe":
            plan = plans[layer]
            used = np.flatnonzero(plan.alpha.any(axis=0))  # the K selected experts: only these are read
            experts = layers.ffn(layer, rule.expert_paths, ExpertWeights)
            experts = ExpertWeights(*(None if x is None else x[used] for x in experts))
            shared = None
            if rule.shared_paths:
                shared = scale_output(layers.ffn(layer, rule.shared_paths, DenseFFN), config.moe.experts.shared_scale)
            ffn = concat_experts(experts, jnp.asarray(plan.alpha[:, used], jnp.float32),
                                 jnp.asarray(plan.scales, jnp.float32), shared)
        else:
            ffn = layers.ffn(layer, rule.dense_paths, DenseFFN)
        yield layer, pad_ffn(ffn, width, f"teacher layer {layer} ({layers.kind(layer)})")


def random_ffns(config: ModelConfig, rule: StudentRule, width: int, seed: int = 0, std: float = 0.02):
    """Yields (layer, DenseFFN) with weights ~ normal(0, std) and zero biases (docs/METHOD.md §10)."""
    key = jax.random.key(seed)
    d = config.hidden_size
    shapes = {"gate": (d, width), "up": (d, width), "down": (width, d), "gate_bias": (width,), "up_bias": (width,),
              "down_bias": (d,)}
    for layer in range(config.num_layers):
        key, *subkeys = jax.random.split(key, 4)
        fields = {}
        for name in rule.student_paths:
            if name.endswith("bias"):
                fields[name] = jnp.zeros(shapes[name], jnp.float32)
            else:
                fields[name] = std * jax.random.normal(subkeys[("gate", "up", "down").index(name)], shapes[name])
        yield layer, DenseFFN(**{"gate_bias": None, "up_bias": None, "down_bias": None, **fields})


def assemble_student(teacher: CausalLM, student_config: ModelConfig, ffns, rule: StudentRule) -> CausalLM:
    """The student model: FFN leaves from ``ffns`` ((layer, DenseFFN) pairs), every other leaf copied from the
    teacher leaf of the same path (per layer for stacked leaves), in the teacher's parameter dtype and runtime
    (routing at the student's own top-k)."""
    started = time.perf_counter()
    runtime = teacher.runtime.replace(top_k=0)
    graphdef, abs_state = nnx.split(abstract_model(student_config, runtime))
    abs_vars = {tuple(k): v for k, v in abs_state.flat_state()}
    teacher_layers = TeacherLayers(teacher)
    ffn_fields = {path: name for name, path in rule.student_paths.items()}
    by_layer: dict[int, DenseFFN] = {}
    for layer, ffn in ffns:  # cast as they come: peak memory is the student plus one float32 FFN
        by_layer[layer] = DenseFFN(*(None if a is None else a.astype(runtime.param_dtype) for a in ffn))
    values = {}
    for path, var in abs_vars.items():
        target = var.get_value()
        if path[0] == "stacks":
            s, rel = path[1], tuple(path[2:])
            _, start, num = student_config.stacks[s]
            per_layer = []
            for layer in range(start, start + num):
                if rel in rule.zero_paths:
                    value = jnp.zeros(target.shape[1:], target.dtype)
                    where = f"zeroed {'/'.join(rel)}"
                elif rel in ffn_fields:
                    value = getattr(by_layer[layer], ffn_fields[rel])
                    where = f"student FFN {ffn_fields[rel]} of layer {layer}"
                else:
                    value = teacher_layers.get(layer, rel)
                    where = f"teacher parameter {'/'.join(rel)} of layer {layer}"
                if value is None:
                    raise ValueError(f"the {student_config.family} student needs {where}, which does not exist")
                if int(np.prod(value.shape)) != int(np.prod(target.shape[1:])):
                    raise ValueError(f"{where} has shape {tuple(value.shape)}, the student expects "
                                     f"{tuple(target.shape[1:])}")
                per_layer.append(jnp.reshape(value, target.shape[1:]))
            array = jnp.stack(per_layer)
        else:
            array = teacher_layers.leaves.get(path)
            if array is None or array.shape != target.shape:
                raise ValueError(f"teacher parameter {'/'.join(map(str, path))} is missing or has shape "
                                 f"{None if array is None else array.shape}, the student expects {target.shape}")
        values[path] = var.replace(jnp.asarray(array, target.dtype))
    student = nnx.merge(graphdef, nnx.State.from_flat_path(values))
    log.info("assembled %s student (%d layers, FFN width %d) in %.1fs", student_config.family,
             student_config.num_layers, student_config.ffn.intermediate_size, time.perf_counter() - started)
    return student


def build_dense_student(teacher: CausalLM, plans: dict[int, LayerPlan], k: int, progress: bool = True) -> CausalLM:
    """The dense student of ``teacher``: ``plans[layer]`` (for every MoE layer) gives its k groups and scales."""
    config = teacher.config
    rule = student_rule(config.family)
    moe_layers = config.moe_layers
    missing = [i for i in moe_layers if i not in plans]
    if missing:
        raise ValueError(f"no conversion plan for MoE layer(s) {missing}")
    for i in moe_layers:
        if len(plans[i].groups) != k:
            raise ValueError(f"plan of layer {i} has {len(plans[i].groups)} groups, expected k={k}")
    width = rule.student_width(config, k)
    student_config = rule.student_config(config, width)
    return assemble_student(teacher, student_config, student_ffns(teacher, plans, rule, width, progress), rule)


def build_random_ffn_student(teacher: CausalLM, k: int, seed: int = 0) -> CausalLM:
    """Random-FFN baseline (docs/METHOD.md §10): the student architecture with the teacher's embeddings, attention,
    norms and LM head, and a freshly initialised FFN (normal(0, 0.02), biases 0)."""
    config = teacher.config
    rule = student_rule(config.family)
    width = rule.student_width(config, k)
    student_config = rule.student_config(config, width)
    return assemble_student(teacher, student_config, random_ffns(student_config, rule, width, seed), rule)
