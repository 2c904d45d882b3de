"""Distillation (``m2d distill``): every field, with the defaults of docs/METHOD.md §11 and §13. Other configs in this
directory start from this one; override any field on the command line, e.g.
``--config.steps=200 --config.mesh.tensor=2``.

Unknown keys (in a config file or an override) are errors before any compute.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    return ConfigDict(dict(
        objective="kl",  # "kl": forward KL(p_T || p_S) to the teacher; "lm": next-token CE (+ MoE load balancing)
        teacher=dict(
            path="",  # HF checkpoint dir or m2d_jax checkpoint (MoE or dense); unused for objective="lm"
            dtype="bfloat16",  # teacher parameters and compute ("float32" | "bfloat16")
            top_k=0,  # > 0: expanded teacher routing with k' experts per token (docs/METHOD.md §11); 0 = as trained
            moe_dispatch="auto",
        ),
        student=dict(
            path="",  # HF checkpoint dir or m2d_jax checkpoint (dense or MoE); parameters are trained in float32
            compute_dtype="float32",  # "bfloat16": bf16 compute over float32 master weights
            remat=False,  # rematerialise each layer in the backward pass
            moe_dispatch="auto",
        ),
        loss=dict(
            temperature=1.0,  # softmax temperature T; the KL is scaled by T^2
            chunk=256,  # sequence positions per loss chunk (0 = no chunking): live logits O(batch * chunk * vocab)
            fused=True,  # objective="kl": LM heads + KL in one pass with its own gradient (no logits recomputed)
            load_balance_weight=0.01,  # objective="lm" with an MoE student: Switch load-balancing loss weight
        ),
        data=dict(
            files=("embedded:train",),  # local .txt/.jsonl/.json/.parquet files; "embedded:<split>" = corpus split
            text_field="text",
            tokenizer="",  # directory with tokenizer.json; "" = the student's (then the teacher's) directory
            seq_len=2048,  # packed sequence length (docs/METHOD.md §13 open question 18)
            batch_size=384,  # global sequences per optimizer step
            seed=0,  # shuffling seed
        ),
        micro_batches=1,  # gradient accumulation: the batch is processed in this many micro-batches (lax.scan)
        steps=3000,  # optimizer steps (the schedule's length)
        stop_at_step=0,  # > 0: end this run after this step (checkpointed), e.g. to fit a job's time slot
        optimizer=dict(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0),
        schedule=dict(warmup_steps=100, decay_steps=300, min_lr_ratio=0.1, decay_type="cosine"),
        mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),  # device mesh; -1 = the rest of the devices
        checkpoint=dict(
            dir="",  # "" = WORKDIR/checkpoints; an existing checkpoint there is resumed
            every=500,  # save every N steps (asynchronously), and at the end / on SIGTERM
            keep=3,  # keep the last N checkpoints
            async_save=True,
        ),
        logging=dict(
            every=10,  # log metrics every N steps
            tensorboard=True,
            peak_flops_per_device=0.0,  # for MFU, e.g. 197e12 (TPU v4 bf16); 0 = MFU not reported
            progress=True,  # tqdm progress bar
        ),
        workdir="runs/distill",  # metrics.jsonl, tensorboard/, checkpoints/
        student_out="",  # where a completed run saves the trained student (m2d_jax checkpoint); "" = WORKDIR/student
    ))
