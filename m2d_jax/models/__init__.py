"""Flax NNX models: one decoder (``CausalLM``) configured by ``ModelConfig`` for every family."""

from m2d_jax.models.config import ModelConfig
from m2d_jax.models.decoder import CausalLM, DecodeCache, DecoderLayer
from m2d_jax.models.moe import ExpertWeights, MoEView, Routing, all_expert_outputs, expert_ffn, expert_outputs

__all__ = ["CausalLM", "DecodeCache", "DecoderLayer", "ExpertWeights", "ModelConfig", "MoEView", "Routing",
           "all_expert_outputs", "expert_ffn", "expert_outputs", "abstract_model",
           "with_config"]


def abstract_model(config: ModelConfig) -> CausalLM:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves: no memory, no compute."""
    from flax import nnx

    return nnx.eval_shape(lambda: CausalLM(config, nnx.Rngs(0)))


def with_config(model: CausalLM, **changes) -> CausalLM:
    """The same parameters under a config that changes only runtime fields (dispatch, remat, compute dtype...)."""
    from flax import nnx

    new = abstract_model(model.config.replace(**changes))
    graphdef, _ = nnx.split(new)
    return nnx.merge(graphdef, nnx.state(model))
