"""Calibration statistics: equal to sums built from transformers' own forward; streaming / sharding / padding
invariance; the end-to-end stage (tokenizer -> grain -> stats file) and its CLI; bad statistics files."""

import json

import numpy as np
import pytest

import m2d_jax
from m2d_jax.calibration import (FORMAT, CalibrationStats, StatSums, StatsError, accumulate, batch_sums, calibrate,
                                 combine_stats, config_hash, gram_positions, gram_slots, load_stats, save_stats)
from m2d_jax.hf.oracle import load_reference, make_hf_checkpoint, padded_batch
from m2d_jax.pipeline import calibrate_files

from conftest import QWEN3_MOE_CONFIGS, corpus_documents, make_checkpoint_with_tokenizer

RTOL = 2e-5  # float32 forward (both sides) and float32 per-batch sums vs float64 references


def reference_sums(path, ids, mask, gram_index, gram_valid) -> StatSums:
    """docs/METHOD.md §2 sums in float64 NumPy from transformers' own modules, for every family: router logits from
    ``output_router_logits``; each MoE block's router module (``gate`` / ``router``, returning (logits, applied
    weights [T, k], indices [T, k])) hooked for its input and decisions; f_e(x) from the block's own expert module
    called with every token routed to expert e alone with weight 1 (shared experts are not routed experts)."""
    import torch

    ref = load_reference(path)
    blocks = [(i, layer.mlp) for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "experts")]
    captured = {}
    hooks = []
    for i, block in blocks:
        router = block.gate if hasattr(block, "gate") else block.router
        hooks.append(router.register_forward_hook(
            lambda m, inp, out, i=i: captured.__setitem__(i, (inp[0], out))))
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    for h in hooks:
        h.remove()
    assert len(out.router_logits) == len(blocks)
    valid = np.asarray(mask, np.float64).reshape(-1)
    gsel = gram_index[gram_valid.astype(bool)]
    fields = {name: [] for name in StatSums._fields}
    for logits_t, (i, block) in zip(out.router_logits, blocks):
        x, (hook_logits, weights, indices) = captured[i]
        x = x.reshape(-1, x.shape[-1])  # [T, d]
        z = logits_t.double().numpy()  # [T, E]
        np.testing.assert_array_equal(hook_logits.double().numpy(), z)
        weights, indices = weights.double().numpy(), indices.numpy()  # [T, k]
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        e = z.shape[1]
        with torch.no_grad():
            f = np.stack([block.experts(x, torch.full((len(x), 1), j), torch.ones(len(x), 1)).double().numpy()
                          for j in range(e)])  # [E, T, d] every expert on every token
        norms = np.linalg.norm(f, axis=-1).T  # [T, E]
        sel = np.zeros_like(p)
        w = np.zeros_like(p)
        np.put_along_axis(sel, indices, 1.0, axis=1)
        np.put_along_axis(w, indices, weights, axis=1)
        sel, w = sel * valid[:, None], w * valid[:, None]
        fg = f[:, gsel]  # [E, n_G, d]
        fields["tokens"].append(valid.sum())
        fields["selected_count"].append(sel.sum(0))
        fields["sum_preselect_prob"].append(valid @ p)
        fields["sum_applied_weight"].append(w.sum(0))
        fields["sum_selected_prob"].append((sel * p).sum(0))
        fields["sum_selected_prob_norm"].append((sel * p * norms).sum(0))
        fields["sum_selected_weight_norm"].append((w * norms).sum(0))
        fields["sum_selected_norm"].append((sel * norms).sum(0))
        fields["router_logit_moment"].append(np.einsum("t,te,tf->ef", valid, z, z))
        fields["gram"].append(np.einsum("etd,ftd->ef", fg, fg))
        fields["sum_output"].append(fg.sum(1))
        fields["sum_output_norm"].append(np.linalg.norm(fg, axis=-1).sum(1))
        fields["gram_tokens"].append(float(len(gsel)))
    return StatSums(**{k: np.stack(v) for k, v in fields.items()})


def assert_sums_close(got: StatSums, want: StatSums, rtol=RTOL):
    for name in StatSums._fields:
        g, w = np.asarray(getattr(got, name), np.float64), np.asarray(getattr(want, name), np.float64)
        assert g.shape == w.shape, name
        scale = max(np.abs(w).max(), 1e-30)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.fixture(scope="module")
