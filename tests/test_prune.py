"""Dense-to-dense pruning (``m2d_jax.prune``, ``m2d prune-dense``): pruning nothing is the teacher; a pruned model
has the planned parameter count, loads in transformers and matches m2d_jax; importance equals float64 sums of
transformers' own activations; pruning units whose activations are zero changes nothing; bad input fails in one
line."""

import json

import numpy as np
import pytest
from flax import nnx

import m2d_jax
from conftest import corpus_documents, make_checkpoint_with_tokenizer
from m2d_jax.cli import main as m2d_main
from m2d_jax.errors import PruneError
from m2d_jax.hf.export import export_model
from m2d_jax.hf.oracle import load_reference, make_hf_checkpoint, padded_batch, reference_logits
from m2d_jax.info import summarize
from m2d_jax.prune import (PrunedShape, compute_importance, parse_param_count, plan_shape, prune_dense,
                           prune_to, select_units)
from m2d_jax.prune.plan import parameter_axes, shape_param_count

# GQA 6 query heads in 3 KV groups, head_dim 8 != 48 / 6, untied; and MHA with tied embeddings and a sliding layer
TEACHERS = {
    "gqa": dict(model_type="qwen3", vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=3, head_dim=8, max_position_embeddings=64,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    "mha_tied_sliding": dict(model_type="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                             use_sliding_window=True, sliding_window=6, max_window_layers=2,
                             max_position_embeddings=64, tie_word_embeddings=True),
}
MOE = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4,
           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    dirs = {"gqa": make_checkpoint_with_tokenizer(TEACHERS["gqa"], root / "gqa", seed=3, tokenizer_vocab=320,
                                                  docs=corpus_documents(40, max_chars=3000))}
    dirs["mha_tied_sliding"] = make_hf_checkpoint(TEACHERS["mha_tied_sliding"], root / "mha", seed=4, init_std=0.1)
    return dirs


def _windows(vocab: int, num: int = 5, seq: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (num, seq))


def _params(model) -> dict:
    return {tuple(k): np.asarray(v.get_value()) for k, v in nnx.state(model, nnx.Param).flat_state()}


def _with_params(model, changes: dict):
    state = nnx.state(model, nnx.Param)
    for path, var in state.flat_state():
        if tuple(path) in changes:
            var.set_value(changes[tuple(path)])
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, state)


def _count(config, **fields) -> int:
    return shape_param_count(parameter_axes(config), PrunedShape(**{**PrunedShape.of(config).to_dict(), **fields}))


def test_pruning_nothing_is_the_teacher(teacher_dir):
    teacher = m2d_jax.from_pretrained(teacher_dir["gqa"], progress=False)
    total = summarize(teacher.config)["total_params"]
    pruned, report = prune_dense(teacher, _windows(320), total, axes=("ffn", "heads", "hidden", "depth"))
    assert pruned.config == teacher.config and report.params == report.teacher_params == total
    ids, mask = padded_batch(320, 2, 10)
    np.testing.assert_array_equal(np.asarray(pruned(ids, mask)), np.asarray(teacher(ids, mask)))


@pytest.mark.parametrize("name, axes, min_fraction, shape", [
    ("gqa", ("ffn",), 0.1, dict(intermediate_size=51)),
    # under the FFN floor (40): one query head per KV group goes (ties with a whole group: more KV groups kept),
    # then the FFN width is refitted to the exact count
    ("gqa", ("ffn", "heads"), 0.5, dict(intermediate_size=45, num_heads=3, num_kv_heads=3)),
    # every axis; the target (6000) is no shape's exact count: the closest FFN width
    ("mha_tied_sliding", ("ffn", "heads", "hidden", "depth"), 0.3, None),
])
def test_pruned_model_has_the_planned_count_and_matches_transformers(teacher_dir, tmp_path, name, axes,
                                                                     min_fraction, shape):
    teacher = m2d_jax.from_pretrained(teacher_dir[name], progress=False)
    vocab = teacher.config.vocab_size
    target = 6000 if shape is None else _count(teacher.config, **shape)
    pruned, report = prune_dense(teacher, _windows(vocab), target, axes=axes, min_fraction=min_fraction)
    if shape is not None:
        assert report.params == target and report.shape == PrunedShape(**{**report.teacher_shape.to_dict(),
                                                                           **shape})
    else:  # depth and hidden were needed; no FFN width comes closer to the target
        s = report.shape
        assert s.num_layers < 4 and s.hidden_size < 32 and s.num_heads < 4
        assert abs(report.params - target) <= 3 * s.hidden_size * s.num_layers / 2
    assert summarize(pruned.config)["total_params"] == report.params == sum(p.size for p in _params(pruned).values())
    out = export_model(pruned, tmp_path / "hf", tokenizer_from=teacher_dir[name], progress=False)
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3ForCausalLM"]
    assert hf["intermediate_size"] == report.shape.intermediate_size
    reference = load_reference(out)  # AutoModelForCausalLM, no custom code
    assert sum(p.numel() for p in reference.parameters()) == report.params
    ids, mask = padded_batch(vocab, 2, 16)
    np.testing.assert_allclose(np.asarray(pruned(ids, mask)), reference_logits(reference, ids, mask), atol=1e-4)


