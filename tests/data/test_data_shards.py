"""Shard building, reuse, rebuild, dtype choice, atomicity and the validation split."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from loopmoe.atomic import clean_stale_temporaries
from loopmoe.data import (
    CorruptShardsError,
    DataSource,
    LMTokenizer,
    is_validation_document,
    load_shards,
    load_tokenizer,
    open_source,
    prepare_shards,
    token_dtype,
)


def test_build_contents_and_meta(corpus_file, tiny_tokenizer, tmp_path):
    source = open_source(corpus_file, chunk_chars=2000)
    shards = prepare_shards(source, tiny_tokenizer, tmp_path / "shards", val_fraction=0.2, progress=False)
    assert not shards.reused
    documents = list(source.documents())
    expected = {"train": [], "val": []}
    for index, ids in enumerate(tiny_tokenizer.encode_batch(documents)):
        expected["val" if is_validation_document(index, 0.2) else "train"] += [*ids, tiny_tokenizer.eos_id]
    for split in ("train", "val"):
        assert shards.tokens(split).dtype == np.uint16
        assert shards.tokens(split).tolist() == expected[split]
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["documents"]["val"] == round(len(documents) * 0.2)
    assert meta["tokens"] == {split: len(expected[split]) for split in ("train", "val")}
    assert (meta["eos_id"], meta["vocab_size"], meta["dtype"]) == (tiny_tokenizer.eos_id, 300, "uint16")


def test_validation_split_is_an_even_fraction():
    held_out = [i for i in range(100) if is_validation_document(i, 0.1)]
    assert held_out == list(range(9, 100, 10))
    assert sum(is_validation_document(i, 0.05) for i in range(1000)) == 50
    assert not any(is_validation_document(i, 0.0) for i in range(100))


def test_second_call_reuses_without_reading_the_source(corpus_file, tiny_tokenizer, tmp_path, caplog):
    source = open_source(corpus_file, chunk_chars=2000)
    first = prepare_shards(source, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False)
    mtime = (tmp_path / "s" / "train.bin").stat().st_mtime_ns

    def must_not_read():
        raise AssertionError("the source was read again")

    same_identity = DataSource(source.spec, must_not_read, source.identity)
    with caplog.at_level(logging.INFO, logger="loopmoe.data.shards"):
        second = prepare_shards(same_identity, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False)
    assert second.reused and second.meta == first.meta
    assert "reusing token shards" in caplog.text
    assert (tmp_path / "s" / "train.bin").stat().st_mtime_ns == mtime
    assert load_shards(tmp_path / "s").meta == first.meta


def test_shards_are_reused_from_another_path_and_from_old_fingerprints(corpus_file, tiny_tokenizer, tmp_path):
    from loopmoe.data.shards import shards_fingerprint

    source = open_source(corpus_file, chunk_chars=2000)
    first = prepare_shards(source, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False)
    elsewhere = DataSource("/another/data/dir/corpus.txt", source.documents, source.identity)  # same bytes
    assert prepare_shards(elsewhere, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False).reused
    # A folder written by older loopmoe: its fingerprint also hashed the path it records in meta.json.
    meta_file = tmp_path / "s" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["fingerprint"] = shards_fingerprint(source, tiny_tokenizer, 0.2, legacy_spec=meta["source"])
    assert meta["fingerprint"] != first.meta.fingerprint
    meta_file.write_text(json.dumps(meta))
    assert prepare_shards(elsewhere, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False).reused


def test_rebuild_when_source_split_or_tokenizer_changes(corpus_file, tiny_tokenizer, tmp_path, make_text):
    out = tmp_path / "s"
    first = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, out, val_fraction=0.2, progress=False
    )
    other_split = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, out, val_fraction=0.1, progress=False
    )
    assert not other_split.reused and other_split.meta.fingerprint != first.meta.fingerprint

    corpus_file.write_text(make_text(seed=9, paragraphs=120))
    changed = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, out, val_fraction=0.1, progress=False
    )
    assert not changed.reused and changed.meta.tokens != other_split.meta.tokens

    retokenised = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), _wordlevel_tokenizer(10), out, val_fraction=0.1, progress=False
    )
    assert not retokenised.reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "s"]  # no staging or old folders left


def test_token_dtype_choice():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    tokenizer = _wordlevel_tokenizer(70_000)
    corpus = tmp_path / "c.txt"
    corpus.write_text("w69998 w3 w65536\n\nw1 w2\n")
    shards = prepare_shards(open_source(corpus), tokenizer, tmp_path / "s", val_fraction=0.0, progress=False)
    assert shards.meta.dtype == "uint32"
    assert shards.tokens("train").tolist() == [69998, 3, 65536, 1, 2, tokenizer.eos_id]
    assert shards.tokens("val").size == 0


def test_interrupted_build_leaves_previous_shards_intact(corpus_file, tiny_tokenizer, tmp_path):
    out = tmp_path / "s"
    good = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, out, val_fraction=0.2, progress=False
    )

    def crash_midway():
        yield "some text"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_shards(DataSource("crashy", crash_midway, lambda: "crashy"), tiny_tokenizer, out, progress=False)
    assert load_shards(out).meta == good.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "s"]

    with pytest.raises(KeyboardInterrupt):
        prepare_shards(
            DataSource("crashy", crash_midway, lambda: "crashy"), tiny_tokenizer, tmp_path / "new", progress=False
        )
    assert not (tmp_path / "new").exists()


def test_truncated_bin_is_not_reused(corpus_file, tiny_tokenizer, tmp_path):
    source = open_source(corpus_file, chunk_chars=2000)
    prepare_shards(source, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False)
    train = tmp_path / "s" / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(FileNotFoundError, match="prepare_shards"):
        load_shards(tmp_path / "s")
    assert not prepare_shards(source, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False).reused


def test_bad_split_parameters_fail_clearly(tmp_path, tiny_tokenizer):
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("a single short document")
    with pytest.raises(ValueError, match="only 1 document, too few.*use more data") as error:
        prepare_shards(open_source(one_doc), tiny_tokenizer, tmp_path / "s", progress=False)
    # no impossible advice ("raise val_fraction to at least 1") nor keys the run config lacks
    assert "at least 1" not in str(error.value) and "chunk_chars" not in str(error.value)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        prepare_shards(open_source(one_doc), tiny_tokenizer, tmp_path / "s", val_fraction=1.0)
    with pytest.raises(ValueError, match="split must be one of"):
        prepare_shards(open_source(one_doc), tiny_tokenizer, tmp_path / "s", val_fraction=0.0, progress=False).tokens(
            "test"
        )


def test_shared_tinyshakespeare_with_gpt2(shared_dir, tmp_path):
    tokenizer = load_tokenizer(shared_dir / "tokenizers" / "gpt2" / "tokenizer.json")
    source = open_source(shared_dir / "tinyshakespeare" / "input.txt")
    shards = prepare_shards(source, tokenizer, tmp_path / "s", val_fraction=0.1, progress=False)
    assert shards.meta.dtype == "uint16"
    assert 300_000 < shards.meta.tokens["train"] + shards.meta.tokens["val"] < 360_000
    assert shards.meta.documents["val"] >= 3
    assert int(shards.tokens("train")[-1]) == 50256


def _wordlevel_tokenizer(size: int) -> LMTokenizer:
    vocab = {f"w{i}": i for i in range(size)}
    vocab["<|endoftext|>"] = size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return LMTokenizer(backend, "<|endoftext|>", size)


def test_corrupted_token_bytes_fail_with_a_clear_error(corpus_file, tiny_tokenizer, tmp_path):
    source = open_source(corpus_file, chunk_chars=2000)
    shards = prepare_shards(source, tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False)
    assert set(shards.meta.sha256) == {"train", "val"}
    train = tmp_path / "s" / "train.bin"
    data = bytearray(train.read_bytes())
    data[10:12] = b"\xff\xff"  # same size: an id far beyond the vocabulary
    train.write_bytes(bytes(data))
    with pytest.raises(CorruptShardsError, match="train.bin.*corrupted.*delete the shard folder"):
        load_shards(tmp_path / "s").tokens("train")


def test_text_without_blank_lines_is_split_into_documents(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("".join(f"line {i} of a corpus that never has an empty line\n" for i in range(8000)))
    assert len(list(open_source(corpus).documents())) > 1
    shards = prepare_shards(open_source(corpus), tiny_tokenizer, tmp_path / "s", val_fraction=0.2, progress=False)
    assert shards.meta.documents["val"] >= 1


ROOT = Path(__file__).resolve().parents[2]

_BUILD_AND_DIE = """
import os, signal, sys
import loopmoe.atomic as atomic
import loopmoe.data.shards as shards
from loopmoe.data import load_tokenizer, open_source, prepare_shards

