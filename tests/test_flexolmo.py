"""The FlexOlmo family: stock FlexOlmo against transformers' ``FlexOlmoForCausalLM``, and the EMO / StdMoE pre-norm,
no-q/k-norm variants against transformers' own modules composed into their structure (float32, max |dlogit| <= 1e-4,
padded batches); KV-cache decoding; conversion exactness through the HF export to OLMo2 / Llama.

The variants' oracle: a ``LlamaForCausalLM`` (pre-norm layers, no q/k norm, rotate-half RoPE) whose decoder layers'
``mlp`` is replaced by a sparse-MoE block built here from transformers' ``LlamaMLP`` experts, a ``torch.nn.Linear``
router and the variant's routing as docs/METHOD.md §1 states it (split softmaxes over routed / shared logits; or a
separate shared MLP mixed as shared/(k+1) + routed * k/(k+1)). It is saved with the fork's config.json fields and key names,
so the adapter reads it as it reads a user's checkpoint.
"""

import copy
import json

import numpy as np
import pytest

import m2d_jax
from m2d_jax.errors import CheckpointError
from m2d_jax.hf.oracle import load_reference, make_hf_checkpoint, padded_batch, reference_logits

TOL = 1e-4

# stock FlexOlmo: E = 5 (not a power of two), top-3 (odd), GQA 4/2, head_dim 12 != 48/4, un-normalised, untied
FLEX_OLMO = dict(model_type="flex_olmo", vocab_size=96, hidden_size=48, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=5, num_experts_per_tok=3,
                 norm_topk_prob=False, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=1, bos_token_id=None)

# the fork's config.json fields (flex_olmo_noqknorm_prenorm): 8 router experts of which the last is shared, top-4
# (3 routed + 1 shared), GQA 4/2, attention biases, a dense first layer (per-layer counts), tied embeddings
PRENORM = dict(model_type="flex_olmo_noqknorm_prenorm", architectures=["FlexOlmoNoQKNormPrenormForCausalLM"],
               vocab_size=96, hidden_size=48, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6,
               rope_theta=500000.0, attention_bias=True, tie_word_embeddings=True, num_experts=8,
               num_shared_experts=1, num_experts_per_tok=4, norm_topk_prob=False,
               num_experts_per_layer=[0, 8, 8], num_shared_experts_per_layer=[0, 1, 1], dense_intermediate_size=40)
# per-layer expert counts (docs/METHOD.md §1): MoE layers of 7 and 5 routed experts (router counts 8 and 6, the last
# one shared), padded to 7, top-3 = 2 routed + 1 shared; and without a shared expert: 5 then 7, top-2 renormalised
PERLAYER = dict(PRENORM, num_experts_per_tok=3, num_experts_per_layer=[0, 8, 6])
PERLAYER_NOSHARED = dict(PRENORM, num_experts=7, num_shared_experts=0, num_experts_per_tok=2, norm_topk_prob=True,
                         num_experts_per_layer=[0, 5, 7], num_shared_experts_per_layer=[0, 0, 0])
VARIANTS = {"prenorm": PRENORM, "prenorm_shared": None, "perlayer": PERLAYER, "perlayer_noshared": PERLAYER_NOSHARED}
# flex_olmo_noqknorm_prenorm_shared: 7 routed experts, top-3 renormalised, a shared_mlp of width 20, untied
PRENORM_SHARED = dict(model_type="flex_olmo_noqknorm_prenorm_shared",
                      architectures=["FlexOlmoNoQKNormPrenormSharedForCausalLM"], vocab_size=96, hidden_size=48,
                      intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
                      attention_bias=False, tie_word_embeddings=False, num_experts=7, num_experts_per_tok=3,
                      norm_topk_prob=True, shared_expert_intermediate_size=20)
VARIANTS["prenorm_shared"] = PRENORM_SHARED


# ---- the composed oracle for the pre-norm variants -----------------------------------------------------------
def _with_width(llama_config, width: int):
    out = copy.deepcopy(llama_config)
    out.intermediate_size = width
    return out


