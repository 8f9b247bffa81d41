"""The trainer's final export is a complete transformers checkpoint: special tokens, context length, code."""

from __future__ import annotations

import json

import torch

from loopmoe import LoopMoEForCausalLM
from loopmoe.data import load_tokenizer
from loopmoe.testing.without_loopmoe import run_without_loopmoe


def test_final_export_carries_the_tokenizers_special_tokens_and_context(trained_run):
    final = trained_run / "final"
    eos = load_tokenizer(trained_run / "data" / "tokenizer").eos_id
    config = json.loads((final / "config.json").read_text())
    generation = json.loads((final / "generation_config.json").read_text())
    for saved in (config, generation):
        assert (saved["eos_token_id"], saved["pad_token_id"], saved["bos_token_id"]) == (eos, eos, eos)
    tokenizer = json.loads((final / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 32  # data.seq_len of the run
    assert tokenizer["pad_token"] == tokenizer["eos_token"]
    assert "auto_map" in config and (final / "modeling_loopmoe.py").is_file()


# Without loopmoe: batched text-generation pipeline == one prompt at a time (left padding handled), and
# generate() of the EOS-only model stops after one token instead of running to max_new_tokens.
PLAIN_GENERATE = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
torch.set_num_threads(1)
prompts = ["First Citizen:", "Before we proceed any further, hear me speak.", "All:"]
pipe = pipeline("text-generation", model="{final}", trust_remote_code=True)
settings = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
batched = [out[0]["generated_text"] for out in pipe(prompts, batch_size=3, **settings)]
single = [pipe(p, **settings)[0]["generated_text"] for p in prompts]
assert batched == single, (batched, single)
assert all(batched), batched

tokenizer = AutoTokenizer.from_pretrained("{eos_only}")
model = AutoModelForCausalLM.from_pretrained("{eos_only}", trust_remote_code=True)
inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
assert out.shape[1] == inputs["input_ids"].shape[1] + 1, out.shape
assert (out[:, -1] == tokenizer.eos_token_id).all(), out
"""


def test_plain_transformers_generates_stops_at_eos_and_pads_batches(trained_run, tmp_path):
    final = trained_run / "final"
    # A model whose every next token is EOS: no attention or expert output, every embedding the same
    # vector v, and an LM head that reads v only in the EOS row.
    model = LoopMoEForCausalLM.from_pretrained(final)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "experts.down_proj")):
                weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0
    model.save_pretrained(tmp_path / "eos_only")
    load_tokenizer(final).to_transformers().save_pretrained(tmp_path / "eos_only")
    run_without_loopmoe(PLAIN_GENERATE.format(final=final, eos_only=tmp_path / "eos_only"), tmp_path)


def test_the_exported_tokenizer_chats_and_so_does_its_qwen3_moe_export(trained_run, tmp_path):
    from transformers import AutoTokenizer

    from loopmoe.convert import export_qwen3_moe
    from loopmoe.data.tokenizer import BASE_CHAT_TEMPLATE

    messages = [{"role": "user", "content": "Who are you?"}]
    export_qwen3_moe(trained_run / "final", tmp_path / "qwen")
    for folder in (trained_run / "final", tmp_path / "qwen"):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        assert tokenizer.chat_template == BASE_CHAT_TEMPLATE
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == "User: Who are you?\nAssistant:"


# Without loopmoe: the remote code carries adaptive depth. Every token exiting after one iteration of a
# test-time depth of 3 generates exactly what the trained depth (1) generates; an unknown criterion is refused.
REMOTE_EXIT = """
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained("{final}", trust_remote_code=True).eval()
ids = torch.tensor([[5, 17, 42, 9]])
plain = model.generate(ids, max_new_tokens=6, do_sample=False)
early = model.generate(ids, max_new_tokens=6, do_sample=False, exit_criterion="latent", exit_threshold=1e9, max_loops=3)
assert torch.equal(plain, early), (plain, early)
try:
    model(ids, exit_criterion="energy", exit_threshold=0.1)
except ValueError as error:
    assert "unknown exit criterion" in str(error), error
else:
    raise AssertionError("an unknown criterion was accepted")
"""


def test_remote_code_checkpoints_carry_adaptive_depth(trained_run, tmp_path):
    run_without_loopmoe(REMOTE_EXIT.format(final=trained_run / "final"), tmp_path)