def _hf_importance(path, windows: np.ndarray) -> dict:
    """The importance definitions evaluated in float64 NumPy on activations recorded by forward hooks on
    transformers' own modules (down_proj / o_proj inputs, the two norms' outputs, each layer's input and output)."""
    import torch

    model = load_reference(path)
    recorded: dict = {}

    def hook(name, what):
        def record(module, args, output):
            value = args[0] if what == "input" else (output[0] if isinstance(output, tuple) else output)
            recorded.setdefault(name, []).append(value.detach().double().numpy())
        return record

    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(hook(("ffn", i), "input"))
        layer.self_attn.o_proj.register_forward_hook(hook(("heads", i), "input"))
        layer.input_layernorm.register_forward_hook(hook(("hidden_in", i), "output"))
        layer.post_attention_layernorm.register_forward_hook(hook(("hidden_post", i), "output"))
        layer.register_forward_hook(hook(("layer_in", i), "input"))
        layer.register_forward_hook(hook(("layer_out", i), "output"))
    with torch.no_grad():
        model(torch.tensor(windows, dtype=torch.long))
    num_heads, tokens = model.config.num_attention_heads, windows.size
    out = {name: [] for name in ("ffn", "heads", "hidden", "block")}
    for i in range(model.config.num_hidden_layers):
        flat = {k[0]: recorded[k][0].reshape(tokens, -1) for k in recorded if k[1] == i}
        out["ffn"].append(np.abs(flat["ffn"]).mean(0))
        out["heads"].append(np.linalg.norm(flat["heads"].reshape(tokens, num_heads, -1), axis=-1).mean(0))
        out["hidden"].append(np.abs(flat["hidden_in"]).mean(0) + np.abs(flat["hidden_post"]).mean(0))
        a, b = flat["layer_in"], flat["layer_out"]
        out["block"].append(np.mean(1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
    return {name: np.array(v) for name, v in out.items()}


def test_importance_equals_float64_sums_of_transformers_activations(teacher_dir):
    windows = _windows(128, num=5, seq=10)  # 5 windows in batches of 2: the last batch has a masked filler row
    importance = compute_importance(m2d_jax.from_pretrained(teacher_dir["mha_tied_sliding"], progress=False),
                                    windows, batch_size=2)
    reference = _hf_importance(teacher_dir["mha_tied_sliding"], windows)
    assert importance.tokens == windows.size
    for name, expected in reference.items():
        np.testing.assert_allclose(getattr(importance, name), expected, rtol=2e-5, atol=1e-7, err_msg=name)


def test_pruning_units_with_zero_activation_changes_nothing(teacher_dir):
    """Neurons whose gate and up rows are zero (phi = 0), a KV group whose values are zero (its heads output 0) and a
    layer whose o_proj and down_proj are zero (output = input) have zero importance; pruning exactly them keeps the
    logits (only the rounding of shorter sums differs)."""
    teacher = m2d_jax.from_pretrained(teacher_dir["gqa"], progress=False)
    params = _params(teacher)
    rng = np.random.default_rng(1)
    dead_neurons = np.stack([rng.choice(80, 9, replace=False) for _ in range(3)])  # [layers, 9]
    gate, up = ("stacks", 0, "mlp", "gate_proj", "kernel"), ("stacks", 0, "mlp", "up_proj", "kernel")
    v, o = ("stacks", 0, "attn", "v_proj", "kernel"), ("stacks", 0, "attn", "o_proj", "kernel")
    down = ("stacks", 0, "mlp", "down_proj", "kernel")
    changes = {gate: params[gate].copy(), up: params[up].copy(), v: params[v].copy(), o: params[o].copy(),
               down: params[down].copy()}
    for layer, dead in enumerate(dead_neurons):
        changes[gate][layer][:, dead] = 0
        changes[up][layer][:, dead] = 0
    changes[v][:, :, 1] = 0  # KV group 1 (query heads 2, 3) in every layer
    changes[o][1] = 0  # layer 1 passes its input through
    changes[down][1] = 0
    teacher = _with_params(teacher, changes)
    importance = compute_importance(teacher, _windows(320))
    shape = PrunedShape(intermediate_size=71, num_heads=4, num_kv_heads=2, hidden_size=48, num_layers=2)
    kept = select_units(importance, teacher.config, shape)
    assert kept.layers.tolist() == [0, 2] and kept.kv_heads.tolist() == [[0, 2]] * 2
    assert kept.heads.tolist() == [[0, 1, 4, 5]] * 2
    for row, layer in zip(kept.ffn, kept.layers):
        assert row.tolist() == sorted(set(range(80)) - set(dead_neurons[layer].tolist()))
    pruned = prune_to(teacher, kept, shape)
    ids, mask = padded_batch(320, 2, 12)
    np.testing.assert_allclose(np.asarray(pruned(ids, mask)), np.asarray(teacher(ids, mask)), atol=1e-5, rtol=0)


def test_planner_rule(teacher_dir):
    config = m2d_jax.from_pretrained(teacher_dir["gqa"], progress=False).config
    full = _count(config)
    per_neuron = full - _count(config, intermediate_size=79)
    assert per_neuron == 3 * 48 * 3
    assert plan_shape(config, full) == (PrunedShape.of(config), full)
    # FFN alone while it can: the closest width, from either side
    shape, count = plan_shape(config, full - 10 * per_neuron - per_neuron // 3)
    assert shape == PrunedShape(70, 6, 3, 48, 3) and count == full - 10 * per_neuron
    # under the FFN floor (ceil(0.5 * 80) = 40): the fewest heads removed, then the FFN refitted to the target
    target = _count(config, intermediate_size=45, num_heads=4, num_kv_heads=2) - 100
    shape, count = plan_shape(config, target, axes=("heads", "ffn"), min_fraction=0.5)
    assert shape == PrunedShape(45, 3, 3, 48, 3) and count == target + 100
    # whole KV groups go when fewer groups reach the target: 1 group of 2 heads is cheaper than 2 groups of 1
    target = _count(config, intermediate_size=8, num_heads=2, num_kv_heads=1)
    shape, count = plan_shape(config, target, axes=("ffn", "heads"))
    assert (shape, count) == (PrunedShape(8, 2, 1, 48, 3), target)
    # planner counts equal the abstract model's for every axis
    for fields in (dict(num_heads=3, num_kv_heads=3), dict(hidden_size=17), dict(num_layers=1)):
        pruned = config.replace(hidden_size=fields.get("hidden_size", 48), num_layers=fields.get("num_layers", 3),
                                ffn_kinds=("dense",) * fields.get("num_layers", 3),
                                attention=config.attention.replace(
                                    num_heads=fields.get("num_heads", 6), num_kv_heads=fields.get("num_kv_heads", 3),
                                    layer_types=config.attention.layer_types[:fields.get("num_layers", 3)]))
        assert _count(config, **fields) == summarize(pruned)["total_params"]
    assert parse_param_count("1.2M") == 1_200_000 and parse_param_count("3_441_113_088") == 3441113088


def test_bad_inputs_fail_in_one_line(teacher_dir, tmp_path, capsys):
    teacher = m2d_jax.from_pretrained(teacher_dir["gqa"], progress=False)
    total = summarize(teacher.config)["total_params"]
    with pytest.raises(PruneError, match=f"exceeds the teacher's {total:,}"):
        prune_dense(teacher, _windows(320), total + 1)
    with pytest.raises(PruneError, match="below the smallest model"):
        prune_dense(teacher, _windows(320), 1000)
    with pytest.raises(PruneError, match="pruning axes"):
        prune_dense(teacher, _windows(320), total, axes=("experts",))
    with pytest.raises(PruneError, match="outside"):
        compute_importance(teacher, _windows(320) + 320)
    with pytest.raises(PruneError, match="parameter count"):
        parse_param_count("many")
    moe_dir = make_hf_checkpoint(MOE, tmp_path / "moe", seed=1)
    with pytest.raises(PruneError, match="has MoE layers"):
        prune_dense(m2d_jax.from_pretrained(moe_dir, progress=False), _windows(128), 1000)
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(corpus_documents(3, max_chars=2000)))
    capsys.readouterr()
    args = ["prune-dense", "--model", str(moe_dir), "--data", str(data), "--params", "10K", "--out",
            str(tmp_path / "out")]
    assert m2d_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2d prune-dense: error: ") and "has MoE layers" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_cli_prune_dense_matches_a_checkpoint_count(teacher_dir, tmp_path, capsys):
    """``m2d prune-dense --params-of`` on real text: the exact count of a narrower model, written as a checkpoint
    and an HF directory (with the teacher's tokenizer) that transformers loads."""
    narrower = make_hf_checkpoint({**TEACHERS["gqa"], "intermediate_size": 33}, tmp_path / "narrower", seed=0)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in corpus_documents(20, max_chars=2000)))
    out, hf_out = tmp_path / "pruned", tmp_path / "pruned_hf"
    assert m2d_main(["prune-dense", "--model", str(teacher_dir["gqa"]), "--data", str(data), "--params-of",
                     str(narrower), "--out", str(out), "--hf-out", str(hf_out), "--seq-len", "32", "--num-seqs",
                     "6"]) == 0
    printed = capsys.readouterr().out
    target = summarize(m2d_jax.from_pretrained(narrower, progress=False).config)["total_params"]
    assert f"-> {target:,} parameters (target {target:,}; +0)" in printed
    pruned = m2d_jax.from_pretrained(out, progress=False)
    assert pruned.config.ffn.intermediate_size == 33 and (hf_out / "tokenizer.json").exists()
    ids, mask = padded_batch(320, 2, 12)
    np.testing.assert_allclose(np.asarray(pruned(ids, mask)), reference_logits(hf_out, ids, mask), atol=1e-4)
