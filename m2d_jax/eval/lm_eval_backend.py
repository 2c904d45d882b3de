"""An in-process lm-eval backend for m2d_jax models, registered as ``"m2d"``.

``lm_eval.simple_evaluate(model="m2d", model_args="pretrained=PATH,dtype=bfloat16,batch_size=16", ...)`` after
importing this module, or from the shell ``python -m m2d_jax.eval --model m2d --model_args ...`` (lm-eval's own
CLI with this backend registered; lm-eval has no plugin entry point for models). Tokenisation,
context/continuation splitting, rolling windows and stop-sequence handling are lm-eval's own (``TemplateLM`` and
``lm_eval.models.utils``), exactly as its ``hf`` backend uses them; only the forward passes differ. Requests are
padded to a few fixed lengths (powers of two up to ``max_length``) and a fixed batch size, so XLA compiles a
handful of shapes.

Multi-host: every process runs the same requests in lock step (the model is one SPMD program across hosts, and
device results are all-gathered to the host by ``scoring.to_host``). lm-eval therefore sees ``rank`` 0 and
``world_size`` 1 on every process (a nonzero rank would make it skip documents); results are written once, by JAX
process 0 (``artifacts.write_json``, as ``m2d eval tasks`` does). ``mesh`` (axis sizes or a mesh config name;
default in a multi-process run: every device on ``fsdp``, ``distributed.stage_mesh``) imports the model sharded onto
it, and the scoring forward keeps each batch sharded over it (``batch_size`` must divide over its batch axes).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from m2d_jax.eval.generate import generate_tokens
from m2d_jax.eval.scoring import bucket_for, length_buckets, target_logprobs

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16


def _as_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("m2d")
class M2DLM(TemplateLM):
    """lm-eval ``LM`` over an m2d_jax model (HF or m2d_jax checkpoint directory, or a loaded ``CausalLM``)."""

    def __init__(self, pretrained, dtype: str = "float32", batch_size=DEFAULT_BATCH_SIZE, max_length=None,
                 max_gen_toks: int = 256, tokenizer=None, prefix_token_id=None, add_bos_token=None,
                 min_bucket: int = 32, seed: int = 0, moe_dispatch: str | None = None, mesh=None, **unused):
        super().__init__()
        import transformers

        from m2d_jax.distributed import stage_mesh
        from m2d_jax.pipeline import load_model

        ignored = {k: v for k, v in unused.items() if k not in ("device", "max_batch_size")}
        if ignored:
            raise ValueError(f"m2d backend: unknown model_args {sorted(ignored)}")
        overrides = {"moe_dispatch": moe_dispatch} if moe_dispatch else {}
        if isinstance(mesh, str):  # model_args: a mesh config name (configs/mesh/)
            from m2d_jax.mesh import load_mesh_config

            mesh = load_mesh_config(mesh).running_mesh_sizes()
        if isinstance(pretrained, (str, Path)):
            self.mesh = stage_mesh(mesh)  # multi-host default: every device on fsdp
            self.model = load_model(pretrained, dtype, self.mesh, **overrides)
        else:
            self.mesh, self.model = mesh, pretrained  # a loaded model: already placed on ``mesh`` (or None)
        tok_source = tokenizer or (pretrained if isinstance(pretrained, (str, Path)) else None)
        if tok_source is None:
            raise ValueError("m2d backend: pass tokenizer=DIR when pretrained is a loaded model")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_source))
        except Exception as err:
            raise ValueError(f"m2d backend: cannot load a tokenizer from {tok_source} ({err}); "
                             f"pass tokenizer=DIR (m2d_jax checkpoints do not store one)") from err
        self.batch_size_per_call = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        if self._max_length > self.model.config.max_position_embeddings:
            raise ValueError(f"max_length={self._max_length} exceeds the model's max_position_embeddings="
                             f"{self.model.config.max_position_embeddings}")
        self._max_gen_toks = int(max_gen_toks)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.add_bos_token = _as_bool(add_bos_token)
        self.buckets = length_buckets(self._max_length, int(min_bucket))
        self.seed = int(seed)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """``model_args`` win over lm-eval's own ``--batch_size``/``--device`` (so ``batch_size=16`` may be given in
        ``model_args`` as the issue's command line does)."""
        merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
        merged.update(arg_dict)
        return cls(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # ---- what lm-eval asks of an LM ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def rank(self) -> int:
        return 0  # lock-step SPMD: every process evaluates every request (see the module docstring)

    @property
    def world_size(self) -> int:
        return 1

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """As lm-eval's ``hf`` backend: the tokenizer's default special tokens unless told otherwise."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ---------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """(sum log p(continuation | context), continuation is greedy) per (key, context_enc, continuation_enc)."""
        sequences = []  # (input ids, target ids, number of continuation tokens)
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("loglikelihood requests need non-empty context and continuation tokens")
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            sequences.append((whole[:-1], whole[1:], min(len(continuation_enc), len(whole) - 1)))
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        by_bucket: dict[int, list[int]] = {}
        for i in sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0])):
            by_bucket.setdefault(bucket_for(len(sequences[i][0]), self.buckets), []).append(i)
        bs = self.batch_size_per_call
        start, padded_tokens = time.perf_counter(), 0
        quiet = disable_tqdm or jax.process_index() != 0
        pbar = tqdm(total=len(sequences), desc="m2d loglikelihood", disable=quiet)
        for length, members in by_bucket.items():
            for first in range(0, len(members), bs):
                batch = members[first:first + bs]
                inputs = np.zeros((bs, length), np.int32)
                targets = np.zeros((bs, length), np.int32)
                mask = np.zeros((bs, length), np.int32)
                for row, i in enumerate(batch):  # right padding: causal attention keeps real positions exact
                    inp, tgt, _ = sequences[i]
                    inputs[row, :len(inp)], targets[row, :len(tgt)], mask[row, :len(inp)] = inp, tgt, 1
                logprob, greedy = target_logprobs(self.model, inputs, targets, mask, mesh=self.mesh)
                padded_tokens += inputs.size
                for row, i in enumerate(batch):
                    n_inp, n_cont = len(sequences[i][0]), sequences[i][2]
                    cont = slice(n_inp - n_cont, n_inp)
                    results[i] = (float(logprob[row, cont].astype(np.float64).sum()), bool(greedy[row, cont].all()))
                pbar.update(len(batch))
        pbar.close()
        elapsed = time.perf_counter() - start
        real_tokens = sum(len(seq[0]) for seq in sequences)
        log.info("%d loglikelihood sequences in %.1fs: %.0f tokens/s, %.0f%% of the padded shapes used", len(sequences),
                 elapsed, real_tokens / max(elapsed, 1e-9), 100 * real_tokens / max(padded_tokens, 1))
        for (key, _, _), result in zip(requests, results):
            if key is not None and key[0] is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string over disjoint ``max_length`` windows (lm-eval's own windowing)."""
        windows, owners = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first ``until`` string (EOS included), KV-cache decoding in fixed batches."""
        collator = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        quiet = disable_tqdm or jax.process_index() != 0
        pbar = tqdm(total=len(requests), desc="m2d generate_until", disable=quiet)
        results = []
        for chunk in collator.get_batched(n=self.batch_size_per_call):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            unsupported = sorted(set(kwargs) - {"do_sample", "temperature", "top_p"})
            if unsupported:
                raise ValueError(f"m2d backend: unsupported generation_kwargs {unsupported} "
                                 f"(supported: until, max_gen_toks, do_sample, temperature, top_p)")
            max_ctx = self.max_length - max_gen_toks
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen_toks} must be smaller than max_length={self.max_length}")
            temperature = 0.0  # greedy unless sampling is asked for (transformers' default temperature is 1)
            if kwargs.get("do_sample"):
                temperature = float(kwargs["temperature"]) if kwargs.get("temperature") else 1.0
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]

            def stop(row):
                text = self.tok_decode(row)
                return any(u and u in text for u in until)

            outs = generate_tokens(self.model, prompts, max_gen_toks, temperature=temperature,
                                   top_p=float(kwargs.get("top_p") or 1.0), eos_ids=[self.eot_token_id], stop=stop,
                                   batch_size=self.batch_size_per_call, pad_id=self.eot_token_id, seed=self.seed,
                                   mesh=self.mesh)
            for context, gen_kwargs, row in zip(contexts, all_kwargs, outs):
                text = postprocess_generated_text(self.tok_decode(row), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            pbar.update(len(contexts))
        pbar.close()
        return collator.get_original(results)

