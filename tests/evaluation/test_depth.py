"""Depth analysis: loss vs loops, logit lens at loop boundaries, routing divergence, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loopmoe.evaluation.depth import set_change


def test_set_change_counts_and_jaccard():
    current = torch.tensor([[0, 1], [2, 3], [4, 5]])
    previous = torch.tensor([[1, 0], [2, 7], [6, 7]])
    differs, jaccard = set_change(current, previous)
    assert differs.tolist() == [False, True, True]
    assert jaccard.tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_depth_analysis_cli(run_eval, loopmoe_dir, data_dir, tmp_path):
    out_dir = tmp_path / "depth"
    assert (
        run_eval(
            [
                str(loopmoe_dir),
                "--depth-analysis",
                "--loops",
                "1,2,3",
                "--text",
                "tinyshakespeare/input.txt",
                "--data-dir",
                str(data_dir),
                "--seq-len",
                "32",
                "--sequences",
                "4",
                "--output-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    for name in ("loss_vs_loops.png", "logit_lens.png", "routing_divergence.png"):
        assert (out_dir / name).stat().st_size > 1000
    analysis = json.loads((out_dir / "depth.json").read_text())
    assert analysis["tokens"] == 4 * 31
    assert analysis["trained_loops"] == 2 and analysis["warnings"] == []
    assert analysis["training_overlap"]["fraction"] is None  # a folder without run_config.json: not known
    for t in (1, 2, 3):
        entry = analysis["by_loops"][str(t)]
        assert math.isfinite(entry["loss"]) and len(entry["lens_loss"]) == t
        # no coda layers: the readout after the last iteration is the model's own output
        assert entry["lens_loss"][-1] == pytest.approx(entry["loss"], rel=1e-5)
        assert set(entry["routing"]) == {"core.0", "core.1"}
        for curves in entry["routing"].values():
            assert len(curves["changed"]) == len(curves["jaccard"]) == t - 1
            assert all(0.0 <= x <= 1.0 for x in curves["changed"] + curves["jaccard"])


def test_depth_analysis_rejects_non_looped_models(run_eval, gpt2_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100)
    with pytest.raises(ValueError, match="needs a LoopMoE checkpoint"):
        run_eval([str(gpt2_dir), "--depth-analysis", "--text", str(text), "--output-dir", str(tmp_path / "d")])


def test_iteration_cosine_per_core_layer_matches_a_hand_computation():
    import torch.nn.functional as F

    from loopmoe.evaluation.depth import iteration_cosine
    from loopmoe.model import LoopMoEForCausalLM
    from loopmoe.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("debug")
    cfg = cfg.__class__(
        **{**cfg.to_dict(), "num_prelude_layers": 1, "num_core_layers": 2, "num_coda_layers": 0, "num_loops": 3}
    )
    model = LoopMoEForCausalLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    cosine = iteration_cosine(model, [x])
    assert list(cosine) == ["core.0", "core.1"] and all(len(v) == 2 for v in cosine.values())
    states = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    # core layer 1 (0-based) output at iterations 1 and 2: executed layers 1 + 1*2 + 1 = 4 and 6, so states 5 and 7
    expected = F.cosine_similarity(states[5], states[7], dim=-1).mean().item()
    assert cosine["core.1"][1] == pytest.approx(expected, rel=1e-5)
    vanilla = LoopMoEForCausalLM(get_preset("debug").__class__(**{**get_preset("debug").to_dict(), "num_loops": 1}))
    assert iteration_cosine(vanilla, [x]) == {}
