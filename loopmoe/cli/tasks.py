"""``loopmoe tasks``: the shipped lm-eval tasks, and (``--path``) the folder to hand to ``lm_eval --include_path``."""

from __future__ import annotations

from dataclasses import dataclass

from loopmoe.options import add_options, option, options_from


@dataclass
class TasksOptions:
    """The options of ``loopmoe tasks``."""

    path: bool = option(False, help="print only the task folder, for `lm_eval --include_path $(loopmoe tasks --path)`")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tasks",
        help="list the shipped evaluation tasks (or print their folder for lm_eval --include_path)",
        description="The shipped tasks are lm-eval YAMLs reading local copies of the benchmarks. lm_eval uses them "
        "directly: lm_eval --model hf --model_args pretrained=MODEL,trust_remote_code=True --include_path "
        "$(loopmoe tasks --path) --metadata data_dir=DATA_DIR --tasks loopmoe_arc_easy (in lm-eval the shipped "
        "tasks are named loopmoe_<task>, so they shadow none of lm-eval's own)",
    )
    add_options(p, TasksOptions)
    p.set_defaults(run=run)


def run(args) -> int:
    from loopmoe.evaluation.harness import (  # lazy: the evaluation package loads lm-eval, seconds at every CLI start
        SHIPPED_TASKS,
        TASKS_DIR,
        lm_eval_name,
        required_files,
    )

    opts: TasksOptions = options_from(TasksOptions, args)
    if opts.path:
        print(TASKS_DIR)
        return 0
    for task in SHIPPED_TASKS:
        print(f"{task}\t{lm_eval_name(task)}\t{', '.join(required_files(task))}")
    return 0
