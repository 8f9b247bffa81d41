"""``loopmoe generate``: greedy output equals transformers' generate, streaming prints the same text as
it comes, prompts from --prompt or stdin, test-time depth, bad options name the fix."""

import io
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from loopmoe.cli.main import main
from tests.evaluation.conftest import data_dir, gpt2_tokenizer, loopmoe_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def model_dir(request):
    """tests/evaluation's randomly initialised looped LoopMoE (T=2), saved with the shared GPT-2 tokenizer."""
    return request.getfixturevalue("loopmoe_dir")


@pytest.fixture(scope="module")
def loaded(model_dir):
    from loopmoe.evaluation.loading import load_hf_tokenizer, load_model

    return load_model(model_dir), load_hf_tokenizer(model_dir)


def _greedy_by_hand(model, ids: torch.Tensor, steps: int, num_loops: int) -> torch.Tensor:
    """Full-sequence forwards, argmax of the last position: no cache, no generate()."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, num_loops=num_loops, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_output_equals_transformers_generate(model_dir, loaded, capsys):
    model, tokenizer = loaded
    prompt = "The looped core"
    assert main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, do_sample=False, max_new_tokens=12, attention_mask=torch.ones_like(ids))
    assert torch.equal(expected, _greedy_by_hand(model, ids, 12, num_loops=2))
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"


def test_num_loops_runs_the_core_at_test_time_depth(model_dir, loaded, capsys):
    model, tokenizer = loaded
    prompt = "Depth at inference"
    assert main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "8", "--num-loops", "4"]) == 0
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    deeper = _greedy_by_hand(model, ids, 8, num_loops=4)
    assert capsys.readouterr().out == tokenizer.decode(deeper[0], skip_special_tokens=True) + "\n"
    assert model.config.num_loops == 2  # restored after the command


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory, request):
    """A tiny looped LoopMoE (T=3) with a learned exit gate whose halting probabilities vary per token."""
    from loopmoe import LoopMoEConfig, LoopMoEForCausalLM
    from tests.conftest import TINY

    tokenizer = request.getfixturevalue("gpt2_tokenizer")
    torch.manual_seed(0)
    model = LoopMoEForCausalLM(
        LoopMoEConfig(**{**TINY, "vocab_size": len(tokenizer), "num_loops": 3, "exit_gate": True})
    )
    with torch.no_grad():
        model.model.exit_gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("gated")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_exit_gate_generates_what_model_generate_gives_under_the_gate_criterion(gated_dir, capsys):
    from loopmoe.evaluation.loading import load_hf_tokenizer, load_model

    prompt = "A learned exit"
    assert main(["generate", str(gated_dir), "--prompt", prompt, "--max-new-tokens", "6", "--exit", "gate:0.5"]) == 0
    model, tokenizer = load_model(gated_dir), load_hf_tokenizer(gated_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    kwargs = dict(do_sample=False, max_new_tokens=6, attention_mask=torch.ones_like(ids))
    expected = model.generate(ids, exit_criterion="gate", exit_threshold=0.5, **kwargs)
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"
    with torch.no_grad():
        assert 1 < model(expected, exit_criterion="gate", exit_threshold=0.5).exit_loops.float().mean() < 3


class _Writes(io.StringIO):
    """stdout that counts its write calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def write(self, s):
        self.calls += bool(s)
        return super().write(s)