def _variant_moe_class():
    import torch
    from transformers.models.llama.modeling_llama import LlamaMLP

    class VariantMoE(torch.nn.Module):
        """Routing as docs/METHOD.md §1 states it, on transformers' LlamaMLP experts. ``shared`` (prenorm): the last s
        router experts, own softmax; ``shared_width`` (prenorm_shared): a separate MLP, y = shared/(k+1) +
        routed*k/(k+1)."""

        def __init__(self, llama_config, num_experts, top_k, norm_topk_prob, shared=0, shared_width=0):
            super().__init__()
            self.num_experts, self.top_k, self.norm, self.shared = num_experts, top_k, norm_topk_prob, shared
            self.gate = torch.nn.Linear(llama_config.hidden_size, num_experts, bias=False)
            self.experts = torch.nn.ModuleList([LlamaMLP(llama_config) for _ in range(num_experts)])
            if shared_width:
                self.shared_mlp = LlamaMLP(_with_width(llama_config, shared_width))

        def forward(self, hidden):
            b, t, d = hidden.shape
            x = hidden.reshape(-1, d)
            logits = self.gate(x)  # [T, E]
            s = self.shared
            routed_p = torch.softmax(logits[:, :self.num_experts - s].float(), dim=-1)
            weights, index = torch.topk(routed_p, self.top_k - s, dim=-1)
            if self.norm:
                weights = weights / weights.sum(-1, keepdim=True)
            if s:
                shared_p = torch.softmax(logits[:, self.num_experts - s:].float(), dim=-1)
                shared_w, shared_i = torch.topk(shared_p, s, dim=-1)
                weights = torch.cat([weights, shared_w], 1)
                index = torch.cat([index, shared_i + self.num_experts - s], 1)
            out = torch.zeros_like(x)
            for slot in range(index.shape[1]):
                for e in range(self.num_experts):
                    rows = index[:, slot] == e
                    if rows.any():
                        out[rows] += weights[rows, slot, None].to(x.dtype) * self.experts[e](x[rows])
            if hasattr(self, "shared_mlp"):
                k = self.top_k
                out = self.shared_mlp(x) / (k + 1) + out * (k / (k + 1))
            return out.reshape(b, t, d)

    return VariantMoE


