"""LoopMoE data pipeline: source spec -> documents -> tokenizer -> token shards -> batches.

A run's ``[data]`` section (``DataSection``) gives its tokenizer and shards in one call::

    prepared = prepare_data(DataSection(source="embedded", train_bpe_vocab=8192, data_dir="data"))

Step by step::

    source = open_source("embedded")                      # or a path, or "hf:NAME"
    tokenizer = train_bpe_tokenizer(source, 8192, run_dir / "tokenizer")
    shards = prepare_shards(source, tokenizer, run_dir / "shards")
    loader = TokenBatchLoader(shards.tokens("train"), batch_size=8, seq_len=256, seed=0)
    input_ids = next(loader)                              # LongTensor (8, 256)
"""

from loopmoe.data.config import DataSection
from loopmoe.data.embedded import embedded_documents
from loopmoe.data.loader import TokenBatchLoader, validation_batches
from loopmoe.data.prepare import DataChangedError, PreparedData, check_resume_data, prepare_data
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
    "DataChangedError",
    "DataSection",
    "DataSource",
    "LMTokenizer",
    "PreparedData",
    "ShardMeta",
    "TokenBatchLoader",
    "TokenShards",
    "check_resume_data",
    "embedded_documents",
    "is_validation_document",
    "load_shards",
    "load_tokenizer",
    "open_source",
    "prepare_data",
    "prepare_shards",
    "token_dtype",
    "train_bpe_tokenizer",
    "validation_batches",
]