def any_checkpoint(hf_checkpoint, tmp_path_factory):
    """Qwen3-MoE checkpoints from conftest; DeepSeek-V2 / GPT-OSS / OLMoE ones from the families' test configs."""
    from test_families import FAMILY_CONFIGS

    def build(name):
        if name in QWEN3_MOE_CONFIGS:
            return hf_checkpoint(name)
        return make_hf_checkpoint(FAMILY_CONFIGS[name], tmp_path_factory.mktemp("fam") / name, seed=2, init_std=0.1)

    return build


# DeepSeek: group-limited top-k, rho = 1.5, shared experts; GPT-OSS: router bias, top-k over logits, expert biases
# and clamped GLU; OLMoE: un-normalised weights; FlexOlmo: post-norm layers (the MoE input is the raw residual).
@pytest.mark.parametrize("name", ["moe_gqa_norm_mlponly", "moe_mha_tied_sparsestep", "ds_qlora_group_rho",
                                  "gptoss_default_rope", "olmoe_clip", "flex_olmo_norm_topk"])
def test_statistics_equal_transformers_forward(any_checkpoint, name):
    path = any_checkpoint(name)
    model = m2d_jax.from_pretrained(path)
    ids, mask = padded_batch(model.config.vocab_size, batch=3, seq=16, seed=4)
    slots = gram_slots(3, 3, 20, 16, chunk=8)
    index, valid = gram_positions(mask, np.arange(3), 3, 20, seed=0, slots=slots)
    assert valid.sum() == 20 and np.asarray(mask).reshape(-1)[index[valid == 1]].all()  # subsample avoids padding
    got = batch_sums(model, ids, mask, index, valid, chunk=8)
    want = reference_sums(path, ids, mask, index, valid)
    np.testing.assert_array_equal(np.asarray(got.selected_count), want.selected_count)  # identical routing
    assert_sums_close(got, want)
    assert np.asarray(got.tokens)[0] == mask.sum()


@pytest.fixture(scope="module")
def streaming_model(hf_checkpoint):
    return m2d_jax.from_pretrained(hf_checkpoint("moe_gqa_norm_mlponly"))


def _batches(seqs, seq_ids, batch_size, pad_to=None, seed=0):
    """Batches of (ids, mask, seq_ids); ``pad_to`` right-pads every row with random masked tokens and the last
    batch is filled with fully masked rows of random tokens."""
    rng = np.random.default_rng(seed)
    t = seqs.shape[1]
    width = pad_to or t
    for start in range(0, len(seq_ids), batch_size):
        rows = seq_ids[start:start + batch_size]
        ids = rng.integers(0, 100, size=(batch_size, width))
        mask = np.zeros((batch_size, width), np.int32)
        sid = np.full(batch_size, -1)
        ids[:len(rows), :t] = seqs[rows]
        mask[:len(rows), :t] = 1
        sid[:len(rows)] = rows
        yield ids, mask, sid


def test_streaming_sharding_and_padding_invariance(streaming_model):
    seqs = np.random.default_rng(0).integers(0, 160, size=(6, 12))
    kw = dict(num_seqs=6, gram_tokens=30, seed=3, chunk=8)
    everything = np.arange(6)
    one = accumulate(streaming_model, _batches(seqs, everything, 6), **kw)
    three = accumulate(streaming_model, _batches(seqs, everything, 2), **kw)
    hosts = [accumulate(streaming_model, _batches(seqs, everything[h::2], 2), **kw) for h in range(2)]
    padded = accumulate(streaming_model, _batches(seqs, everything, 4, pad_to=17, seed=9), **kw)
    assert one.tokens[0] == 72 and one.gram_tokens[0] == 30
    assert one.selected_count.sum() == 72 * 2 * one.tokens.shape[0]
    for other in (three, hosts[0] + hosts[1], padded):
        assert_sums_close(other, one, rtol=1e-5)
    np.testing.assert_array_equal(three.selected_count, one.selected_count)


