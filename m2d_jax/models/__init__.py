"""Flax NNX models: one decoder (``CausalLM``) for every family, built from an architecture (``ModelConfig``) and a
runtime (``RuntimeConfig``)."""

from m2d_jax.models.config import (AttentionSpec, ExpertsSpec, FFNSpec, MLASpec, ModelConfig, MoESpec, NormSpec,
                                   RopeSpec, RouterSpec, RuntimeConfig, load_runtime)
from m2d_jax.models.decoder import CausalLM, DecodeCache, DecoderLayer
from m2d_jax.models.moe import ExpertWeights, MoEView, Routing, all_expert_outputs, expert_ffn, expert_outputs

__all__ = ["AttentionSpec", "CausalLM", "DecodeCache", "DecoderLayer", "ExpertWeights", "ExpertsSpec", "FFNSpec",
           "MLASpec", "ModelConfig", "MoESpec", "MoEView", "NormSpec", "RopeSpec", "RouterSpec", "Routing",
           "RuntimeConfig", "abstract_model", "all_expert_outputs", "expert_ffn", "expert_outputs", "load_runtime",
           "with_runtime"]


def abstract_model(config: ModelConfig, runtime: RuntimeConfig | None = None) -> CausalLM:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves: no memory, no compute."""
    from flax import nnx

    return nnx.eval_shape(lambda: CausalLM(config, runtime, nnx.Rngs(0)))


def with_runtime(model: CausalLM, **changes) -> CausalLM:
    """The same parameters (and architecture) under a runtime with ``changes`` (``RuntimeConfig`` fields: dispatch,
    remat, compute dtype, top_k...). ``param_dtype`` cannot change here: the parameters are not cast."""
    from flax import nnx

    runtime = model.runtime.replace(**changes)
    if runtime.param_dtype != model.runtime.param_dtype:
        raise ValueError(f"with_runtime cannot change param_dtype ({model.runtime.param_dtype} -> "
                         f"{runtime.param_dtype}): load the model with that dtype instead")
    graphdef, _ = nnx.split(abstract_model(model.config, runtime))
    return nnx.merge(graphdef, nnx.state(model))
