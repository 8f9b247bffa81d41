"""Model and tokenizer folders never get their own Python run: trust_remote_code is pinned to False."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest

from loopmoe.evaluation.loading import load_hf_tokenizer, load_model

EVIL = "open({marker!r}, 'w').close()\n"


@pytest.fixture(autouse=True)
def user_says_yes(monkeypatch):
    """transformers asks on stdin before running a folder's code; answer yes, as `yes | loopmoe eval` would.

    With trust_remote_code pinned to False nothing is asked, so this changes nothing."""
    monkeypatch.setattr(builtins, "input", lambda *_: "y")


def _evil_folder(src, dst, marker, model_type):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    return dst


def test_model_folder_with_unknown_auto_map_is_refused(loopmoe_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _evil_folder(loopmoe_dir, tmp_path / "model", marker, "evil")
    with pytest.raises(ValueError, match=r"config\.json.*custom code.*never runs code") as info:
        load_model(folder)
    assert str(folder) in str(info.value)
    assert not marker.exists()


def test_run_eval_refuses_it_too(run_eval, loopmoe_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _evil_folder(loopmoe_dir, tmp_path / "model", marker, "evil")
    with pytest.raises(ValueError, match="never runs code"):
        run_eval([str(folder), "--text", str(tmp_path / "none.txt")])
    assert not marker.exists()


def test_loopmoe_folder_with_auto_map_loads_loopmoe_without_the_file(loopmoe_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _evil_folder(loopmoe_dir, tmp_path / "model", marker, "loopmoe")
    model = load_model(folder)
    assert type(model).__name__ == "LoopMoEForCausalLM"
    assert not marker.exists()


def _evil_tokenizer(loopmoe_dir, tmp_path, marker):
    folder = tmp_path / "tok"
    folder.mkdir()
    config = json.loads((loopmoe_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_evil.py").write_text(EVIL.format(marker=str(marker)))
    return folder


def test_tokenizer_folder_with_auto_map_is_refused(loopmoe_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _evil_tokenizer(loopmoe_dir, tmp_path, marker)
    with pytest.raises(ValueError, match="never runs code"):
        load_hf_tokenizer(tmp_path, tokenizer=folder)
    assert not marker.exists()


def test_training_tokenizer_folder_with_auto_map_is_refused(loopmoe_dir, tmp_path):
    from loopmoe.data import load_tokenizer

    marker = tmp_path / "pwned"
    folder = _evil_tokenizer(loopmoe_dir, tmp_path, marker)
    with pytest.raises(ValueError, match="never runs code"):
        load_tokenizer(folder)
    assert not marker.exists()


def test_compare_evaluation_stage_refuses_it_too(loopmoe_dir, tmp_path):
    # `loopmoe compare` reloads each trained run's export from its --out for its evaluation stage (depth
    # curve, expert load, text, tasks): a folder planted there with an auto_map is refused like any
    # other, its code never imported.
    import torch

    from loopmoe.evaluation.pipeline import evaluate_run

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    _evil_folder(loopmoe_dir, run_dir / "final", marker, "evil")
    with pytest.raises(ValueError, match="asks to run its own Python"):
        evaluate_run(
            run_dir,
            val_batches=lambda: [torch.zeros(1, 8, dtype=torch.long)],
            seq_len=8,
            depth_loops=[1],
            text=None,
            text_tokens=None,
            tasks=(),
            task_limit=None,
        )
    assert not marker.exists()
