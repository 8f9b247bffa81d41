"""LoopMoE data pipeline: source spec -> documents -> tokenizer -> token shards -> batches.

Typical use::

    source = open_source("embedded")                      # or a path, or "hf:NAME"
    tokenizer = train_bpe_tokenizer(source, 8192, run_dir / "tokenizer")
    shards = prepare_shards(source, tokenizer, run_dir / "shards")
    loader = TokenBatchLoader(shards.tokens("train"), batch_size=8, seq_len=256, seed=0)
    input_ids = next(loader)                              # LongTensor (8, 256)
"""

from loopmoe.data.embedded import embedded_documents
from loopmoe.data.loader import TokenBatchLoader, validation_batches
from loopmoe.data.shards import (
    CorruptShardsError,
    ShardMeta,
    TokenShards,
    is_validation_document,
    load_shards,
    prepare_shards,
    token_dtype,
)
from loopmoe.data.sources import ACCEPTED_FORMATS, DataSource, open_source
from loopmoe.data.tokenizer import DEFAULT_EOS_TOKEN, LMTokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_EOS_TOKEN",
    "CorruptShardsError",
    "DataSource",
    "LMTokenizer",
    "ShardMeta",
    "TokenBatchLoader",
    "TokenShards",
    "embedded_documents",
    "is_validation_document",
    "load_shards",
    "load_tokenizer",
    "open_source",
    "prepare_shards",
    "token_dtype",
    "train_bpe_tokenizer",
    "validation_batches",
]