corpus, tokenizer_dir, out, where = sys.argv[1:]
tokenizer = load_tokenizer(tokenizer_dir)
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if where == "tokenise":  # the staging train.bin / val.bin half written
    shards._BATCH_CHARS = 4000  # several batches of documents, so the kill comes after some were written
    real = type(tokenizer).encode_batch
    calls = []
    type(tokenizer).encode_batch = lambda self, texts: die() if calls.append(1) or len(calls) == 2 else real(self, texts)
else:  # the staging folder complete, about to be swapped in
    atomic.publish_directory = die
prepare_shards(open_source(corpus, chunk_chars=2000), tokenizer, out, val_fraction=0.2, progress=False)
"""


@pytest.mark.parametrize("where", ["tokenise", "publish"])
def test_kill_9_while_building_shards_leaves_the_old_shards(corpus_file, tiny_tokenizer, tmp_path, where):
    # A `loopmoe train` killed while it rebuilds shards (the corpus changed): the shards in place stay the
    # previous ones, whole; the killed build's staging folder is removed at the next start (its PID is gone)
    # and the rebuild equals an uninterrupted one.
    out, tokenizer_dir = tmp_path / "s", tiny_tokenizer.save(tmp_path / "tok")
    old = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, out, val_fraction=0.2, progress=False
    )
    old_bytes = {p.name: p.read_bytes() for p in out.iterdir()}
    corpus_file.write_text(corpus_file.read_text() * 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", _BUILD_AND_DIE, str(corpus_file), str(tokenizer_dir), str(out), where]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_shards(out).meta == old.meta and {p.name: p.read_bytes() for p in out.iterdir()} == old_bytes
    (debris,) = [p.name for p in tmp_path.iterdir() if ".loopmoe-staging-" in p.name]
    assert [p.name for p in clean_stale_temporaries(tmp_path, held=False)] == [debris]
    rebuilt = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, out, val_fraction=0.2, progress=False
    )
    fresh = prepare_shards(
        open_source(corpus_file, chunk_chars=2000), tiny_tokenizer, tmp_path / "fresh", val_fraction=0.2, progress=False
    )
    assert rebuilt.meta == fresh.meta != old.meta
    assert (out / "train.bin").read_bytes() == (tmp_path / "fresh" / "train.bin").read_bytes()
