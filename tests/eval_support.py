"""Shared pieces of the evaluation tests: a tiny HF checkpoint with a real tokenizer, local lm-eval task YAMLs."""

from __future__ import annotations

from pathlib import Path

from conftest import ALL_CONFIGS, corpus_documents, make_checkpoint_with_tokenizer

DATA = Path(__file__).parent / "data"
TOKENIZER_VOCAB = 320  # byte-level BPE: 256 bytes + EOS + merges
MODEL_VOCAB = 384


def checkpoint_with_tokenizer(name: str, out: Path, **changes) -> Path:
    """conftest's HF config ``name`` with a vocabulary large enough for a BPE tokenizer trained on the embedded
    corpus, saved together with that tokenizer (loadable by transformers.AutoTokenizer and m2d_jax.data)."""
    config = dict(ALL_CONFIGS[name], vocab_size=MODEL_VOCAB, eos_token_id=0, bos_token_id=None, pad_token_id=None,
                  **changes)
    return make_checkpoint_with_tokenizer(config, out, seed=7, tokenizer_vocab=TOKENIZER_VOCAB,
                                          docs=corpus_documents(200))


def _data_block(file: str) -> str:
    path = (DATA / file).absolute()
    return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"


TASK_YAMLS = {
    "m2d_test_mc": """task: m2d_test_mc
{data}output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "m2d_test_rolling": """task: m2d_test_rolling
{data}output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "m2d_test_gen": """task: m2d_test_gen
{data}output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
TASK_FILES = {"m2d_test_mc": "eval_mc.jsonl", "m2d_test_rolling": "eval_rolling.jsonl",
              "m2d_test_gen": "eval_gen.jsonl"}


def write_task_yamls(directory: Path) -> Path:
    """The local tasks as YAML files with absolute data paths (lm-eval resolves relative ones against the cwd)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in TASK_YAMLS.items():
        (directory / f"{name}.yaml").write_text(text.format(data=_data_block(TASK_FILES[name])))
    return directory
