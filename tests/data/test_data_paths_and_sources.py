"""Source specs: every format yields the expected documents; bad specs fail clearly."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

import pytest

from loopmoe.data import ACCEPTED_FORMATS, embedded_documents, open_source
from loopmoe.paths import shared_data_dir

RECORDS = [{"text": f"document number {i}", "id": i} for i in range(5)]


def test_shared_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPMOE_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_shared_data_dir_beside_checkout(monkeypatch):
    monkeypatch.delenv("LOOPMOE_DATA_DIR", raising=False)
    found = shared_data_dir()
    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    assert found == (beside if beside.is_dir() else None)


def test_small_text_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n")
    assert list(open_source(path).documents()) == ["first paragraph\n\nsecond paragraph"]


def test_large_text_file_is_cut_at_blank_lines(corpus_file):
    documents = list(open_source(corpus_file, chunk_chars=2000).documents())
    assert 20 <= len(documents) <= 40
    assert all(len(doc) >= 1999 for doc in documents[:-1])  # 2000 chars counted before the final newline is stripped
    original_paragraphs = corpus_file.read_text().strip().split("\n\n")
    assert [p for doc in documents for p in doc.split("\n\n")] == original_paragraphs


def test_folder_of_text_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "ignored.md").write_text("not a txt file")
    assert list(open_source(tmp_path).documents()) == ["ay", "bee", "sea"]


@pytest.mark.parametrize("suffix,opener", [("", open), (".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)])
def test_jsonl_plain_and_compressed(tmp_path, suffix, opener):
    path = tmp_path / f"docs.jsonl{suffix}"
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert list(open_source(path).documents()) == [r["text"] for r in RECORDS]


def test_compressed_text_file(tmp_path):
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("zipped words\n")
    assert list(open_source(path).documents()) == ["zipped words"]


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": r["text"]}) for r in RECORDS))
    assert len(list(open_source(path, text_field="body").documents())) == 5
    with pytest.raises(ValueError, match=r"docs.jsonl:1: no field 'text'.*rename the field"):
        list(open_source(path).documents())


def test_local_parquet_csv_json_through_datasets(tmp_path):
    import datasets

    texts = [r["text"] for r in RECORDS]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("text,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts)))
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in RECORDS))
    for name in ("d.parquet", "d.csv", "d.json"):
        assert list(open_source(tmp_path / name).documents()) == texts, name


def test_hf_spec_with_local_dataset_folder(tmp_path):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    source = open_source(f"hf:{folder}", split="train")
    assert list(source.documents()) == [r["text"] for r in RECORDS]
    assert source.identity() == open_source(f"hf:{folder}", split="train").identity()


def test_hf_spec_unknown_dataset_fails_clearly():
    source = open_source("hf:loopmoe-no-such-dataset-xyz")
    with pytest.raises(FileNotFoundError, match="loopmoe-no-such-dataset-xyz"):
        list(source.documents())


def test_identity_changes_with_file_and_options(corpus_file, make_text):
    before = open_source(corpus_file).identity()
    assert open_source(corpus_file).identity() == before
    assert open_source(corpus_file, chunk_chars=100).identity() != before
    corpus_file.write_text(make_text(seed=5, paragraphs=3))
    assert open_source(corpus_file).identity() != before


def test_identity_is_content_based_a_touch_does_not_change_it(corpus_file):
    before = open_source(corpus_file).identity()
    stat = corpus_file.stat()
    os.utime(corpus_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert open_source(corpus_file).identity() == before


def test_embedded_corpus_is_substantial_and_deterministic():
    documents = list(open_source("embedded").documents())
    assert len(documents) > 300
    assert sum(map(len, documents)) > 1_000_000
    assert tuple(documents) == embedded_documents()
    assert any("for" in doc and "statement" in doc for doc in documents[:100])  # pydoc topics come first


def test_missing_path_names_path_and_formats(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt") as info:
        open_source(missing)
    assert ACCEPTED_FORMATS in str(info.value)


def test_unknown_suffix_and_empty_folder(tmp_path):
    weird = tmp_path / "data.bin"
    weird.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown format.*data.bin"):
        open_source(weird)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        open_source(empty)
    with pytest.raises(ValueError, match="names no dataset"):
        open_source("hf:")


def test_shared_corpora(shared_dir):
    shakespeare = list(open_source(shared_dir / "tinyshakespeare" / "input.txt").documents())
    assert len(shakespeare) > 20 and shakespeare[0].startswith("First Citizen")
    wiki = open_source(shared_dir / "wikitext2" / "wiki.valid.tokens").documents()
    assert "=" in next(wiki)
    novels = open_source(shared_dir / "eltec_eng" / "eltec_eng_level1.jsonl.xz").documents()
    assert len(next(novels)) > 10_000  # reads only the first novel
