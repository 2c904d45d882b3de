"""Reading, tokenising and packing local text for calibration, distillation and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from m2d_jax.errors import DataError

EMBEDDED_CORPUS = Path(__file__).parent / "corpus" / "python_docs.jsonl.gz"
EMBEDDED_PREFIX = "embedded:"  # a data-files entry "embedded:<split>" = that split of the embedded corpus
_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _format_of(path: Path) -> str:
    """The reader for ``path`` by its extension (after any compression suffix); no extension (``LICENSE``,
    ``README.gz``) is plain text."""
    suffixes = [s for s in path.suffixes if s not in _COMPRESSIONS]
    if not suffixes:
        return "text"
    fmt = _FORMATS.get(suffixes[-1].lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {suffixes[-1]!r} (expected one of {sorted(_FORMATS)}, or no "
                        f"extension for plain text, optionally compressed as {'/'.join(_COMPRESSIONS)})")
    return fmt


def check_data_files(files: Sequence[str | Path], field: str = "data files") -> list[str]:
    """``files`` checked before any work and made absolute: each entry an existing file or ``embedded:<split>``
    (``train``, ``calibration``, ``heldout``: that split of the embedded corpus, kept as written). ``field`` names
    the config field in the one-line error."""
    from m2d_jax.data.corpus import SPLITS

    if not files:
        raise DataError(f"{field}: no data files given")
    checked = []
    for entry in map(str, files):
        if entry.startswith(EMBEDDED_PREFIX) or entry == "embedded":
            if entry[len(EMBEDDED_PREFIX):] not in SPLITS:
                raise DataError(f"{field}: {entry!r}: the embedded corpus is named by its split, expected one of "
                                f"{', '.join(EMBEDDED_PREFIX + s for s in SPLITS)}")
            checked.append(entry)
        elif not Path(entry).is_file():
            raise DataError(f"{field}: {entry}: data file not found")
        else:
            checked.append(str(Path(entry).absolute()))
    return checked


def read_documents(files: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """Documents of local files through ``datasets.load_dataset`` ("text" | "json" | "parquet" by extension).

    Plain text files (.txt, .text, .md, .rst, or no extension such as ``LICENSE``) yield one document per file
    (lines joined); json/jsonl/parquet yield one per record. An entry ``embedded:train`` (``:calibration``,
    ``:heldout``) is that split of the embedded corpus.
    """
    import datasets

    from m2d_jax.data.corpus import corpus_documents

    docs: list[str] = []
    for entry in check_data_files(files):
        if entry.startswith(EMBEDDED_PREFIX):
            docs.extend(corpus_documents(entry[len(EMBEDDED_PREFIX):]))
            continue
        f = Path(entry)
        fmt = _format_of(f)
        try:
            if fmt == "text":
                ds = datasets.load_dataset("text", data_files=str(f), split="train", sample_by="document")
            else:
                ds = datasets.load_dataset(fmt, data_files=str(f), split="train")
        except Exception as err:  # datasets raises many types for unreadable files
            raise DataError(f"{f}: cannot read as {fmt} ({type(err).__name__}: {err})") from err
        if len(ds) and text_field not in ds.column_names:
            raise DataError(f"{f}: no field {text_field!r} (fields: {ds.column_names})")
        texts = [t for t in (ds[text_field] if len(ds) else []) if t and t.strip()]
        if not texts:
            raise DataError(f"{f}: contains no text")
        docs.extend(texts)
    return docs


class Tokenizer:
    """The checkpoint's own tokenizer, from its ``tokenizer.json`` (fast path; never imports torch), or
    ``transformers.AutoTokenizer`` when the directory has no tokenizer.json."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.directory = directory
        self.eos_id = _eos_id(directory)
        if (directory / "tokenizer.json").exists():
            import tokenizers

            self._fast = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            self._fast.no_padding()
            self._fast.no_truncation()
            self._hf = None
        else:
            try:
                import transformers

                self._hf = transformers.AutoTokenizer.from_pretrained(directory)
            except Exception as err:
                raise DataError(f"{directory}: no tokenizer found ({err})") from err
            self._fast = None
            if self.eos_id is None:
                self.eos_id = self._hf.eos_token_id
        if self.eos_id is None:
            raise DataError(f"{directory}: cannot determine the EOS token id (set eos_token_id in config.json)")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=False)
        return self._hf.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self._fast.get_vocab_size() if self._fast is not None else len(self._hf)


def _eos_id(directory: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        p = directory / name
        if p.exists():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if eos is not None:
                return int(eos)
    p = directory / "tokenizer_config.json"
    if p.exists() and (directory / "tokenizer.json").exists():
        token = json.loads(p.read_text()).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token:
            import tokenizers

            return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id(token)
    return None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer(directory)


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer, batch_size: int = 256) -> np.ndarray:
    """All documents tokenised, each followed by EOS, concatenated: int32 [total_tokens]."""
    pieces = []
    for i in range(0, len(docs), batch_size):
        for ids in tokenizer.encode_batch(docs[i:i + batch_size]):
            pieces.append(np.asarray(ids + [tokenizer.eos_id], np.int32))
    if not pieces:
        raise DataError("no documents to tokenise")
    return np.concatenate(pieces)


def pack_documents(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Packed windows int32 [num_seqs, seq_len] (the tail shorter than seq_len is dropped)."""
    if seq_len <= 0:
        raise DataError(f"seq_len must be > 0, got {seq_len}")
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"only {len(tokens)} tokens: not enough for one sequence of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def packed_dataset(windows: np.ndarray, batch_size: int, seed: int | None = 0, shuffle: bool = True,
                   shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = 1, drop_remainder=True):
    """A ``grain.MapDataset`` of batches {"input_ids": int32 [batch, seq], "attention_mask": int32 [batch, seq]}.

    Deterministic given ``seed``; each process takes its own shard (``shard_index`` of ``shard_count``, e.g.
    ``jax.process_index()`` / ``jax.process_count()``); ``num_epochs=None`` repeats forever.
    """
    import grain

    ds = grain.MapDataset.source(windows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds[shard_index::shard_count]
    ds = ds.map(lambda w: {"input_ids": np.asarray(w, np.int32), "attention_mask": np.ones(len(w), np.int32)})
    return ds.batch(batch_size, drop_remainder=drop_remainder)


EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """A byte-level BPE trained on ``docs``, saved as ``tokenizer.json`` + ``tokenizer_config.json`` (loadable by
    ``transformers.AutoTokenizer`` too), with ``<|endoftext|>`` as EOS (id 0)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "model_max_length": 1 << 30}))
    return Tokenizer(out)
