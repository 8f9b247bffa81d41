"""Saved checkpoints carry their own code: plain transformers loads them (trust_remote_code=True)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from loopmoe import LoopMoEForCausalLM
from loopmoe.evaluation.loading import load_model
from loopmoe.model import remote_code
from loopmoe.testing.without_loopmoe import run_without_loopmoe

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))

# Loads the folder with transformers alone, checks no loopmoe module was imported, writes the logits
# (as trained and at another depth) and saves the model again.
PLAIN_LOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True).eval()
assert not any(m.split(".")[0] == "loopmoe" for m in sys.modules), "loopmoe was imported"
ids = load_file("{path}/ids.safetensors")["ids"]
with torch.no_grad():
    logits = {{"trained": model(ids).logits, "deeper": model(ids, num_loops=3).logits}}
save_file(logits, "logits.safetensors")
model.save_pretrained("resaved")
print(type(model).__module__)
"""


def _save(tiny_config, path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LoopMoEForCausalLM(tiny_config(**overrides)).eval()
    model.save_pretrained(path)
    save_file({"ids": IDS}, str(path / "ids.safetensors"))
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_loops=2, num_prelude_layers=1, num_coda_layers=1),
        dict(num_loops=2, input_injection="concat", norm_scheme="sandwich", shared_expert_intermediate_size=16),
        dict(num_loops=2, expert_type="dcca", dcca_router_input="descended"),  # BigMac's low-dimension experts
    ],
)
def test_plain_transformers_loads_the_folder_with_identical_logits(tiny_config, tmp_path, overrides):
    model = _save(tiny_config, tmp_path / "model", **overrides)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loopmoe.LoopMoEForCausalLM"
    assert not hasattr(model.config, "auto_map")  # written to the file, not kept on the live config

    out = run_without_loopmoe(PLAIN_LOAD.format(path=tmp_path / "model", threads=torch.get_num_threads()), tmp_path)
    assert out.stdout.strip().startswith("transformers_modules.")
    theirs = load_file(str(tmp_path / "logits.safetensors"))
    with torch.no_grad():
        assert torch.equal(theirs["trained"], model(IDS).logits)
        assert torch.equal(theirs["deeper"], model(IDS, num_loops=3).logits)
    # Saved again from the remote-code copy: the same code, the same weights.
    resaved = tmp_path / "resaved"
    for file in (tmp_path / "model").glob("*.py"):
        assert (resaved / file.name).read_text() == file.read_text(), file.name
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == config["auto_map"]


def test_loopmoe_and_exported_copies_share_one_process(tiny_config, tmp_path):
    """Custom ops of each copy get their own namespace: no clash with loopmoe's `loopmoe::` ops."""
    first = _save(tiny_config, tmp_path / "a", num_loops=2)
    second = _save(tiny_config, tmp_path / "b", seed=1, num_loops=3)
    for model, folder in ((first, "a"), (second, "b")):
        # With loopmoe imported, transformers picks the registered class: import the folder's copy by name.
        remote_class = get_class_from_dynamic_module("modeling_loopmoe.LoopMoEForCausalLM", str(tmp_path / folder))
        assert remote_class.__module__.startswith("transformers_modules")
        remote = remote_class.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            assert torch.equal(remote(IDS).logits, model(IDS).logits)
        model.train(), remote.train()  # the training path runs the expert ops with autograd
        losses = [m(IDS, labels=IDS).loss for m in (model, remote)]
        assert torch.equal(*losses)
        for loss in losses:
            loss.backward()
        assert torch.equal(
            model.model.core[0].mlp.experts.down_proj.grad, remote.model.core[0].mlp.experts.down_proj.grad
        )


def test_loopmoe_loads_its_export_with_installed_classes_never_the_folder_code(tiny_config, tmp_path):
    _save(tiny_config, tmp_path / "model", num_loops=2)
    marker = tmp_path / "executed"
    modeling = tmp_path / "model" / "modeling_loopmoe.py"
    modeling.write_text(f"open({str(marker)!r}, 'w').close()\n" + modeling.read_text())
    model = load_model(tmp_path / "model")
    assert type(model) is LoopMoEForCausalLM
    assert not marker.exists()


def test_model_code_may_import_only_stdlib_torch_transformers(tmp_path, monkeypatch):
    """A new dependency of the model code fails at save time, naming the file and line."""
    package = tmp_path / "loopmoe_fake"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("import numpy\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from loopmoe_fake.mod import Thing  # type: ignore[import-not-found]

    monkeypatch.setattr(remote_code, "PACKAGE", "loopmoe_fake")
    with pytest.raises(RuntimeError, match=r"mod\.py:1 imports 'numpy'"):
        remote_code.remote_code_files({"AutoModel": Thing})


# A learned exit gate in the copy: the gate criterion scores and generates, and training uses the gate's loss.
GATE_LOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True).eval()
assert not any(m.split(".")[0] == "loopmoe" for m in sys.modules), "loopmoe was imported"
ids = load_file("{path}/ids.safetensors")["ids"]
with torch.no_grad():
    out = model(ids, exit_criterion="gate", exit_threshold=0.6)
    generated = model.generate(ids[:1, :4], do_sample=False, max_new_tokens=5, exit_criterion="gate", exit_threshold=0.6)
model.train()
train = model(ids, labels=ids)
save_file(
    {{"logits": out.logits, "exit_loops": out.exit_loops, "generated": generated, "loss": train.loss.detach(),
      "exit_depth": train.exit_depth}},
    "gate.safetensors",
)
"""


def test_the_copy_of_a_model_with_an_exit_gate_exits_and_trains_as_loopmoe_does(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(tiny_config(num_loops=3, num_coda_layers=1, exit_gate=True)).eval()
    with torch.no_grad():
        model.model.exit_gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "model")
    save_file({"ids": IDS}, str(tmp_path / "model" / "ids.safetensors"))
    run_without_loopmoe(GATE_LOAD.format(path=tmp_path / "model", threads=torch.get_num_threads()), tmp_path)
    theirs = load_file(str(tmp_path / "gate.safetensors"))
    with torch.no_grad():
        out = model(IDS, exit_criterion="gate", exit_threshold=0.6)
        generated = model.generate(
            IDS[:1, :4], do_sample=False, max_new_tokens=5, exit_criterion="gate", exit_threshold=0.6
        )
    assert 1 < out.exit_loops.float().mean() < 3  # the gate splits the tokens
    assert torch.equal(theirs["exit_loops"], out.exit_loops) and torch.equal(theirs["logits"], out.logits)
    assert torch.equal(theirs["generated"], generated)
    model.train()
    train = model(IDS, labels=IDS)
    assert torch.equal(theirs["loss"], train.loss.detach()) and torch.equal(theirs["exit_depth"], train.exit_depth)