def make_variant_checkpoint(fork_config: dict, out, seed: int = 0, std: float = 0.1, edit=None):
    """The composed oracle model (returned) and its checkpoint in the fork's layout under ``out``; ``edit(model)``
    changes the random parameters (under ``torch.no_grad``) before they are saved."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaMLP

    c = fork_config
    layers = c["num_hidden_layers"]
    llama_config = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        attention_bias=c["attention_bias"], tie_word_embeddings=c["tie_word_embeddings"], pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config).eval()
    moe = _variant_moe_class()
    shared_variant = c["model_type"].endswith("_shared")
    experts_per_layer = c.get("num_experts_per_layer") or [c["num_experts"]] * layers
    for i, layer in enumerate(model.model.layers):
        if not experts_per_layer[i]:
            layer.mlp = LlamaMLP(_with_width(llama_config, c["dense_intermediate_size"]))
        elif shared_variant:
            layer.mlp = moe(llama_config, c["num_experts"], c["num_experts_per_tok"], c["norm_topk_prob"],
                            shared_width=c["shared_expert_intermediate_size"])
        else:
            layer.mlp = moe(llama_config, experts_per_layer[i], c["num_experts_per_tok"], c["norm_topk_prob"],
                            shared=c["num_shared_experts_per_layer"][i])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(1.0)
        if edit is not None:
            edit(model)
    model = model.eval()
    renames = {"input_layernorm": "pre_attention_layernorm", "post_attention_layernorm": "pre_feedforward_layernorm"}
    tensors = {}
    for key, value in model.state_dict().items():
        if c["tie_word_embeddings"] and key == "lm_head.weight":
            continue
        for old, new in renames.items():
            key = key.replace(f".{old}.", f".{new}.")
        tensors[key] = value.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(fork_config))
    return model


def _max_diff(got, want, mask):
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(got, np.float32) - want)[valid].max())


@pytest.fixture(scope="module")
def flex_olmo_dir(tmp_path_factory):
    return make_hf_checkpoint(FLEX_OLMO, tmp_path_factory.mktemp("flex") / "flex_olmo", seed=2, init_std=0.1)


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """name -> (checkpoint dir, oracle model), built once per module."""
    cache = {}

    def build(name):
        if name not in cache:
            out = tmp_path_factory.mktemp("variant") / name
            cache[name] = out, make_variant_checkpoint(VARIANTS[name], out, seed=len(name))
        return cache[name]

    return build


# ---- parity ----------------------------------------------------------------------------------------------------
def test_stock_flex_olmo_matches_transformers(flex_olmo_dir):
    model = m2d_jax.from_pretrained(flex_olmo_dir)
    c = model.config
    assert c.family == "flex_olmo" and c.norm.placement == "post" and c.attention.qk_norm == "full"
    assert c.moe.experts.num_experts == 5 and c.moe.router.top_k == 3 and c.rope.theta == 500000.0
    ids, mask = padded_batch(c.vocab_size, batch=3, seq=17, seed=1)
    want = reference_logits(flex_olmo_dir, ids, mask)
    assert np.abs(want).max() > 0.5
    assert _max_diff(model(ids, mask), want, mask) <= TOL


def _unmasked(model):
    """The same parameters read as if every padded expert were real (no per-layer counts): the negative control
    of the padding mask."""
    from flax import nnx

    c = model.config
    unpadded = c.replace(moe=c.moe.replace(experts=c.moe.experts.replace(num_experts_per_layer=())))
    graphdef, _ = nnx.split(m2d_jax.models.abstract_model(unpadded, model.runtime))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("name", ["prenorm", "prenorm_shared", "perlayer", "perlayer_noshared"])
def test_prenorm_variants_match_composed_oracle(variant, name):
    import torch

    path, oracle = variant(name)
    model = m2d_jax.from_pretrained(path)
    c = model.config
    assert c.norm.placement == "pre" and c.attention.qk_norm == "none" and c.rope.theta == 500000.0
    if name == "prenorm":  # the router's last expert is the always-on shared expert (weight exactly 1)
        assert c.ffn_kinds == ("dense", "moe", "moe") and c.ffn.intermediate_size == 40
        assert (c.moe.experts.num_experts, c.moe.router.top_k, c.moe.experts.shared_size) == (7, 3, 16)
        assert c.moe.experts.shared_scale == 1 and c.attention.bias and c.tie_word_embeddings
        assert c.moe.experts.num_experts_per_layer == ()
    elif name == "prenorm_shared":
        assert (c.moe.experts.num_experts, c.moe.router.top_k, c.moe.experts.shared_size) == (7, 3, 20)
        assert c.moe.experts.shared_scale == pytest.approx(1 / 4)
        assert c.moe.router.routed_scaling_factor == pytest.approx(3 / 4)
    else:  # padded to E = 7: the padded experts and their router columns are zeros
        per_layer, k, shared = {"perlayer": ((7, 5), 2, 16), "perlayer_noshared": ((5, 7), 2, 0)}[name]
        assert c.moe_layer_experts == per_layer and c.moe.experts.num_experts == 7
        assert (c.moe.router.top_k, c.moe.experts.shared_size) == (k, shared)
        stack = model.stacks[1].moe
        for local, real in enumerate(per_layer):
            assert np.all(np.asarray(stack.router.get_value())[local, :, real:] == 0)
            assert np.all(np.asarray(stack.gate_proj.get_value())[local, real:] == 0)
            assert np.any(np.asarray(stack.gate_proj.get_value())[local, :real] != 0)
    ids, mask = padded_batch(c.vocab_size, batch=3, seq=17, seed=2)
    with torch.no_grad():
        want = oracle(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(want).max() > 0.5
    assert _max_diff(model(ids, mask), want, mask) <= TOL
    if name.startswith("perlayer"):  # without the mask the zero logits of the padding join the softmax
        assert _max_diff(_unmasked(model)(ids, mask), want, mask) > 1e-2


@pytest.mark.parametrize("name", ["prenorm", pytest.param("stock", marks=pytest.mark.slow),
                                  pytest.param("prenorm_shared", marks=pytest.mark.slow),
                                  pytest.param("perlayer", marks=pytest.mark.slow)])
def test_kv_cache_greedy_equals_full_recompute(flex_olmo_dir, variant, name):
    from m2d_jax.eval import generate_tokens
    from test_eval_generate import prompts_for, recompute_greedy

    model = m2d_jax.from_pretrained(flex_olmo_dir if name == "stock" else variant(name)[0])
    prompts = prompts_for(model.config)
    assert generate_tokens(model, prompts, 8) == [recompute_greedy(model, p, 8) for p in prompts]


# ---- conversion ------------------------------------------------------------------------------------------------
def _zero_routers(model):
    for stack, (kind, _, _) in zip(model.stacks, model.config.stacks):
        if kind == "moe":
            stack.moe.router.set_value(np.zeros(stack.moe.router.get_value().shape, np.float32))
    return model


def _calibrated(teacher, seed=0):
    from m2d_jax.calibration import calibrate

    windows = np.random.default_rng(seed).integers(0, teacher.config.vocab_size, size=(4, 16))
    return calibrate(teacher, windows, gram_tokens=32, batch_size=4, gram_chunk=16)


# every expert selected (K = E = k): stock E = 4 top-4; prenorm 5 router experts = 4 routed + the shared one, top-5;
# prenorm_shared 4 routed top-4 renormalised (each routed weight 1/4 * 4/5 = 1/5, the shared_mlp 1/5);
# perlayer: 3 then 5 routed experts (+ the shared one), top-3 routed: K = k = E_1 = 3, and the second MoE layer's 5
# experts equal (``_equal_experts``) so that any 3 of them, each at weight 1/5 (not 1/7: the padding is masked), are
# the same
IDENTITY = {
    "stock": dict(FLEX_OLMO, num_experts=4, num_experts_per_tok=4),
    "prenorm": dict(PRENORM, num_experts=5, num_experts_per_tok=5, num_experts_per_layer=[0, 5, 5]),
    "prenorm_shared": dict(PRENORM_SHARED, num_experts=4, num_experts_per_tok=4),
    "perlayer": dict(PRENORM, num_experts=6, num_experts_per_tok=4, num_experts_per_layer=[0, 4, 6]),
}


def _equal_experts(model):
    """Every routed expert of the last layer a copy of its expert 0 (its shared expert, the last one, kept)."""
    experts = model.model.layers[-1].mlp.experts
    for expert in list(experts)[1:-1]:
        expert.load_state_dict(experts[0].state_dict())


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_exactness_identity_through_hf_export(tmp_path, name):
    """Constant routing (zero router weights, K = E = k): calibrate -> select -> convert -> export; transformers'
    own dense class (OLMo2 / Llama, no custom code) on the exported student equals the teacher's oracle with the
    same zero routers. It holds only with the shared block at weight 1 (prenorm) or 1/(k+1) (prenorm_shared) and
    the routed groups at their DP scales (x k/(k+1) for prenorm_shared): dropping rho moves the logits."""
    import torch

    from m2d_jax.convert import ConversionRecipe, convert
    from m2d_jax.convert.plan import plan_conversion
    from m2d_jax.convert.student import build_dense_student
    from m2d_jax.hf.export import export_model
    from m2d_jax.scoring import select_experts

    if name == "stock":
        path = make_hf_checkpoint(IDENTITY[name], tmp_path / "teacher", seed=5, init_std=0.1)
        oracle = load_reference(path)
        gates = [layer.mlp.gate.weight for layer in oracle.model.layers]
    else:
        path = tmp_path / "teacher"
        oracle = make_variant_checkpoint(IDENTITY[name], path, seed=5,
                                         edit=_equal_experts if name == "perlayer" else None)
        gates = [layer.mlp.gate.weight for layer in oracle.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        for gate in gates:
            gate.zero_()
    teacher = _zero_routers(m2d_jax.from_pretrained(path, moe_dispatch="dense"))
    k = teacher.config.moe.router.top_k
    stats = _calibrated(teacher)
    selection = select_experts(stats, "selection_freq", min(teacher.config.moe_layer_experts))
    student = convert(teacher, stats, selection, ConversionRecipe(groups=k))
    dense_class = {"stock": "Olmo2ForCausalLM"}.get(name, "LlamaForCausalLM")
    out = export_model(student, tmp_path / "student", progress=False)
    reference = load_reference(out)
    assert type(reference).__name__ == dense_class
    ids, mask = padded_batch(teacher.config.vocab_size, 3, 14, 6)
    with torch.no_grad():
        want = oracle(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(want).max() > 0.3
    assert _max_diff(reference_logits(reference, ids, mask), want, mask) <= TOL
    assert _max_diff(student(ids, mask), want, mask) <= TOL
    rho = teacher.config.moe.router.routed_scaling_factor
    if rho != 1:  # the negative control: the routed groups without k/(k+1)
        plans = plan_conversion(teacher, selection.selected, selection.weight_scores, k, "round_robin", "uniform")
        wrong = build_dense_student(teacher, {i: p._replace(scales=p.scales / rho) for i, p in plans.items()}, k)
        assert _max_diff(wrong(ids, mask), want, mask) > 1e-2


@pytest.mark.parametrize("name", ["prenorm", "prenorm_shared", "perlayer"])
def test_moe_to_dense_for_K_k_and_2k(variant, name):
    """E = 7 routed, k = 3 (perlayer: 7 and 5 routed, k = 2): every scoring selects among each layer's real routed
    experts only (the shared expert and the padding are never candidates); K = k (pure pruning) and K = 2k
    (merging) convert to a Llama student whose FFN is the NumPy merge of the selected experts (alpha, DP scales)
    followed by the shared block (its down projection times 1 or 1/(k+1)); teacher dense layers are zero-padded."""
    from flax import nnx

    from m2d_jax.convert import ConversionRecipe, convert
    from m2d_jax.convert.pipeline import conversion_plans
    from m2d_jax.scoring import SCORINGS, select_experts

    teacher = m2d_jax.from_pretrained(variant(name)[0])
    c = teacher.config
    e, k, m, m_s = c.moe.experts.num_experts, c.moe.router.top_k, c.moe.experts.intermediate_size, \
        c.moe.experts.shared_size
    stats = _calibrated(teacher, seed=1)
    t = {tuple(p): np.asarray(v.get_value(), np.float64) for p, v in nnx.state(teacher, nnx.Param).flat_state()}
    moe_stack = [i for i, (kind, _, _) in enumerate(c.stacks) if kind == "moe"][0]
    first_moe = c.stacks[moe_stack][1]
    for scoring in SCORINGS:  # the shared expert and the padding are never candidates: each layer's routed ids
        selection = select_experts(stats, scoring, 2 * k)
        assert selection.selected.shape == (len(c.moe_layers), 2 * k) and selection.selected.max() < e
        assert (selection.selected < np.asarray(c.moe_layer_experts)[:, None]).all()
    for scoring, num_selected, grouping in (("reap", k, "round_robin"), ("gram_logdet", 2 * k, "output_cluster")):
        selection = select_experts(stats, scoring, num_selected)
        recipe = ConversionRecipe(groups=k, grouping=grouping)
        plans = conversion_plans(teacher, stats, selection, recipe)
        student = convert(teacher, stats, selection, recipe)
        sc = student.config
        assert sc.family == "llama" and set(sc.ffn_kinds) == {"dense"} and sc.ffn.intermediate_size == k * m + m_s
        s = {tuple(p): np.asarray(v.get_value(), np.float64)
             for p, v in nnx.state(student, nnx.Param).flat_state()}
        for layer in c.moe_layers:
            local = layer - first_moe
            plan = plans[layer]
            assert sorted(x for g in plan.groups for x in g) == sorted(selection.selected[c.moe_layers.index(
                layer)].tolist())
            expert = {p: t[("stacks", moe_stack, "moe", f"{p}_proj")][local] for p in ("gate", "up", "down")}
            gate = np.concatenate([np.einsum("e,edm->dm", a, expert["gate"]) for a in plan.alpha]
                                  + [t[("stacks", moe_stack, "moe", "shared", "gate_proj", "kernel")][local]], 1)
            down = np.concatenate([sg * np.einsum("e,emd->md", a, expert["down"])
                                   for a, sg in zip(plan.alpha, plan.scales)]
                                  + [c.moe.experts.shared_scale
                                     * t[("stacks", moe_stack, "moe", "shared", "down_proj", "kernel")][local]], 0)
            got = {p: s[("stacks", 0, "mlp", f"{p}_proj", "kernel")][layer] for p in ("gate", "down")}
            np.testing.assert_allclose(got["gate"], gate, rtol=1e-6, atol=1e-7, err_msg=f"{scoring} {layer}")
            np.testing.assert_allclose(got["down"], down, rtol=1e-6, atol=1e-7, err_msg=f"{scoring} {layer}")
            if num_selected == k:  # pure pruning: each group one expert, copied
                assert sorted(np.count_nonzero(plan.alpha, axis=1).tolist()) == [1] * k
        if name != "prenorm_shared":  # the dense layer 0 (width 40) zero-padded to k*m + m_s (64; perlayer 48)
            up = s[("stacks", 0, "mlp", "up_proj", "kernel")][0]
            np.testing.assert_array_equal(up[:, :40], t[("stacks", 0, "mlp", "up_proj", "kernel")][0])
            np.testing.assert_array_equal(up[:, 40:], 0)


@pytest.mark.parametrize("changes, match", [
    (dict(num_shared_experts=2, num_shared_experts_per_layer=[0, 2, 2]), "only 0 or 1 is supported"),
    (dict(norm_topk_prob=True), "'norm_topk_prob': true is unsupported with num_shared_experts > 0"),
    (dict(num_shared_experts_per_layer=[0, 1, 0]), "every MoE layer must have the same number of shared experts"),
    (dict(num_experts_per_layer=[0, 8, 3]), "'num_experts_per_tok': 4 exceeds the 3 experts of the smallest MoE"),
    (dict(num_experts_per_layer=[0, 8, -2]), "'num_experts_per_layer': .* must be >= 0"),
    (dict(num_shared_experts_per_layer=[0, 1]), "'num_shared_experts_per_layer': 2 entries for num_hidden_layers=3"),
    (dict(num_experts_per_tok=1), "'num_experts_per_tok': 1 must exceed num_shared_experts=1"),
    (dict(hidden_act="gelu"), "unsupported activation 'gelu'"),
])
def test_unsupported_variant_options_are_clear_errors(tmp_path, changes, match):
    from m2d_jax.hf import hf_model_config

    (tmp_path / "config.json").write_text(json.dumps({**PRENORM, **changes}))
    with pytest.raises(CheckpointError, match=match) as err:
        hf_model_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_emo_1b14b_config_and_student_parameter_count(tmp_path, capsys):
    """configs/models/emo_1b14b.py read as a user's config.json (``m2d info``, no weights): 127 routed + 1 shared
    expert, 7 + 1 per token; its Llama student of FFN width 7 * 1024 + 1024 has exactly 1,279,854,592 parameters:
    2 * 50304 * 2048 embeddings + 16 * (4 * 2048^2 attention + 3 * 2048 * 8192 FFN + 2 * 2048 norms) + 2048."""
    from m2d_jax.cli import main
    from m2d_jax.config_utils import load_config
    from m2d_jax.convert.student import student_rule
    from m2d_jax.hf import hf_model_config
    from m2d_jax.info import summarize

    (tmp_path / "config.json").write_text(json.dumps(load_config("models/emo_1b14b").to_dict()))
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["experts"], info["top_k"], info["shared_expert_width"], info["moe_layers"]) == (
        "flex_olmo_noqknorm_prenorm", 127, 7, 1024, 16)
    # 128 experts of 3 * 2048 * 1024 and a 127-column router per layer (the shared expert's row is unused)
    assert info["total_params"] == 2 * 50304 * 2048 + 16 * (4 * 2048 ** 2 + 128 * 3 * 2048 * 1024 + 2048 * 127
                                                            + 2 * 2048) + 2048
    teacher = hf_model_config(tmp_path)
    rule = student_rule(teacher.family)
    width = rule.student_width(teacher, teacher.moe.router.top_k)
    student = rule.student_config(teacher, width)
    assert width == 8192 and student.family == "llama"
    assert summarize(student)["total_params"] == 1_279_854_592
    assert 2 * 50304 * 2048 + 16 * (4 * 2048 ** 2 + 3 * 2048 * 8192 + 2 * 2048) + 2048 == 1_279_854_592


@pytest.mark.slow
def test_distillation_step_and_perplexity(tmp_path):
    """The family end to end on real text: a prenorm_shared teacher (the fork's files, the BPE tokenizer of the
    corpus) -> calibrate -> select -> convert -> Llama export; two distillation steps from the teacher into it, and
    perplexity of both equal to exp(mean NLL) of their own logits."""
    import math
    import shutil

    from conftest import corpus_documents
    from distill_helpers import VOCAB, build_models, tiny_config
    from test_eval_ppl import reference_nll

    from m2d_jax.convert import ConversionRecipe, convert
    from m2d_jax.data import load_tokenizer
    from m2d_jax.distill import train
    from m2d_jax.eval import perplexity
    from m2d_jax.hf.export import export_model
    from m2d_jax.scoring import select_experts

    models = build_models(tmp_path / "base")
    teacher_dir = tmp_path / "teacher"
    make_variant_checkpoint(dict(PRENORM_SHARED, vocab_size=VOCAB), teacher_dir, seed=3, std=0.2)
    for f in models["tokenizer"].iterdir():
        shutil.copy(f, teacher_dir / f.name)
    teacher = m2d_jax.from_pretrained(teacher_dir)
    tokens = np.asarray(load_tokenizer(teacher_dir).encode_batch([" ".join(corpus_documents(4))])[0], np.int64)
    stats = _calibrated(teacher)
    student = convert(teacher, stats, select_experts(stats, "gld_reap", 5), ConversionRecipe(groups=3))
    student_dir = export_model(student, tmp_path / "student", tokenizer_from=teacher_dir, progress=False)
    config = tiny_config({**models, "teacher": teacher_dir, "student": student_dir}, tmp_path / "run", steps=2,
                         **{"schedule.warmup_steps": 1, "schedule.decay_steps": 1})
    result = train.run(config)
    assert result["step"] == 2 and math.isfinite(result["metrics"]["loss"]) and result["metrics"]["loss"] > 0
    for model in (teacher, m2d_jax.from_pretrained(student_dir)):
        got = perplexity(model, tokens[:100], seq_len=32, stride=16, batch_size=2)
        nll, count, _ = reference_nll(model, tokens[:100], 32, 16)
        assert got.tokens == count
        assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.parametrize("name", ["prenorm", "perlayer", pytest.param("prenorm_shared", marks=pytest.mark.slow)])
def test_variant_teacher_export_round_trip(variant, tmp_path, name):
    """A variant teacher exports back to the fork's config.json fields and key names (the shared expert as the
    router's last expert, its router row zero) and re-imports to the same architecture, parameters and logits."""
    from safetensors.numpy import load_file

    from m2d_jax.hf.export import export_model

    path, _ = variant(name)
    teacher = m2d_jax.from_pretrained(path)
    out = export_model(teacher, tmp_path / "teacher", progress=False)
    written = json.loads((out / "config.json").read_text())
    fork = VARIANTS[name]
    assert {f: written[f] for f in fork if f != "rope_theta"} == {f: v for f, v in fork.items() if f != "rope_theta"}
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": fork["rope_theta"]}
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    for key, value in original.items():
        if fork.get("num_shared_experts") and key.endswith("mlp.gate.weight"):  # the shared logit row is unused
            np.testing.assert_array_equal(exported[key][:-1], value[:-1])
            np.testing.assert_array_equal(exported[key][-1], 0)
        else:
            np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = m2d_jax.from_pretrained(out)
    assert again.config == teacher.config
    ids, mask = padded_batch(teacher.config.vocab_size, 2, 9, 3)
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(teacher(ids, mask)))


