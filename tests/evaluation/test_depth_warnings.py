"""Depth analysis flags what makes it misleading (a T = 1 model, text seen in training: n-gram overlap
with the run's training shards), and its plots mark the trained depth and show every curve."""

import json

import numpy as np
import pytest
import torch

from loopmoe.evaluation.depth import analyse_depth, depth_warnings
from loopmoe.evaluation.overlap import NGRAM, ngram_overlap, training_overlap


def test_ngram_overlap_counts_windows_seen_in_training():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50_000, size=10_000)
    copied = train[100:164][None]  # 64 tokens from the training stream: all 52 windows seen
    fresh = rng.integers(0, 50_000, size=(1, 64))
    assert ngram_overlap(copied, train) == 1.0
    assert ngram_overlap(fresh, train) == 0.0
    half = np.concatenate([train[500:532], fresh[0, :32]])[None]  # windows that end inside the copied part
    assert ngram_overlap(half, train) == pytest.approx((32 - NGRAM + 1) / (64 - NGRAM + 1))
    assert ngram_overlap(np.stack([train[:64], fresh[0]]), train) == 0.5


def test_overlap_with_the_run_that_trained_the_model(tmp_path):
    from loopmoe.data import open_source, prepare_shards
    from loopmoe.data.tokenizer import train_bpe_tokenizer

    text = tmp_path / "corpus.jsonl"  # 40 documents of random words
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(300)]
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 200))}) + "\n" for _ in range(40)))
    source = open_source(str(text))
    tokenizer = train_bpe_tokenizer(source, 400, tmp_path / "data" / "tokenizer", progress=False)
    shards = prepare_shards(source, tokenizer, tmp_path / "data" / "shards", val_fraction=0.1, progress=False)
    model_dir = tmp_path / "final"
    model_dir.mkdir()
    assert training_overlap(model_dir, shards.tokens("train")[None, :200], 400)["fraction"] is None  # unknown
    (model_dir / "run_config.json").write_text(json.dumps({"data": {"data_dir": str(tmp_path / "data")}}))
    seen = training_overlap(model_dir, np.asarray(shards.tokens("train")[:256]).reshape(2, 128), tokenizer.vocab_size)
    held_out = training_overlap(model_dir, np.asarray(shards.tokens("val")[:256]).reshape(2, 128), tokenizer.vocab_size)
    assert seen["fraction"] == 1.0 and seen["shards"] == str(tmp_path / "data" / "shards")
    assert held_out["fraction"] < 0.05  # random words: a 13-token window rarely recurs
    other_vocab = training_overlap(model_dir, np.zeros((1, 64), dtype=np.int64), tokenizer.vocab_size + 1)
    assert other_vocab["fraction"] is None and "vocabulary" in other_vocab["note"]
    assert any("not a held-out loss" in w for w in depth_warnings(2, seen))
    assert depth_warnings(2, held_out) == []


def test_a_model_trained_with_one_loop_is_flagged(tiny_config):
    from loopmoe import LoopMoEForCausalLM

    torch.manual_seed(0)
    model = LoopMoEForCausalLM(tiny_config(num_loops=1)).eval()
    rows = torch.randint(0, tiny_config().vocab_size, (2, 16))
    with pytest.warns(UserWarning, match="trained with num_loops = 1"):
        result = analyse_depth(model, rows, [1, 2])
    assert result["trained_loops"] == 1 and len(result["warnings"]) == 1
    looped = LoopMoEForCausalLM(tiny_config(num_loops=2)).eval()
    assert analyse_depth(looped, rows, [1, 2])["warnings"] == []


def _analysis(trained: int, loops=(1, 2, 4)) -> dict:
    by = {
        str(t): {"loss": 5.0 - 0.1 * t, "lens_loss": [5.0 - 0.1 * k for k in range(1, t + 1)], "routing": {}}
        for t in loops
    }
    for t in loops:
        by[str(t)]["routing"] = {"core.0": {"changed": [0.5] * (t - 1), "jaccard": [0.7] * (t - 1)}}
    return {"loops": list(loops), "trained_loops": trained, "by_loops": by, "warnings": []}


def test_plots_mark_the_trained_depth_and_separate_the_lens_curves(tmp_path, monkeypatch):
    from loopmoe.evaluation import plots

    figures = {}

    def keep(fig, path, plt):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_depth(_analysis(trained=2), tmp_path)

    def vertical_lines(ax):
        return [
            line.get_xdata()[0]
            for line in ax.get_lines()
            if len(set(line.get_xdata())) == 1 and line.get_linestyle() == ":"
        ]

    [loss_ax] = [ax for ax in figures["loss_vs_loops.png"].axes if ax.get_ylabel().startswith("loss")]
    assert vertical_lines(loss_ax) == [2]
    lens_axes = figures["logit_lens.png"].axes
    assert [ax.get_title() for ax in lens_axes] == ["T=1", "T=2", "T=4"]  # one panel per T: no curve hides another
    for ax, t in zip(lens_axes, (1, 2, 4)):
        assert len(ax.get_lines()[0].get_xdata()) == t
        assert vertical_lines(ax) == ([] if t < 2 else [2])
    assert all(vertical_lines(ax) == [1.5] for ax in figures["routing_divergence.png"].axes)


def test_expert_load_heat_map_shows_the_real_maximum(tmp_path, monkeypatch):
    from loopmoe.compare import figures

    saved = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: saved.append(fig))
    loads = {"reference": {"layer0": [0.7, 0.1, 0.1, 0.1]}, "looped": {"core.0@1": [0.25, 0.25, 0.25, 0.25]}}
    figures.plot_expert_load(loads, tmp_path / "expert_load.png")
    images = [ax.images[0] for ax in saved[0].axes if ax.images]
    assert len(images) == 2
    for image in images:
        assert image.norm.vmax == pytest.approx(2.8) and image.norm.vmin == 0.0  # 0.7 x 4 experts, not clipped at 2
        assert image.get_array().max() <= image.norm.vmax
