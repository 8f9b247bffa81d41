"""Property tests: on arbitrary small inputs the balancing solver and the corpus/task-file loaders either
work or raise a clear error (ValueError / FileNotFoundError) of ours, never an exception from inside
torch, tokenizers or lm-eval, and never hang (a deadline per example, few examples)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loopmoe.balance import STRATEGIES, balance
from loopmoe.data import open_source
from loopmoe.evaluation.custom_task import load_task_file
from loopmoe.presets import get_preset

FAST = settings(max_examples=25, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
CLEAR = (ValueError, FileNotFoundError)


@FAST
@given(
    preset=st.sampled_from(["debug", "small", "bench"]),
    layers=st.integers(1, 8),
    num_loops=st.integers(-1, 6),
    prelude=st.integers(-1, 3),
    coda=st.integers(-1, 3),
    strategy=st.sampled_from([*STRATEGIES, "bogus"]),
)
@example(preset="debug", layers=4, num_loops=5, prelude=-1, coda=0, strategy="capacity")
@example(preset="debug", layers=4, num_loops=3, prelude=-1, coda=0, strategy="capacity")
@example(preset="debug", layers=2, num_loops=1, prelude=2, coda=2, strategy="capacity")
def test_balance_works_or_says_why(preset, layers, num_loops, prelude, coda, strategy):
    reference = get_preset(preset, num_core_layers=layers, num_loops=1)
    try:
        result = balance(reference, num_loops, strategy=strategy, num_prelude_layers=prelude, num_coda_layers=coda)
    except ValueError as error:
        message = str(error)
        assert "divisors of 0" not in message and "divisors of -" not in message
        if strategy in STRATEGIES and prelude < 0:  # named as the problem, not "choose num_loops from divisors"
            assert "num_prelude_layers must be" in message
        return
    assert result.looped.num_loops == num_loops
    assert result.looped.num_prelude_layers >= 0 and result.looped.num_coda_layers >= 0
    assert result.looped.executed_depth() == reference.executed_depth()


text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)
lines = st.lists(st.one_of(text, st.just(""), st.just("\n")), max_size=12)


@FAST
@given(
    suffix=st.sampled_from([".txt", ".md", ".jsonl", ".bin", ".txt.gz"]),
    body=lines,
    records=st.lists(
        st.one_of(st.dictionaries(st.sampled_from(["text", "body"]), st.one_of(text, st.integers())), text), max_size=5
    ),
    chunk_chars=st.integers(-1, 64),
)
def test_corpus_loader_works_or_says_why(suffix, body, records, chunk_chars):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus{suffix}"
        if suffix == ".jsonl":
            content = "\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records)
        else:
            content = "\n".join(body)
        if suffix.endswith(".gz"):
            import gzip

            path.write_bytes(gzip.compress(content.encode()))
        else:
            path.write_text(content, encoding="utf-8")
        try:
            documents = list(open_source(path, chunk_chars=chunk_chars).documents())
        except CLEAR as error:
            assert str(error)
            return
        assert all(isinstance(d, str) and d.strip() for d in documents)


yaml_values = st.one_of(
    st.none(), st.integers(-3, 3), text, st.lists(text, max_size=3), st.sampled_from(["{q}", "options", "answer"])
)


@FAST
@given(
    fields=st.dictionaries(
        st.sampled_from(["jsonl", "prompt", "choices", "gold", "task", "metrics", "extra"]), yaml_values, max_size=6
    ),
    raw_yaml=st.one_of(st.none(), text),
    docs=st.lists(
        st.dictionaries(
            st.sampled_from(["q", "options", "answer"]),
            st.one_of(st.integers(-3, 5), text, st.lists(text, max_size=3), st.none()),
        ),
        max_size=4,
    ),
)
@example(fields={}, raw_yaml="jsonl: [unclosed\n", docs=[])
@example(fields={}, raw_yaml=None, docs=[{"q": "x", "options": ["a", "b"], "answer": 2}])
@example(
    fields={}, raw_yaml=None, docs=[{"q": "x", "options": ["a"], "answer": 0}, {"q": 1, "options": [], "answer": 0}]
)
def test_task_file_loader_works_or_says_why(fields, raw_yaml, docs):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        spec = {"jsonl": "t.jsonl", "prompt": "{q}", "choices": "options", "gold": "answer", **fields}
        path = Path(tmp) / "t.yaml"
        path.write_text(raw_yaml if raw_yaml is not None else yaml.safe_dump(spec))
        try:
            cfg = load_task_file(path)
            dataset = cfg["custom_dataset"]()["test"]
            for doc in dataset:
                cfg["doc_to_text"](doc)
                choices = cfg["doc_to_choice"](doc)
                assert 0 <= cfg["doc_to_target"](doc) < len(choices)
        except CLEAR as error:
            assert str(error)


def _tiny_loopmoe_checkpoint(folder: Path) -> None:
    import torch

    from loopmoe import LoopMoEConfig, LoopMoEForCausalLM

    torch.manual_seed(0)
    config = LoopMoEConfig(
        vocab_size=64, hidden_size=16, num_core_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, max_position_embeddings=32,
    )  # fmt: skip
    LoopMoEForCausalLM(config).save_pretrained(folder)


_CHECKPOINT = Path(tempfile.mkdtemp(prefix="loopmoe-prop-")) / "src"
_tiny_loopmoe_checkpoint(_CHECKPOINT)
_FILES = ("config.json", "model.safetensors")


@settings(max_examples=30, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    target=st.sampled_from(_FILES),
    cut=st.integers(0, 4000),
    flip=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
    truncate=st.booleans(),
    command=st.sampled_from(["export", "convert"]),
)
def test_export_and_convert_of_a_damaged_checkpoint_work_or_say_why(target, cut, flip, truncate, command):
    """Bytes of config.json or the weights cut short or overwritten: an exact export or one line of loopmoe's
    error tree naming the fix; never another exception, never a write next to the source, never a partial output."""
    import shutil

    from loopmoe.convert import convert_qwen3_moe, export_qwen3_moe
    from loopmoe.errors import LoopMoEError

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        shutil.copytree(_CHECKPOINT, src)
        path = src / target
        data = bytearray(path.read_bytes())
        for offset, value in flip:
            if data:
                data[offset % len(data)] = value
        if truncate and data:
            data = data[: cut % len(data)]
        path.write_bytes(bytes(data))
        run = export_qwen3_moe if command == "export" else convert_qwen3_moe
        try:
            run(src, out)
        except LoopMoEError as error:
            assert str(error) and "\n" not in str(error).strip()
            assert not out.exists()  # nothing half-written
        assert sorted(p.name for p in Path(tmp).iterdir()) in (["src"], ["out", "src"])