# ---- per-layer expert counts: padding in calibration, scoring, conversion, counting ------------------------------
def _one_layer(stats, i):
    """MoE layer ``i`` of padded statistics as the statistics of an unpadded one-layer model of its E_l experts."""
    from m2d_jax.calibration import CalibrationStats, StatSums

    real = stats.experts_per_layer[i]

    def cut(name, value):
        value = np.asarray(value)[i:i + 1]
        if value.ndim == 1:
            return value
        return value[:, :real, :real] if name in ("router_logit_moment", "gram") else value[:, :real]

    metadata = dict(stats.metadata, num_experts=real, moe_layers=[stats.moe_layers[i]])
    del metadata["num_experts_per_layer"]
    return CalibrationStats(StatSums(*(cut(n, getattr(stats.sums, n)) for n in StatSums._fields)), metadata)


def test_padded_experts_are_never_selected_and_each_layer_selects_as_if_unpadded(variant):
    """perlayer (7 and 5 routed experts, E = 7, k = 2): the padded experts' statistics are exactly 0; every scoring
    selects in each layer what it selects in that layer alone, unpadded (K = k, and K = 5 = every real expert of the
    smaller layer), with the same weight scores; the D-optimal kernel's ridge is averaged over the real experts only
    and the greedy takes a padded expert (even one with the largest residual) only after every real one, as a
    filled slot; K > 5 and a plan that would merge a padded expert are clear errors."""
    from m2d_jax.calibration import StatSums, validate
    from m2d_jax.convert.plan import plan_conversion
    from m2d_jax.errors import StatsError
    from m2d_jax.scoring import SCORINGS, DO_IMPORTANCE, greedy_logdet, importance_order, logdet_kernel, score, \
        select_experts

    teacher = m2d_jax.from_pretrained(variant("perlayer")[0])
    stats = validate(_calibrated(teacher, seed=2))
    assert stats.experts_per_layer == [7, 5] and stats.num_experts == 7 and stats.top_k == 2
    padded = ~stats.real_experts
    for name in StatSums._fields:
        value = np.asarray(getattr(stats.sums, name))
        if value.ndim > 1:
            assert np.all(value[1, 5:] == 0), name
            if name in ("router_logit_moment", "gram"):
                assert np.all(value[1, :, 5:] == 0), name
    assert stats.sums.gram[1, 4, 4] > 0 and stats.sums.selected_count[1, :5].sum() == 2 * stats.sums.tokens[1]
    for scoring in SCORINGS:
        for num_selected in (2, 5):
            selection = select_experts(stats, scoring, num_selected)
            assert not padded[np.arange(2)[:, None], selection.selected].any()
            for i in range(2):
                alone = select_experts(_one_layer(stats, i), scoring, num_selected)
                np.testing.assert_array_equal(selection.selected[i], alone.selected[0], err_msg=scoring)
                np.testing.assert_allclose(selection.weight_scores[i, :stats.experts_per_layer[i]],
                                           alone.weight_scores[0], rtol=1e-12, err_msg=scoring)
        if scoring in DO_IMPORTANCE:  # ranks over all E: the padding last
            ranks = score(stats, scoring)
            assert ranks[1, 5:].max() < ranks[1, :5].min()
    # the kernel of a padded layer restricted to its real experts is the unpadded kernel (the ridge over E_l only)
    importance = score(stats, "conditional_prob")
    kernel = logdet_kernel(stats.sums.gram, importance, candidates=stats.real_experts)
    np.testing.assert_allclose(kernel[1, :5, :5], logdet_kernel(stats.sums.gram[1:, :5, :5], importance[1:, :5])[0],
                               rtol=1e-12)
    assert not np.allclose(logdet_kernel(stats.sums.gram, importance)[1, :5, :5], kernel[1, :5, :5], rtol=1e-12)
    # a non-candidate with the largest residual and the best score still comes after every candidate
    candidates = np.array([[True, True, False]])
    np.testing.assert_array_equal(importance_order(np.array([[1.0, 2.0, 5.0]]), candidates=candidates), [[1, 0, 2]])
    result = greedy_logdet(np.diag([1.0, 2.0, 5.0])[None], 3, candidates=candidates)
    np.testing.assert_array_equal(result.selected, [[1, 0, 2]])
    np.testing.assert_array_equal(result.filled, [[False, False, True]])
    assert result.gains[0, 2] == -np.inf
    with pytest.raises(StatsError, match=r"K=6 .*MoE layer 2 has only 5 experts"):
        select_experts(stats, "reap", 6)
    with pytest.raises(ValueError, match=r"MoE layer 2 must be distinct ids in \[0, 5\)"):
        plan_conversion(teacher, [[0, 1], [0, 6]], np.ones((2, 7)), 2, "round_robin", "uniform")


