"""The sharded train step: identical results on every mesh layout and on one device, parameters laid out as the
logical-axis rules say, gradient accumulation equal to one big batch, teacher-as-student KL = 0, and bad configs
rejected before any data, model or compute."""

import json
import struct

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from distill_helpers import STUDENT, TEACHER, build_models, tiny_config
from m2d_jax import cli
from m2d_jax.config_utils import apply_overrides, load_config
from m2d_jax.distill import check_config, train
from m2d_jax.data import DataError
from m2d_jax.distill.sharding import LOGICAL_AXIS_RULES, MeshError, logical_to_spec

P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("distill_models"))


def one_step(models, tmp_path, devices=None, **changes):
    """(loss, params before, params after, trainer) of one train step; arrays copied to host first (donation)."""
    config = tiny_config(models, tmp_path / "run", **{"optimizer.learning_rate": 1e-3, **changes})
    trainer = train.prepare(config, devices)
    before = jax.device_get(trainer.state["params"])
    batch = next(trainer.stream)
    state, metrics = trainer.train_step(trainer.state, trainer.teacher_params, batch)
    return float(metrics["loss"]), before, state, trainer


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2)]


@pytest.mark.slow
def test_same_step_on_every_mesh_and_params_sharded_by_the_rules(models, tmp_path):
    ref_loss, ref_before, ref_state, _ = one_step(models, tmp_path / "single", devices=jax.devices()[:1])
    ref_after = _flat(jax.device_get(ref_state["params"]))
    assert ref_loss > 0.05
    moved = [k for k, v in _flat(ref_before).items() if not np.array_equal(v, ref_after[k])]
    assert len(moved) == len(ref_after)  # every parameter tensor was updated
    for sizes in MESHES:
        mesh_changes = {f"mesh.{a}": n for a, n in zip(("data", "fsdp", "tensor", "expert"), sizes)}
        loss, _, state, trainer = one_step(models, tmp_path / "x".join(map(str, sizes)), **mesh_changes)
        assert trainer.mesh.devices.shape == sizes
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"mesh {sizes}")
        after = _flat(jax.device_get(state["params"]))
        for key, value in after.items():
            np.testing.assert_allclose(value, ref_after[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} on {sizes}")
        # the parameters (and the Adam moments) are laid out as LOGICAL_AXIS_RULES say
        abstract = nnx.state(train.abstract_model(trainer.student_config), nnx.Param)
        for path, var in nnx.to_flat_state(abstract):
            leaf = state["params"]
            for p in path:
                leaf = leaf[p]
            expected = logical_to_spec(var.get_metadata()["out_sharding"], leaf.shape, trainer.mesh)
            assert leaf.sharding.spec == expected, (path, sizes)
        mu = state["opt_state"][1][0].mu
        assert mu["embed"].sharding.spec == state["params"]["embed"].sharding.spec
        if sizes == (1, 2, 2, 2):  # spot checks against the rules table itself
            assert state["params"]["embed"].sharding.spec == P("tensor", "fsdp")
            assert state["params"]["stacks"][0]["attn"]["q_proj"]["kernel"].sharding.spec == P(
                None, "fsdp", "tensor", None)
            teacher_gate = trainer.teacher_params["stacks"][0]["moe"]["gate_proj"]
            assert teacher_gate.sharding.spec == P(None, "expert", "fsdp", "tensor")  # experts over `expert`
            assert LOGICAL_AXIS_RULES["exp"] == "expert"


@pytest.mark.parametrize("objective", ["kl", "lm"])  # lm: a dense student, so no per-micro-batch balance term
def test_grad_accumulation_equals_one_big_batch(models, tmp_path, objective):
    changes = {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": -1, "objective": objective,
               **({"teacher.path": ""} if objective == "lm" else {})}
    loss1, _, state1, _ = one_step(models, tmp_path / "a", **changes)
    loss4, _, state4, _ = one_step(models, tmp_path / "b", **changes, micro_batches=4)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    a, b = _flat(jax.device_get(state1["params"])), _flat(jax.device_get(state4["params"]))
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_teacher_as_student_has_zero_kl_and_expanded_topk_does_not(models, tmp_path):
    same = {"student.path": str(models["teacher"]), "mesh.fsdp": 2, "mesh.expert": -1}
    loss, _, _, _ = one_step(models, tmp_path / "same", **same)
    assert abs(loss) < 1e-6
    loss_k3, _, _, trainer = one_step(models, tmp_path / "k3", **same, **{"teacher.top_k": 3})
    assert trainer.teacher_config.moe.router.top_k == 2 and loss_k3 > 1e-4  # architecture as trained, routed to 3


def test_lm_objective_trains_an_moe_student_with_load_balancing(models, tmp_path):
    config = tiny_config(models, tmp_path / "lm", objective="lm", steps=4,
                         **{"student.path": str(models["teacher"]), "teacher.path": ""})
    result = train.run(config)
    m = result["metrics"]
    assert result["step"] == 4 and m["ce"] > 1.0 and 1.0 <= m["load_balance"] < 4.0
    assert m["loss"] == pytest.approx(m["ce"] + 0.01 * m["load_balance"], rel=1e-5)
    # the TensorBoard event file holds the same scalars as metrics.jsonl
    jsonl = [json.loads(line) for line in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    scalars = read_event_scalars(next((tmp_path / "lm" / "tensorboard").glob("events.out.tfevents.*")))
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
    for row in jsonl:
        assert scalars[("train/ce", row["step"])] == pytest.approx(row["ce"], rel=1e-6)


def test_lm_objective_equals_the_transformers_loss(models, tmp_path):
    """Oracle: ``LanguageModeling``'s ce over a batch split in 2 micro-batches is transformers' causal-LM loss
    (shifted labels, padding as -100) of the whole batch; a dense student adds no load-balancing term."""
    import torch

    from m2d_jax.hf.oracle import load_reference

    config = tiny_config(models, tmp_path / "lm", objective="lm", micro_batches=2,
                         **{"teacher.path": "", "mesh.fsdp": 2, "mesh.tensor": -1})
    trainer = train.prepare(config)
    batch = jax.device_get(next(trainer.stream))
    _, metrics = trainer.train_step(trainer.state, trainer.teacher_params, batch)
    ids, mask = (torch.from_numpy(np.array(batch[k])).long() for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        reference = load_reference(models["student"])(input_ids=ids, attention_mask=mask,
                                                      labels=ids.masked_fill(mask == 0, -100)).loss.item()
    assert float(metrics["tokens"]) == float((mask[:, :-1] * mask[:, 1:]).sum())
    np.testing.assert_allclose(float(metrics["ce"]), reference, rtol=2e-6)
    assert float(metrics["load_balance"]) == 0.0 and float(metrics["loss"]) == float(metrics["ce"])


def read_event_scalars(path) -> dict:
    """{(tag, step): value} from a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    data, out, pos = path.read_bytes(), {}, 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out[(value.tag, event.step)] = value.simple_value
    return out


def _fail_if_called(*_, **__):
    raise AssertionError("work started before the config was validated")


@pytest.mark.parametrize("changes, error, match", [
    ({"mesh.data": 3}, MeshError, "does not divide the 8 devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, MeshError, "use 4 devices but 8"),
    ({"data.batch_size": 12}, MeshError, "not divisible by data x fsdp = 1 x 8 = 8"),
    ({"data.batch_size": 16, "micro_batches": 4}, MeshError, "per micro-batch is not divisible"),
    ({"schedule.decay_type": "exponential"}, ValueError, "decay_type"),
    ({"objective": "reverse_kl"}, ValueError, "objective"),
    ({"student.path": ""}, ValueError, "student.path: required"),
    ({"data.files": ("absent.jsonl",)}, DataError, "config field data.files: absent.jsonl: data file not found"),
    ({"data.files": ("embedded:test",)}, DataError, "data.files: 'embedded:test': the embedded corpus is named by its split"),
])
def test_bad_config_fails_before_any_work(models, tmp_path, monkeypatch, changes, error, match):
    monkeypatch.setattr(train, "load_for_mesh", _fail_if_called)
    monkeypatch.setattr("m2d_jax.distill.input.load_windows", _fail_if_called)
    with pytest.raises(error, match=match):
        train.run(tiny_config(models, tmp_path / "bad", **changes))
    assert not (tmp_path / "bad").exists()


def test_unknown_config_keys_are_errors(models, tmp_path, capsys):
    with pytest.raises(KeyError, match="unknown config key 'optimizer.beta1'"):
        apply_overrides(load_config("distill/base"), ["--config.optimizer.beta1=0.8"])
    config = tiny_config(models, tmp_path)
    config.optimizer.beta1 = 0.8  # e.g. a typo in a config file
    with pytest.raises(ValueError, match=r"unknown config keys \['optimizer.beta1'\]"):
        check_config(config)
    raw = tiny_config(models, tmp_path).to_dict()
    raw["steps"] = "many"  # a config file building its own ConfigDict
    with pytest.raises(ValueError, match="steps='many': expected int"):
        check_config(ConfigDict(raw))
    assert cli.main(["distill", "--student", str(models["student"]), "--config.lossy.chunk=3"]) == 2
    assert "unknown config key 'lossy.chunk'" in capsys.readouterr().err


def test_steps_match_a_pytorch_transformers_loop(models, tmp_path):
    """Oracle: the same steps written with transformers models, F.kl_div, torch AdamW, clip_grad_norm_ and
    transformers' get_wsd_schedule give the same loss at every step (so the same updates)."""
    import torch
    import torch.nn.functional as F
    import transformers

    from m2d_jax.hf.oracle import load_reference

    config = tiny_config(models, tmp_path / "r", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    trainer = train.prepare(config)
    batches = [jax.device_get(next(trainer.stream)) for _ in range(5)]
    state, ours = trainer.state, []
    for batch in batches:
        state, metrics = trainer.train_step(state, trainer.teacher_params, batch)
        ours.append(float(metrics["loss"]))

    teacher, student = load_reference(models["teacher"]), load_reference(models["student"]).train()
    o, s = config.optimizer, config.schedule
    opt = torch.optim.AdamW(student.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    sched = transformers.get_wsd_schedule(opt, s.warmup_steps, s.decay_steps, num_training_steps=config.steps,
                                          min_lr_ratio=s.min_lr_ratio, decay_type=s.decay_type)
    reference = []
    for batch in batches:
        ids, mask = (torch.from_numpy(np.array(batch[k])).long() for k in ("input_ids", "attention_mask"))
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits, -1)
        s_logp = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits, -1)
        loss = (F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        reference.append(loss.item())
    assert reference[-1] < reference[0]  # it trains
    np.testing.assert_allclose(ours, reference, rtol=2e-5)


def test_bf16_teacher_and_bf16_remat_student_stay_close_to_float32(models, tmp_path):
    ref, _, _, _ = one_step(models, tmp_path / "f32", devices=jax.devices()[:1])
    loss, _, state, trainer = one_step(models, tmp_path / "bf16", devices=jax.devices()[:1], **{
        "teacher.dtype": "bfloat16", "student.compute_dtype": "bfloat16", "student.remat": True})
    assert trainer.teacher_params["embed"].dtype == jax.numpy.bfloat16
    assert state["params"]["embed"].dtype == jax.numpy.float32  # float32 master weights
    np.testing.assert_allclose(loss, ref, rtol=3e-2)


def test_chunked_loss_keeps_the_whole_train_step_memory_o_chunk(tmp_path):
    """XLA's temporaries of the whole compiled train step (``make_train_step``, fused loss), where the full logits
    dominate (vocab 8192 at d = 32): chunked over 16 of 256 positions <= 0.35x of unchunked."""
    import jax.numpy as jnp

    from m2d_jax.distill.objectives import ForwardKLDistillation
    from m2d_jax.distill.schedule import wsd_schedule
    from m2d_jax.distill.sharding import make_mesh
    from m2d_jax.hf.oracle import make_hf_checkpoint

    big_vocab = dict(vocab_size=8192, max_position_embeddings=256)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:1])
    (teacher, t_sh), (student, s_sh) = (
        train.load_for_mesh(make_hf_checkpoint(dict(cfg, **big_vocab), tmp_path / name, seed=i), mesh, "float32")
        for i, (name, cfg) in enumerate((("teacher", TEACHER), ("student", STUDENT))))
    schedule = wsd_schedule(1e-3, 10, 0, 0)
    tx = train.make_optimizer(dict(grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0), schedule)
    (s_gd, s_state), (t_gd, t_state) = nnx.split(student, nnx.Param), nnx.split(teacher, nnx.Param)
    state, state_sh = train.init_train_state(s_state.to_pure_dict(), tx, mesh, s_sh)
    spec = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def temp_bytes(chunk):
        step = train.make_train_step(s_gd, t_gd, tx, schedule, ForwardKLDistillation(chunk=chunk), 1, mesh, state_sh,
                                     t_sh)
        compiled = step.lower(state, t_state.to_pure_dict(), {"input_ids": spec, "attention_mask": spec}).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(16)
    assert full >= 2 * 256 * 8192 * 4  # one model's full float32 logits are live unchunked: a meaningful comparison
    assert chunked <= 0.35 * full


def test_m2d_checkpoint_restores_straight_into_the_mesh_layout(models, tmp_path):
    from m2d_jax import checkpoint, from_pretrained
    from m2d_jax.distill.sharding import make_mesh

    teacher = from_pretrained(models["teacher"])
    saved = checkpoint.save_model(teacher, tmp_path / "teacher_m2d")
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    loaded, shardings = train.load_for_mesh(saved, mesh, "float32", top_k=3)
    assert loaded.runtime.top_k == 3 and loaded.config == teacher.config
    ref = _flat(nnx.state(teacher, nnx.Param).to_pure_dict())
    got = nnx.state(loaded, nnx.Param).to_pure_dict()
    gate = got["stacks"][0]["moe"]["gate_proj"]
    assert gate.sharding.spec == P(None, "expert", "fsdp", "tensor") == shardings["stacks"][0]["moe"]["gate_proj"].spec
    for key, value in _flat(jax.device_get(got)).items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)