@pytest.fixture(scope="module")
def calib_checkpoint(tmp_path_factory):
    """A tiny Qwen3-MoE whose vocab fits a byte-level BPE trained on the embedded corpus, plus a small data file."""
    root = tmp_path_factory.mktemp("calib")
    config = dict(QWEN3_MOE_CONFIGS["moe_gqa_norm_mlponly"], vocab_size=320)
    docs = corpus_documents(6, max_chars=4000)
    path = make_checkpoint_with_tokenizer(config, root / "model", seed=5, tokenizer_vocab=320, docs=docs)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, data


@pytest.mark.slow
def test_calibrate_stage_shards_roundtrip_and_cli(calib_checkpoint, tmp_path, capsys):
    from m2d_jax.cli import main
    from m2d_jax.scoring import select_experts

    path, data = calib_checkpoint
    kw = dict(seq_len=32, num_seqs=7, gram_tokens=50, batch_size=3, seed=1, gram_chunk=16, show_progress=False)
    full = calibrate_files(path, [data], **kw)
    meta = full.metadata
    # the runner = tokenise + choose windows + the in-memory stage
    from m2d_jax.calibration import calibration_windows
    from m2d_jax.data import load_tokenizer, pack_documents, read_documents, tokenize_documents

    windows = calibration_windows(pack_documents(tokenize_documents(read_documents([data]), load_tokenizer(path)), 32),
                                  7, seed=1)
    in_memory = calibrate(m2d_jax.from_pretrained(path), windows, gram_tokens=50, batch_size=3, seed=1, gram_chunk=16)
    for a, b in zip(in_memory.sums, full.sums):
        np.testing.assert_array_equal(a, b)
    assert meta["model_path"] == str(path.absolute()) and "model_path" not in in_memory.metadata
    assert meta["tokens_seen"] == 7 * 32 and meta["gram_tokens_seen"] == 50 and meta["moe_layers"] == [0, 2]
    assert meta["config_hash"] == config_hash(m2d_jax.from_pretrained(path).config)
    shards = [calibrate_files(path, [data], shard_index=i, shard_count=2, **kw) for i in range(2)]
    assert_sums_close(combine_stats(*shards).sums, full.sums, rtol=1e-5)
    with pytest.raises(StatsError, match="overlap"):
        combine_stats(shards[0], shards[0])

    out = save_stats(full, tmp_path / "stats.npz")
    loaded = load_stats(out)
    assert loaded.metadata == json.loads(json.dumps(meta))
    for a, b in zip(loaded.sums, full.sums):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError):
        save_stats(full, out)

    cli_out = tmp_path / "cli_stats.npz"
    assert main(["calibrate", "--model", str(path), "--data", str(data), "--seq-len", "32", "--num-seqs", "7",
                 "--gram-tokens", "50", "--batch-size", "3", "--seed", "1", "--gram-chunk", "16",
                 "--out", str(cli_out)]) == 0
    for a, b in zip(load_stats(cli_out).sums, full.sums):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    capsys.readouterr()
    assert main(["score", "--stats", str(cli_out), "--scoring", "gld_reap", "--experts", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    selected = select_experts(loaded, "gld_reap", 4).selected
    assert printed["selected"] == {str(l): row for l, row in zip(meta["moe_layers"], selected.tolist())}
    shard_files = [str(save_stats(sh, tmp_path / f"shard{i}.npz")) for i, sh in enumerate(shards)]
    assert main(["score", "--stats", *shard_files, "--scoring", "gld_reap", "--experts", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"] == printed["selected"]  # hosts combine by addition
    assert main(["score", "--stats", str(cli_out), "--scoring", "selection_freq", "--experts", "2", "--model",
                 str(path)]) == 0
    assert "layer   2:" in capsys.readouterr().out
    other = make_hf_checkpoint(dict(QWEN3_MOE_CONFIGS["moe_gqa_norm_mlponly"], num_experts_per_tok=3),
                               tmp_path / "other", seed=0)
    assert main(["score", "--stats", str(cli_out), "--scoring", "reap", "--experts", "4", "--model",
                 str(other)]) == 2
    assert "different model" in capsys.readouterr().err
    assert main(["score", "--stats", str(cli_out), "--scoring", "reap", "--experts", "9"]) == 2  # K > E
    assert "K=9" in capsys.readouterr().err


def test_bad_statistics_files(calib_checkpoint, tmp_path, streaming_model):
    with pytest.raises(StatsError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StatsError, match="junk.npz: not a statistics file"):
        load_stats(tmp_path / "junk.npz")
    c = streaming_model.config
    sums = StatSums.zeros(2, c.moe.experts.num_experts, c.hidden_size)._replace(tokens=np.full(2, 3.0))
    meta = dict(format=FORMAT, config_hash=config_hash(c), num_experts=c.moe.experts.num_experts,
                top_k=c.moe.router.top_k, moe_layers=[0, 2], hidden_size=c.hidden_size)
    good = CalibrationStats(sums, meta)
    bad_path = save_stats(CalibrationStats(sums._replace(sum_output_norm=sums.sum_output_norm + np.inf), meta),
                          tmp_path / "inf.npz")
    with pytest.raises(StatsError, match="inf.npz: field 'sum_output_norm' has 16 NaN/inf"):
        load_stats(bad_path)
    wrong_shape = save_stats(CalibrationStats(sums._replace(gram=np.zeros((2, 3, 3))), meta), tmp_path / "shape.npz")
    with pytest.raises(StatsError, match=r"field 'gram' has shape \(2, 3, 3\), expected \(2, 8, 8\)"):
        load_stats(wrong_shape)
    good_path = save_stats(good, tmp_path / "good.npz")
    data = good_path.read_bytes()
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "truncated.npz").write_bytes(data[:len(data) // 2])
    (tmp_path / "cut_header.npz").write_bytes(data[:40])
    for name in ("empty.npz", "truncated.npz", "cut_header.npz"):
        with pytest.raises(StatsError, match=f"{name}: not a statistics file, or a truncated one") as info:
            load_stats(tmp_path / name)
        assert "\n" not in str(info.value)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(StatsError, match="array.npy: not a statistics file"):
        load_stats(tmp_path / "array.npy")
    older = save_stats(CalibrationStats(sums, dict(meta, format="m2d_jax.calibration/1")), tmp_path / "v1.npz")
    with pytest.raises(StatsError, match="v1.npz: format 'm2d_jax.calibration/1', expected 'm2d_jax.calibration/2'"):
        load_stats(older)
    good.check_model(c)
    other = m2d_jax.from_pretrained(calib_checkpoint[0]).config  # a different vocab
    with pytest.raises(StatsError, match="different model"):
        good.check_model(other)


def test_cli_reports_a_truncated_statistics_file_in_one_line(tmp_path, capsys):
    """``m2d score`` and ``m2d convert`` on a zero-byte or truncated file: exit 2 and one line naming the file."""
    from m2d_jax.cli import main

    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04" + b"\0" * 30)
    for name in ("empty.npz", "truncated.npz"):
        stats = str(tmp_path / name)
        for argv in (["score", "--stats", stats, "--scoring", "reap", "--experts", "4"],
                     ["convert", "--model", str(tmp_path), "--stats", stats, "--experts", "4", "--groups", "2",
                      "--out", str(tmp_path / "student")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{stats}: not a statistics file" in err, err
    assert not (tmp_path / "student").exists()


def test_calibrate_rejects_bad_data(calib_checkpoint, hf_checkpoint, tmp_path):
    from m2d_jax.data import DataError

    path, data = calib_checkpoint
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        calibrate_files(path, [tmp_path / "missing.jsonl"], seq_len=8, num_seqs=2, show_progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        calibrate_files(path, [tmp_path / "empty.jsonl"], seq_len=8, num_seqs=2, show_progress=False)
    small_vocab = hf_checkpoint("moe_gqa_norm_mlponly")  # vocab 160 < the 320 of the tokenizer
    with pytest.raises(DataError, match="vocab_size 160"):
        calibrate_files(small_vocab, [data], seq_len=8, num_seqs=2, tokenizer_dir=path, show_progress=False)
    dense = hf_checkpoint("dense_tied_mha")
    with pytest.raises(ValueError, match="no MoE layers"):
        calibrate_files(dense, [data], seq_len=8, num_seqs=2, tokenizer_dir=path, show_progress=False)