def test_sharded_import_reads_any_expert_range_of_the_padded_leaves(variant):
    """The per-shard reader of a sharded import on the padded leaves (perlayer: 7 and 5 routed experts): any range
    of experts of the router and of the experts (all real, straddling the padding, all padding), for one layer or
    both, equals that range of the whole imported leaf (real experts as stored, padding 0)."""
    import itertools

    import jax
    from flax import nnx

    from m2d_jax.hf.adapters import adapter_for
    from m2d_jax.hf.load import _leaf_reader, _placements
    from m2d_jax.hf.safetensors_io import SafetensorsCheckpoint
    from m2d_jax.models import abstract_model

    path, _ = variant("perlayer")
    model = m2d_jax.from_pretrained(path)
    config = model.config
    whole = {tuple(k): np.asarray(v.get_value()) for k, v in nnx.state(model).flat_state()}
    abstract = {tuple(k): v.get_value() for k, v in nnx.state(abstract_model(config)).flat_state()}
    placements = _placements(config, adapter_for(config.family, "config.json"), "per_expert")
    with SafetensorsCheckpoint(path) as ckpt:
        for name, axis in (("router", 2), ("down_proj", 1)):  # [layers, d, E], [layers, E, m, d]
            leaf = ("stacks", 1, "moe", name)
            struct = jax.ShapeDtypeStruct(abstract[leaf].shape, abstract[leaf].dtype)
            read = _leaf_reader(ckpt, *placements[leaf], abstract, struct)
            for layers, (first, end) in itertools.product((slice(0, 2), slice(1, 2)), ((0, 3), (3, 6), (5, 7))):
                index = [slice(None)] * len(struct.shape)
                index[0], index[axis] = layers, slice(first, end)
                np.testing.assert_array_equal(read(tuple(index)), whole[leaf][tuple(index)], err_msg=f"{name}")
    assert np.any(whole[("stacks", 1, "moe", "router")][1, :, 3:5] != 0)


@pytest.mark.parametrize("name", ["perlayer", "perlayer_noshared"])
def test_info_counts_the_real_experts(variant, name, capsys):
    """``m2d info`` of a padded teacher: total parameters = the composed oracle's (transformers modules) numel sum,
    less the shared expert's unused router row per MoE layer; active = total - sum_l (E_l - k) routed experts."""
    from m2d_jax.cli import main
    from m2d_jax.info import load_config
    from m2d_jax.models import RuntimeConfig

    path, oracle = variant(name)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = load_config(path)[0]
    d, m, k = config.hidden_size, config.moe.experts.intermediate_size, config.moe.router.top_k
    unused_router_rows = len(config.moe_layers) * d if config.moe.experts.shared_size else 0
    assert info["total_params"] == sum(p.numel() for p in oracle.parameters()) - unused_router_rows
    assert info["active_params"] == info["total_params"] - sum(n - k for n in config.moe_layer_experts) * 3 * d * m
    assert info["experts"] == 7 and info["experts_per_layer"] == list(config.moe_layer_experts)
    with pytest.raises(ValueError, match="top_k=6 exceeds the model's 5 experts in its smallest MoE layer"):
        RuntimeConfig(top_k=6).top_k_for(config)
