"""model.init_from: training starts from a LoopMoE or Qwen3-MoE checkpoint; HF Trainer fine-tunes an export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loopmoe import LoopMoEForCausalLM
from loopmoe.convert import export_qwen3_moe
from loopmoe.testing.without_loopmoe import run_without_loopmoe
from loopmoe.training import load_run_config, read_metrics, run_training
from loopmoe.training.builders import default_model_factory
from tests.conftest import TINY_RUN

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _run_config(final, *extra):
    return load_run_config(CONFIG, [*TINY_RUN, f"model.init_from={final}", f"data.tokenizer={final}", *extra])


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_the_model_starts_as_the_checkpoint(trained_run, tmp_path):
    final = trained_run / "final"
    reference = LoopMoEForCausalLM.from_pretrained(final)
    started = default_model_factory(_run_config(final), reference.config.vocab_size)
    assert torch.equal(_logits(started), _logits(reference))
    # A converted Qwen3-MoE checkpoint too (the same model, written by `loopmoe export`).
    export_qwen3_moe(final, tmp_path / "qwen")
    from_qwen = default_model_factory(_run_config(tmp_path / "qwen"), reference.config.vocab_size)
    assert (_logits(from_qwen) - _logits(reference)).abs().max().item() < 1e-5
    # num_loops may differ (a looped core runs at any depth); the architecture may not.
    deeper = default_model_factory(_run_config(final, "model.num_loops=2"), reference.config.vocab_size)
    assert deeper.config.num_loops == 2 and deeper.config.hidden_size == reference.config.hidden_size


def test_contradicting_the_checkpoint_is_refused(trained_run):
    final = trained_run / "final"
    vocab = json.loads((final / "config.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match=r"model\.hidden_size = 64 \(the checkpoint has 32\): drop these keys"):
        default_model_factory(_run_config(final, "model.hidden_size=64"), vocab)
    with pytest.raises(ValueError, match=r"has a \d+-token vocabulary but the run's tokenizer has 7"):
        default_model_factory(_run_config(final), 7)
    with pytest.raises(ValueError, match="unknown model field.*hiden_size"):
        default_model_factory(_run_config(final, "model.hiden_size=64"), vocab)
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        default_model_factory(_run_config(final / "nowhere"), vocab)


def test_weights_of_other_shapes_are_one_line_naming_the_fix(trained_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from loopmoe.errors import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(trained_run / "final", bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = torch.zeros(2 * weights[name].shape[0], weights[name].shape[1])
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    vocab = json.loads((bad / "config.json").read_text())["vocab_size"]
    with pytest.raises(CheckpointError, match=rf"other shapes .*{name} .*point model.init_from at a checkpoint"):
        default_model_factory(_run_config(bad), vocab)


def test_continued_pretraining_runs_from_the_checkpoint(trained_run, tmp_path):
    final = trained_run / "final"
    run_training(_run_config(final, "train.max_steps=1"), tmp_path / "continued")
    fresh, continued = read_metrics(trained_run), read_metrics(tmp_path / "continued")
    # The first batch of a run is the same in both (same data and seed): starting from the trained
    # weights it scores as the trained model did after its steps, not as a fresh initialisation.
    assert continued[0]["lm_loss"] < fresh[0]["lm_loss"]
    config = json.loads((tmp_path / "continued" / "final" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_core_layers"] == 1


# HF Trainer, with transformers alone, on the export: two steps that change the weights.
HF_TRAINER = """
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained("{final}")
model = AutoModelForCausalLM.from_pretrained("{final}", trust_remote_code=True)
before = model.lm_head.weight.detach().clone()
texts = ["First Citizen: Before we proceed any further, hear me speak.", "All: Speak, speak.", "You are all resolved?"]
data = Dataset.from_dict({{"text": texts * 2}}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
args = TrainingArguments(output_dir="hf_trainer", max_steps=2, per_device_train_batch_size=3, learning_rate=1e-3,
                         report_to=[], use_cpu=True, logging_steps=1, save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=data,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
result = trainer.train()
assert torch.isfinite(torch.tensor(result.training_loss)), result
assert not torch.equal(before, model.lm_head.weight), "the weights did not change"
print("loss", result.training_loss)
"""


def test_hf_trainer_fine_tunes_the_export_without_loopmoe(trained_run, tmp_path):
    out = run_without_loopmoe(HF_TRAINER.format(final=trained_run / "final"), tmp_path)
    assert "loss" in out.stdout
