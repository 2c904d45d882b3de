"""Text data: local text / jsonl / parquet files -> the checkpoint's tokenizer -> packed sequences -> grain.

Documents are tokenised once, each followed by EOS, concatenated and cut into fixed-length windows (standard
packing, docs/METHOD.md §13 open question 21). The packed windows live in a NumPy array, so a ``grain.MapDataset`` over
window indices gives deterministic shuffling from a seed, sharding by process, and exact resume from a plain index.
"""

from m2d_jax.data.corpus import SPLITS, corpus_documents, corpus_records, write_split
from m2d_jax.data.text import (DataError, EMBEDDED_CORPUS, EMBEDDED_PREFIX, Tokenizer, check_data_files, load_tokenizer, pack_documents, packed_dataset,
                               read_documents, tokenize_documents, train_bpe_tokenizer)

__all__ = ["DataError", "EMBEDDED_CORPUS", "EMBEDDED_PREFIX", "SPLITS", "Tokenizer", "check_data_files", "corpus_documents", "corpus_records", "load_tokenizer",
           "pack_documents", "packed_dataset", "read_documents", "tokenize_documents", "train_bpe_tokenizer",
           "write_split"]
