"""Evaluation of LoopMoE and any transformers causal LM: held-out perplexity / bits-per-byte,
zero-shot tasks through lm-evaluation-harness on local data, and looped-depth analysis.

    model = load_model(dir); tok = load_hf_tokenizer(dir)
    evaluate_perplexity(model, tok, "wiki.test.raw")                      # -> PerplexityResult
    rows = summarize(evaluate_tasks(wrap_model(model, tok), ["piqa"], data_dir, limit=100))
    analysis = analyse_depth(model, token_sequences(ids, 256), [1, 2, 4, 8])
    points = exit_sweep(model, batches, parse_sweep(["latent:0.1", "0.03"]), 256)  # adaptive depth: loss vs compute
    with early_exit(model, ExitPolicy("latent", 0.03)): ...                       # every forward under a policy
"""

from loopmoe.evaluation.custom_task import load_task_file
from loopmoe.evaluation.depth import analyse_depth, token_sequences
from loopmoe.evaluation.early_exit import ExitPoint, early_exit, exit_sweep, parse_sweep
from loopmoe.evaluation.harness import SHIPPED_TASKS, evaluate_tasks, resolve_tasks, summarize, wrap_model
from loopmoe.evaluation.loading import load_hf_tokenizer, load_model, test_time_depth
from loopmoe.evaluation.perplexity import PerplexityResult, evaluate_perplexity, read_heldout_tokens
from loopmoe.evaluation.plots import plot_depth
from loopmoe.evaluation.tasks.loaders import MissingDataError

__all__ = [
    "SHIPPED_TASKS",
    "ExitPoint",
    "MissingDataError",
    "PerplexityResult",
    "analyse_depth",
    "early_exit",
    "evaluate_perplexity",
    "evaluate_tasks",
    "exit_sweep",
    "load_hf_tokenizer",
    "load_model",
    "load_task_file",
    "parse_sweep",
    "plot_depth",
    "read_heldout_tokens",
    "resolve_tasks",
    "summarize",
    "test_time_depth",
    "token_sequences",
    "wrap_model",
]
