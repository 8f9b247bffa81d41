"""Resuming after the corpus changed: checked before anything is rebuilt; the old data is never deleted."""

from __future__ import annotations

import os

import pytest

from loopmoe.training import load_run_config, run_training
from tests.data.conftest import make_text
from tests.training.standins import TinyMoELM

ARGS = [
    "data.seq_len=16",
    "data.train_bpe_vocab=300",
    "data.val_fraction=0.3",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=4",
    "schedule.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
]


def _model_factory(cfg, vocab_size):
    return TinyMoELM(vocab=vocab_size)


def _cfg(corpus, steps):
    return load_run_config(None, [*ARGS, f"data.source={corpus}", f"train.max_steps={steps}"])


@pytest.fixture
def trained(tmp_path):
    corpus = tmp_path / "corpus.txt"
    # ~150 KB: a few documents at the default chunk size
    corpus.write_text(make_text(seed=1, paragraphs=600))
    out = tmp_path / "run"
    run_training(_cfg(corpus, 2), out, model_factory=_model_factory)
    return corpus, out


def test_touching_the_corpus_resumes_without_rebuilding(trained):
    corpus, out = trained
    shards = out / "data" / "shards" / "train.bin"
    before = shards.stat().st_mtime_ns
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = run_training(_cfg(corpus, 4), out, model_factory=_model_factory)
    assert result["step"] == 4
    assert shards.stat().st_mtime_ns == before


def test_changed_corpus_is_refused_before_anything_is_touched(trained):
    corpus, out = trained
    data = out / "data"
    snapshot = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    corpus.write_text(make_text(seed=2, paragraphs=600))
    with pytest.raises(ValueError, match="cannot resume.*step 2.*other data.*--rebuild-data"):
        run_training(_cfg(corpus, 4), out, model_factory=_model_factory)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == snapshot


def test_rebuild_data_moves_the_old_data_aside(trained):
    corpus, out = trained
    data = out / "data"
    old_train = (data / "shards" / "train.bin").read_bytes()
    corpus.write_text(make_text(seed=2, paragraphs=600))
    with pytest.warns(UserWarning, match="data was rebuilt"):
        result = run_training(_cfg(corpus, 4), out, model_factory=_model_factory, rebuild_data=True)
    assert result["step"] == 4
    assert (data / "shards.step2" / "train.bin").read_bytes() == old_train
    assert (data / "tokenizer.step2").is_dir()
    assert (data / "shards" / "train.bin").read_bytes() != old_train


def test_validation_split_smaller_than_a_batch_is_refused_before_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(seed=1, paragraphs=600))
    cfg = load_run_config(None, [*ARGS, f"data.source={corpus}", "data.seq_len=2048", "train.micro_batch_size=16"])
    with pytest.raises(ValueError, match=r"validation split has \d+ tokens, fewer than one evaluation batch"):
        run_training(cfg, tmp_path / "run", model_factory=_model_factory)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_same_corpus_through_another_data_dir_resumes(tmp_path, monkeypatch):
    # Fingerprints are content-based: the same bytes reached through another LOOPMOE_DATA_DIR (a symlink
    # to the first) are the same data; nothing is retrained or rebuilt.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "corpus.txt").write_text(make_text(seed=1, paragraphs=600))
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = tmp_path / "run"
    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(tmp_path / "a"))
    run_training(_cfg("corpus.txt", 2), out, model_factory=_model_factory)
    shards = out / "data" / "shards" / "train.bin"
    before = shards.stat().st_mtime_ns
    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(tmp_path / "b"))
    result = run_training(_cfg("corpus.txt", 4), out, model_factory=_model_factory)
    assert result["step"] == 4
    assert shards.stat().st_mtime_ns == before
