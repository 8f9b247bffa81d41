"""Tokenizer loading, BPE training, reuse and the transformers round trip."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from loopmoe.data import DEFAULT_EOS_TOKEN, load_tokenizer, open_source, train_bpe_tokenizer


def test_trained_bpe_has_eos_and_requested_size(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == 300
    assert tiny_tokenizer.eos_token == DEFAULT_EOS_TOKEN
    assert tiny_tokenizer.backend.token_to_id(DEFAULT_EOS_TOKEN) == tiny_tokenizer.eos_id
    ids = tiny_tokenizer.encode_batch(["the router picks experts"])[0]
    assert tiny_tokenizer.backend.decode(ids) == "the router picks experts"


def test_autotokenizer_round_trip(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    text = "The budget stays matched, naïvely 123!"
    assert hf(text)["input_ids"] == tiny_tokenizer.encode_batch([text])[0]
    assert hf.decode(hf(text)["input_ids"]) == text
    assert hf.eos_token_id == tiny_tokenizer.eos_id
    reloaded = load_tokenizer(tmp_path / "hf")
    assert reloaded.eos_id == tiny_tokenizer.eos_id
    assert reloaded.encode_batch([text]) == tiny_tokenizer.encode_batch([text])


def test_training_is_reused_and_redone_on_change(tmp_path, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(seed=2, paragraphs=30))
    out = tmp_path / "tok"
    train_bpe_tokenizer(open_source(corpus), 280, out, progress=False)
    stamp = out / "tokenizer.json"
    first_mtime = stamp.stat().st_mtime_ns
    train_bpe_tokenizer(open_source(corpus), 280, out, progress=False)
    assert stamp.stat().st_mtime_ns == first_mtime
    retrained = train_bpe_tokenizer(open_source(corpus), 290, out, progress=False)
    assert retrained.vocab_size == 290
    assert not list(tmp_path.glob(".tok.*"))  # no staging folders left behind


def test_max_chars_caps_training_text(tmp_path, make_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_text(seed=3, paragraphs=30))
    capped = train_bpe_tokenizer(open_source(corpus), 2000, tmp_path / "tok", max_chars=50, progress=False)
    assert capped.vocab_size < 300  # 50 characters cannot yield many merges


def test_saved_truncation_is_disabled(tmp_path, tiny_tokenizer):
    backend = Tokenizer.from_str(tiny_tokenizer.backend.to_str())
    backend.enable_truncation(max_length=5)
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert len(loaded.encode_batch(["the model loops over its experts " * 5])[0]) > 5


def test_missing_eos_and_missing_path_fail_clearly(tmp_path):
    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-text token.*eos_token="):
        load_tokenizer(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json", eos_token="[UNK]").eos_id == 1
    with pytest.raises(FileNotFoundError, match="missing.json.*train_bpe_tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "not_a_tokenizer").mkdir()
    with pytest.raises(ValueError, match="not a loadable HF tokenizer folder"):
        load_tokenizer(tmp_path / "not_a_tokenizer")
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(open_source("embedded"), 100, tmp_path / "t")


def test_shared_gpt2_and_neox(shared_dir):
    gpt2_file = load_tokenizer(shared_dir / "tokenizers" / "gpt2" / "tokenizer.json")
    assert (gpt2_file.eos_id, gpt2_file.vocab_size) == (50256, 50257)
    assert gpt2_file.encode_batch(["Hello world"])[0] == [15496, 995]
    long_ids = gpt2_file.encode_batch(["Hello world" * 40])[0]
    assert len(long_ids) == 80  # the saved max_length=50 truncation is off
    gpt2_folder = load_tokenizer(shared_dir / "tokenizers" / "gpt2")
    assert gpt2_folder.eos_id == 50256 and gpt2_folder.encode_batch(["Hello world" * 40])[0] == long_ids
    neox = load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    assert neox.eos_id == 0 and neox.encode_batch(["Hello"])[0] == [12092]
    config = json.loads((shared_dir / "tokenizers" / "gpt2" / "tokenizer_config.json").read_text())
    assert "<|endoftext|>" in json.dumps(config)


def test_the_stamp_is_content_based_and_old_stamps_are_read(tmp_path, make_text):
    from loopmoe.data.tokenizer import tokenizer_is_current

    (tmp_path / "a").mkdir()
    corpus = tmp_path / "a" / "c.txt"
    corpus.write_text(make_text(seed=2, paragraphs=30))
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = tmp_path / "tok"
    train_bpe_tokenizer(open_source(corpus), 280, out, progress=False)
    assert tokenizer_is_current(open_source(tmp_path / "b" / "c.txt"), 280, out)  # same bytes, other path
    # A stamp of older loopmoe holds the corpus's absolute path then; the same content hash is accepted.
    stamp_file = next(p for p in out.iterdir() if p.name.endswith(".json") and "source_identity" in p.read_text())
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps({**stamp, "source": "/somewhere/else/c.txt"}))
    assert tokenizer_is_current(open_source(corpus), 280, out)
    corpus.write_text(make_text(seed=3, paragraphs=30))  # other bytes: not current
    assert not tokenizer_is_current(open_source(corpus), 280, out)
