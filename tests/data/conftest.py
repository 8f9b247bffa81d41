"""Fixtures for the data pipeline tests: small deterministic corpora and a tiny tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
from pathlib import Path

import pytest

from loopmoe.data import LMTokenizer, open_source, train_bpe_tokenizer
from loopmoe.paths import shared_data_dir

WORDS = [
    "the",
    "model",
    "loops",
    "over",
    "its",
    "experts",
    "while",
    "a",
    "router",
    "picks",
    "two",
    "of",
    "them",
    "for",
    "every",
    "token",
    "and",
    "the",
    "budget",
    "stays",
    "matched",
    "so",
    "that",
    "quality",
    "can",
    "be",
    "compared",
    "fairly",
    "across",
    "depth",
    "width",
    "and",
    "time",
]


def make_text(seed: int, paragraphs: int, words_per_paragraph: int = 40) -> str:
    """Deterministic pseudo-English: paragraphs separated by blank lines."""
    rng = random.Random(seed)
    return (
        "\n\n".join(
            " ".join(rng.choice(WORDS) for _ in range(words_per_paragraph)).capitalize() + "."
            for _ in range(paragraphs)
        )
        + "\n"
    )


@pytest.fixture(name="make_text", scope="session")
def make_text_fixture():
    """The ``make_text`` helper, for tests that need their own corpus."""
    return make_text


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder, or a clean skip when this machine has none."""
    directory = shared_data_dir()
    if directory is None or not directory.is_dir() or not any(directory.iterdir()):
        pytest.skip("shared data folder not found or empty (set LOOPMOE_DATA_DIR or place it at ../shared/data)")
    return directory


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """A ~60 KB text file: with chunk_chars=2000 it becomes ~30 documents."""
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(seed=0, paragraphs=250))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LMTokenizer:
    """A 300-token byte-level BPE trained once per session."""
    root = tmp_path_factory.mktemp("tiny_tokenizer")
    (root / "train.txt").write_text(make_text(seed=1, paragraphs=100))
    return train_bpe_tokenizer(open_source(root / "train.txt"), 300, root / "tokenizer", progress=False)
