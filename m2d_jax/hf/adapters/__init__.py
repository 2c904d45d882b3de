"""Family adapters: the small declarative difference between HF families.

An adapter (a ``DecoderAdapter``, the interface a new family implements) turns a raw ``config.json`` dict into a
``ModelConfig`` and back (``config_from_hf`` / ``config_to_hf``) and lists the key-map rules of its on-disk layout(s)
(``global_rules``, ``layer_rules(config, kind, expert_layout)``; ``expert_layouts[0]`` is the hub layout that export
writes). Raw JSON is parsed (not through transformers' config classes) so that import never loads
torch; missing keys take the defaults of the transformers config class, and both hub-style (``rope_theta`` /
``rope_scaling``, ``num_experts``) and transformers-v5 (``rope_parameters``, ``num_local_experts``) names are read.
"""

from m2d_jax.hf.adapters.common import IGNORED_KEY_SUFFIXES, DecoderAdapter
from m2d_jax.hf.adapters.deepseek_v2 import DeepseekV2Adapter
from m2d_jax.hf.adapters.flex_olmo import FlexOlmoAdapter, FlexOlmoPrenormAdapter
from m2d_jax.hf.adapters.gpt_oss import GptOssAdapter
from m2d_jax.hf.adapters.olmoe import OlmoeMixtralAdapter
from m2d_jax.hf.adapters.qwen3 import Qwen3Adapter
from m2d_jax.errors import CheckpointError

ADAPTERS = {t: a for a in (Qwen3Adapter(), DeepseekV2Adapter(), GptOssAdapter(), OlmoeMixtralAdapter(),
                           FlexOlmoAdapter(), FlexOlmoPrenormAdapter())
            for t in a.model_types}


def adapter_for(model_type: str | None, source: str) -> DecoderAdapter:
    if model_type not in ADAPTERS:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r} "
                              f"(supported: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "DecoderAdapter", "IGNORED_KEY_SUFFIXES", "adapter_for"]
