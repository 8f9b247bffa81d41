"""``[data]``: the corpus, the tokenizer and where both are cached (read by ``loopmoe.data.prepare``)."""

from __future__ import annotations

from dataclasses import dataclass

from loopmoe.options import option


@dataclass
class DataSection:
    """Corpus and tokenizer: `source` is a corpus name or path resolved by `loopmoe.data`."""

    source: str = option(
        "tinyshakespeare",
        help="corpus: a text/JSONL file or folder, 'embedded', 'hf:NAME', or a folder of the shared data dir",
    )
    tokenizer: str | None = option(
        None, help="tokenizer.json / HF dir / name under the shared tokenizers folder (e.g. gpt2)"
    )
    train_bpe_vocab: int | None = option(
        None, help="vocabulary of a BPE trained on the source (without data.tokenizer)"
    )
    val_fraction: float = option(0.05, help="share of the corpus held out for validation")
    seq_len: int = option(128, help="tokens per training sequence")
    data_dir: str | None = option(None, help="tokenizer and shard cache", shown="OUT_DIR/data")
