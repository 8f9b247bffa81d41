"""A LoopMoE with T = 1 is Qwen3-MoE: converted checkpoints reproduce transformers' logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loopmoe import LoopMoEForCausalLM
from loopmoe.cli.main import main
from loopmoe.convert import convert_qwen3_moe
from loopmoe.testing.hf_parity import qwen_model

QWEN = dict(
    vocab_size=151,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    pad_token_id=0,
    max_position_embeddings=256,
)


def qwen_checkpoint(tmp_path, **overrides):
    model = qwen_model(config={**QWEN, **overrides}, seed=0).eval()
    model.save_pretrained(tmp_path / "qwen")
    return model, tmp_path / "qwen"


@pytest.mark.parametrize(
    "overrides",
    [
        {"norm_topk_prob": True},
        {"norm_topk_prob": False, "tie_word_embeddings": True},
        {"rope_theta": 500000.0, "norm_topk_prob": True},
    ],
)
def test_converted_logits_match_transformers(tmp_path, overrides):
    qwen, src = qwen_checkpoint(tmp_path, **overrides)
    convert_qwen3_moe(src, tmp_path / "loopmoe")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "loopmoe").eval()
    assert isinstance(ours, LoopMoEForCausalLM) and ours.config.num_loops == 1
    x = torch.randint(1, 151, (3, 33))
    mask = torch.ones_like(x)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            theirs, mine = qwen(input_ids=x, **kwargs).logits, ours(input_ids=x, **kwargs).logits
            keep = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
            assert (theirs - mine)[keep].abs().max().item() < 1e-4
        gen_theirs = qwen.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        gen_mine = ours.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_theirs, gen_mine)


def test_cli_convert_and_unsupported_features(tmp_path, capsys):
    _, src = qwen_checkpoint(tmp_path)
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "loopmoe"
    generation = (src / "generation_config.json").read_text()  # sampling defaults and special tokens are kept
    assert (tmp_path / "out" / "generation_config.json").read_text() == generation

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [1]}))
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "bad")]) == 2
    assert "mlp_only_layers" in capsys.readouterr().err
    assert main(["convert", "--from", "qwen3-moe", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


def test_conversion_reads_no_pickles(tmp_path):
    """Only safetensors, or torch.load with weights_only: a malicious .bin cannot run code."""
    import pickle

    _, src = qwen_checkpoint(tmp_path)
    (src / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code from a checkpoint ran')",))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(Exception) as err:
        convert_qwen3_moe(src, tmp_path / "out")
    assert not isinstance(err.value, SystemExit)
    assert "refused: pickled weights" in str(err.value)  # one line naming the refusal, not an UnpicklingError
    assert "weights_only` set to `False`" not in str(err.value)  # never the unsafe way out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "truncated or corrupt"),
        (lambda raw: (2**40).to_bytes(8, "little") + raw[8:], "its header needs"),
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "header is unreadable"),
    ],
)
def test_damaged_weights_are_one_line(tmp_path, capsys, damage, message):
    _, src = qwen_checkpoint(tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    capsys.readouterr()  # the fixture's own save prints progress
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- LoopMoE -> Qwen3-MoE -------------------------------------------------------------------------


def _loopmoe_checkpoint(tiny_config, path, **overrides):
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(tiny_config(**overrides)).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    "overrides, layers",
    [
        (dict(num_loops=1), 2),  # a Vanilla MoE: the same layers
        (dict(num_loops=3, iter_conditioning="none", num_prelude_layers=1, num_coda_layers=1), 8),  # 1 + 2*3 + 1
        (dict(num_loops=2, iter_conditioning="none", tie_word_embeddings=True, norm_topk_prob=False), 4),
    ],
)
def test_export_matches_transformers_qwen3_moe(tiny_config, tmp_path, overrides, layers):
    from transformers import Qwen3MoeForCausalLM

    ours = _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", **overrides)
    assert main(["export", "--to", "qwen3-moe", str(tmp_path / "loopmoe"), str(tmp_path / "qwen")]) == 0
    qwen = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    assert qwen.config.num_hidden_layers == layers
    x = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    keep = mask.bool()
    with torch.no_grad():
        diff = (qwen(x, attention_mask=mask).logits - ours(x, attention_mask=mask).logits)[keep].abs().max().item()
        assert diff < 1e-5
        greedy = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(qwen.generate(x, **greedy), ours.generate(x, **greedy))
    # And back: the unrolled model imports as a T = 1 LoopMoE computing the same logits.
    convert_qwen3_moe(tmp_path / "qwen", tmp_path / "back")
    back = LoopMoEForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.num_core_layers == layers and back.config.num_loops == 1
    with torch.no_grad():
        assert (back(x).logits - ours(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(num_loops=2), "iteration conditioning"),  # IterAdaLN by default when T > 1
        (dict(num_loops=2, iter_conditioning="iter_embedding"), "iteration conditioning"),
        (dict(num_loops=2, iter_conditioning="none", input_injection="add"), "re-injection"),
        (dict(norm_scheme="sandwich"), "sandwich norms"),
        (dict(router_score="sigmoid"), "sigmoid routing"),
        (dict(shared_expert_intermediate_size=16), "shared experts"),
        (dict(qk_norm=False), "QK-norm"),
        (dict(expert_type="dcca"), "DCCA experts (expert_type='dcca', width 8"),
        (dict(num_loops=2, iter_conditioning="none", exit_gate=True), "a learned exit gate (exit_gate=True)"),
    ],
)
def test_export_refuses_what_qwen3_moe_cannot_express(tiny_config, tmp_path, capsys, overrides, reason):
    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", **overrides)
    assert main(["export", "--to", "qwen3-moe", str(tmp_path / "loopmoe"), str(tmp_path / "qwen")]) == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "qwen").exists()


def test_export_refuses_a_learned_router_bias(tiny_config, tmp_path):
    from loopmoe.convert import export_qwen3_moe

    model = LoopMoEForCausalLM(tiny_config())
    model.model.core[1].mlp.gate.expert_bias[2] = 0.5
    model.save_pretrained(tmp_path / "loopmoe")
    with pytest.raises(ValueError, match=r"router selection bias .*model\.core\.1\.mlp\.gate\.expert_bias"):
        export_qwen3_moe(tmp_path / "loopmoe", tmp_path / "qwen")


# --- Outputs that would destroy what they read, or what is the user's ------------------------------


def _export(src, dst, *flags):
    return main(["export", "--to", "qwen3-moe", str(src), str(dst), *flags])


def test_export_into_its_own_run_folder_is_refused_and_the_run_survives(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    _loopmoe_checkpoint(tiny_config, run / "final", num_loops=1)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for dst in (run, run / "final", run / "final" / "qwen"):
        assert _export(run / "final", dst) == 2
        err = capsys.readouterr().err
        assert "choose another OUT" in err and "Traceback" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_convert_onto_its_source_is_refused(tmp_path, capsys):
    _, src = qwen_checkpoint(tmp_path)
    before = sorted(p.name for p in src.iterdir())
    assert main(["convert", "--from", "qwen3-moe", str(src), str(src)]) == 2
    assert "choose another DST" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_export_keeps_a_users_folder_and_file(tiny_config, tmp_path, capsys):
    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", num_loops=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _export(tmp_path / "loopmoe", mine) == 2
    assert "--overwrite" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    with pytest.warns(UserWarning, match="moved the previous contents"):
        assert _export(tmp_path / "loopmoe", mine, "--overwrite") == 0
    (previous,) = tmp_path.glob("mine.previous-*")
    assert (previous / "notes.txt").read_text() == "keep me" and (mine / "config.json").is_file()
    assert _export(tmp_path / "loopmoe", mine) == 0  # now loopmoe's own export: replaced without a flag
    (tmp_path / "file").write_text("mine too")
    assert _export(tmp_path / "loopmoe", tmp_path / "file") == 2
    assert (tmp_path / "file").read_text() == "mine too"
    assert not list(tmp_path.glob(".file*"))


def test_export_refuses_weights_that_do_not_match_the_config(tiny_config, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", num_loops=1)
    weights = tmp_path / "loopmoe" / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = torch.ones(3)
    del state["model.embed_tokens.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    assert _export(tmp_path / "loopmoe", tmp_path / "qwen") == 2
    err = capsys.readouterr().err
    assert "missing model.embed_tokens.weight" in err and "model.norm.weight (3,)" in err
    assert not (tmp_path / "qwen").exists()


def test_export_refuses_a_tokenizer_link_that_leads_outside(tiny_config, tmp_path, capsys):
    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", num_loops=1)
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "do not share"}')
    (tmp_path / "loopmoe" / "tokenizer.json").symlink_to(secret)
    assert _export(tmp_path / "loopmoe", tmp_path / "qwen") == 2
    assert "outside" in capsys.readouterr().err and not (tmp_path / "qwen").exists()


def test_a_huge_config_is_refused_before_a_model_is_built(tmp_path, capsys):
    _, src = qwen_checkpoint(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6, "hidden_size": 8192}))
    capsys.readouterr()
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "out")]) == 2
    assert "does not belong to these weights" in capsys.readouterr().err


# --- Reliability round 2: broken weights, absurd sizes, unwritable outputs ----------------------------


def _set_tensor(weights, pick, value):
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    key = next(k for k in state if pick(k))
    state[key] = value(state[key])
    save_file(state, weights, metadata={"format": "pt"})
    return key


def test_export_and_convert_refuse_weights_that_are_not_finite(tiny_config, tmp_path, capsys):
    """As training refuses to export a diverged model (E25): NaN weights are not a model to share."""
    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", num_loops=1)
    key = _set_tensor(
        tmp_path / "loopmoe" / "model.safetensors",
        lambda k: k.endswith("q_proj.weight"),
        lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
    )
    assert _export(tmp_path / "loopmoe", tmp_path / "qwen") == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and key in err and not (tmp_path / "qwen").exists()

    _, src = qwen_checkpoint(tmp_path)
    _set_tensor(src / "model.safetensors", lambda k: k.endswith("norm.weight"), lambda t: t.fill_(float("inf")))
    capsys.readouterr()
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "back")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err and not (tmp_path / "back").exists()


def test_an_unrolled_export_larger_than_the_disk_is_refused_before_it_is_built(tiny_config, tmp_path, capsys):
    """num_loops = 10^8 (no iteration conditioning) used to build a list of 10^8 layers: MemoryError (E16)."""
    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", num_loops=2, iter_conditioning="none")
    config = json.loads((tmp_path / "loopmoe" / "config.json").read_text())
    (tmp_path / "loopmoe" / "config.json").write_text(json.dumps({**config, "num_loops": 10**8}))
    assert _export(tmp_path / "loopmoe", tmp_path / "qwen") == 2
    err = capsys.readouterr().err
    assert "the unrolled Qwen3-MoE checkpoint would take" in err and "fewer loops" in err
    assert not (tmp_path / "qwen").exists()


def test_an_output_that_cannot_be_created_is_one_line_naming_no_temporary(tiny_config, tmp_path, capsys):
    """An output under a file (or /proc) used to fail with the staging folder's errno traceback (E26)."""
    _loopmoe_checkpoint(tiny_config, tmp_path / "loopmoe", num_loops=1)
    (tmp_path / "afile").write_text("x")
    _, src = qwen_checkpoint(tmp_path)
    capsys.readouterr()
    for argv in (
        ["export", "--to", "qwen3-moe", str(tmp_path / "loopmoe"), str(tmp_path / "afile" / "out")],
        ["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "afile" / "out")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot write {tmp_path / 'afile' / 'out'}" in err and "loopmoe-staging" not in err, err
        assert "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_torn_or_foreign_bin_is_one_line(tmp_path, capsys):
    _, src = qwen_checkpoint(tmp_path)
    (src / "model.safetensors").unlink()
    torch.save({"w": torch.ones(2)}, src / "pytorch_model.bin")
    raw = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    capsys.readouterr()
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and "Traceback" not in err
    torch.save([torch.ones(2)], src / "pytorch_model.bin")  # plain tensors, but not a state dict
    assert main(["convert", "--from", "qwen3-moe", str(src), str(tmp_path / "out")]) == 2
    assert "no mapping of names to tensors" in capsys.readouterr().err


def test_init_from_a_pickled_payload_is_refused_in_one_line(tiny_config, tmp_path):
    """``model.init_from`` reads weights through ``read_weights``: the same refusal, no code run (H02)."""
    import os
    import pickle

    from loopmoe.errors import CheckpointError
    from loopmoe.training.builders import load_initial_weights

    model = _loopmoe_checkpoint(tiny_config, tmp_path / "init", num_loops=1)
    (tmp_path / "init" / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "init" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(CheckpointError, match="refused: pickled weights") as err:
        load_initial_weights(model, tmp_path / "init")
    assert len(str(err.value).splitlines()) == 1 and not marker.exists()