def test_stream_prints_the_same_text_as_it_is_generated(model_dir, monkeypatch, capsys):
    argv = ["generate", str(model_dir), "--prompt", "Streaming", "--max-new-tokens", "24"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main([*argv, "--stream"]) == 0
    assert out.getvalue() == plain
    assert out.calls > 2  # pieces as they come, not one print at the end


def test_prompts_from_stdin_one_per_line_or_whole(model_dir, loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    base = ["generate", str(model_dir), "--max-new-tokens", "4"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("First prompt\n\n  \nSecond prompt\n"))
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" prompt")[0] for line in lines if " prompt" in line] == ["First", "Second"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two"))
    assert main([*base, "--prompt", "-"]) == 0
    ids = tokenizer("line one\nline two", return_tensors="pt").input_ids
    expected = _greedy_by_hand(model, ids, 4, num_loops=2)
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"


def test_sampling_is_seeded(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt", "Sample", "--max-new-tokens", "8", "--temperature", "1.5"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--top-p", "0.95", "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
        (["--num-loops", "0"], "num_loops must be a positive integer"),
        (["--temperature", "inf"], "--temperature inf: must be >= 0 and finite"),
        (["--temperature", "nan"], "--temperature nan: must be >= 0 and finite"),
        (["--seed", "100000000000000000000000"], "--seed 100000000000000000000000: must be a whole number"),
        (["--device", "cuda"], "no CUDA GPU is visible" if not torch.cuda.is_available() else "CUDA device"),
        (["--device", "gpu0"], "is not a torch device"),
        (["--max-new-tokens", "5000"], "leaves no room for the prompt"),
        (["--exit", "gate:0.5"], "needs a model trained with one (model.exit_gate=true)"),
    ],
)
def test_bad_options_are_one_line_errors(model_dir, flags, message, capsys):
    assert main(["generate", str(model_dir), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_seed_given_as_a_float_is_an_argument_error(model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["generate", str(model_dir), "--prompt", "x", "--seed", "1e23"])
    assert "invalid int value: '1e23'" in capsys.readouterr().err


def test_binary_stdin_is_one_line(model_dir, monkeypatch, capsys):
    binary = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00binary\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", binary)
    assert main(["generate", str(model_dir), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "stdin is not UTF-8 text" in err and "Traceback" not in err


def test_a_file_that_is_no_tokenizer_is_one_line(model_dir, tmp_path, capsys):
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text('{"not": "a tokenizer"}')
    assert main(["generate", str(model_dir), "--prompt", "x", "--tokenizer", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "is not a tokenizer.json" in err and "Traceback" not in err


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(model_dir, loaded, capsys):
    model, tokenizer = loaded
    context = model.config.max_position_embeddings
    prompt = "word " * (2 * context)
    argv = ["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the model's context is {context}" in err and "--truncate" in err
    assert main([*argv, "--truncate"]) == 0
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -(context - 3) :]
    expected = _greedy_by_hand(model, ids, 3, num_loops=2)
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"


def test_depth_beyond_max_loops_warns(model_dir, loaded, capsys):
    model, _ = loaded
    deeper = str(model.config.max_loops + 1)
    with pytest.warns(UserWarning, match="exceeds the checkpoint's max_loops"):
        assert main(["generate", str(model_dir), "--prompt", "x", "--max-new-tokens", "1", "--num-loops", deeper]) == 0


def test_looping_a_vanilla_checkpoint_warns():
    from loopmoe import LoopMoEConfig, LoopMoEForCausalLM
    from loopmoe.evaluation.loading import test_time_depth

    config = LoopMoEConfig(
        vocab_size=64, hidden_size=32, num_core_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    )  # fmt: skip
    model = LoopMoEForCausalLM(config)
    with pytest.warns(UserWarning, match="trained with num_loops=1"), test_time_depth(model, 2):
        assert model.config.num_loops == 2
    assert model.config.num_loops == 1


# --- Reliability round 2: inputs and checkpoints that must be refused in one line -------------------


def _one_line_error(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


def test_bytes_that_are_not_utf8_are_one_line_whatever_the_locale(model_dir, monkeypatch, capsys):
    """Under a C/POSIX locale Python decodes stdin and argv with surrogateescape: no UnicodeDecodeError,
    the bytes arrive as lone surrogates, which the tokenizer rejects with a TypeError traceback (G02, G03)."""
    for data, argv in (
        (b"\xff\xfe\x00binary\n", []),
        (bytes(range(256)) * 4, []),
        (b"ab\x00c\xff\xfe\n", ["--prompt", "-"]),
    ):
        stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
        monkeypatch.setattr(sys, "stdin", stdin)
        _one_line_error(["generate", str(model_dir), "--max-new-tokens", "2", *argv], capsys, "stdin is not UTF-8")
    _one_line_error(
        ["generate", str(model_dir), "--prompt", b"\xed\xa0".decode("utf-8", "surrogateescape")],
        capsys,
        "--prompt is not UTF-8 text",
    )


@pytest.mark.parametrize("device", ["meta", "xpu", "mps"])
def test_devices_this_machine_cannot_generate_on_are_one_line(model_dir, device, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    _one_line_error(["generate", str(model_dir), "--prompt", "x", "--device", device], capsys, f"--device {device}")


@pytest.fixture
def damaged(model_dir, tmp_path):
    """A copy of the model folder to damage."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def test_a_pickled_weights_payload_is_refused_in_one_line_and_never_runs(damaged, tmp_path, capsys):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for weights in damaged.glob("*.safetensors"):
        weights.unlink()
    (damaged / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    err = _one_line_error(["generate", str(damaged), "--prompt", "x"], capsys, "refused: pickled weights")
    assert "weights_only` set to `False`" not in err  # the unsafe way out is never suggested
    assert not marker.exists()


def test_weights_that_do_not_match_the_config_are_refused_not_randomly_initialised(damaged, capsys):
    """transformers only warns about a missing tensor and initialises it at random (G: a silent wrong model)."""
    from safetensors.torch import load_file, save_file

    (weights,) = damaged.glob("*.safetensors")
    state = load_file(weights)
    norm = next(k for k in state if k.endswith("input_layernorm.weight"))
    del state[norm]
    save_file(state, weights, metadata={"format": "pt"})
    _one_line_error(["generate", str(damaged), "--prompt", "x"], capsys, f"missing {norm}")
    q = next(k for k in state if k.endswith("q_proj.weight"))
    state[q] = torch.zeros(2 * state[q].shape[0], state[q].shape[1])
    save_file(state, weights, metadata={"format": "pt"})
    _one_line_error(["generate", str(damaged), "--prompt", "x"], capsys, f"wrong shapes: {q}")


@pytest.mark.parametrize(
    "config, message",
    [
        ("{bad", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
        ("{}", "names no model_type"),
        ('{"model_type": "loopmoe", "hidden_size": "x"}', "cannot be loaded as a causal LM"),
    ],
)
def test_a_broken_config_json_is_one_line(damaged, config, message, capsys):
    (damaged / "config.json").write_text(config)
    _one_line_error(["generate", str(damaged), "--prompt", "x"], capsys, message)


def test_batch_slots_print_what_prompt_by_prompt_generation_prints(gated_dir, capsys):
    """``--batch-slots``: continuous depth batching (loopmoe.model.depth_batching), 3 prompts through 2 slots,
    each token at its own depth under the gate criterion; the texts of the one-by-one run, in prompt order."""
    prompts = ["A learned exit", "Depth batching runs the core", "One"]
    argv = ["generate", str(gated_dir), "--max-new-tokens", "6", "--exit", "gate:0.5"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    one_by_one = capsys.readouterr().out
    assert main([*argv, "--batch-slots", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == one_by_one and len(captured.out.splitlines()) == 3
    assert "core-layer token-iterations" in captured.err and "of the core skipped" in captured.err
    assert main([*argv, "--batch-slots", "2", "--stream"]) == 2
    assert "drop it with --batch-slots" in capsys.readouterr().err
    assert main([*argv, "--batch-slots", "0"]) == 2
    assert "--batch-slots 0: must be >= 1" in capsys.readouterr().err


# --- --compile: the whole model compiled, decoding with a static KV cache ----------------------------


@pytest.mark.slow  # inductor compiles the prefill and the decoding graph: tens of seconds on a small CPU
def test_compile_prints_the_eager_greedy_text_with_two_graphs(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt", "Compiled decoding", "--max-new-tokens", "4"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    torch._dynamo.reset()
    counters.clear()
    try:
        assert main([*argv, "--compile"]) == 0
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    captured = capsys.readouterr()
    assert captured.out == eager
    assert "compiling the model" in captured.err
    assert graphs == 2  # prefill and decoding: the static cache's growth recompiles nothing


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--exit", "latent:0.03"], "static KV cache of --compile cannot hold: drop --compile or --exit"),
        (["--batch-slots", "2"], "static KV cache of --compile cannot hold: drop --compile or --batch-slots"),
        (["--num-loops", "3"], "use --num-loops 2 or less, or drop --compile for test-time depth"),
    ],
)
def test_compile_refuses_what_its_static_cache_cannot_hold_before_loading(
    model_dir, flags, message, monkeypatch, capsys
):
    monkeypatch.setattr("loopmoe.evaluation.loading.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    err = _one_line_error(["generate", str(model_dir), "--prompt", "x", "--compile", *flags], capsys, message)
    assert len(err.strip().splitlines()) == 1
