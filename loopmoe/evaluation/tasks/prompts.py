"""Prompt functions copied from lm-eval 0.4's own task definitions (``!function`` targets).

Kept byte-for-byte equivalent to ``lm_eval/tasks/{hellaswag,super_glue/copa,winogrande}`` so
scores are comparable with published lm-eval numbers; the only addition is
``hellaswag_process_docs``, which adapts the local llama.cpp HellaSwag file (see its docstring).
"""

from __future__ import annotations

import re


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: drop WikiHow bracket artifacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_context(ctx: str) -> str:
    """Rebuild lm-eval's ``ctx_a + " " + ctx_b.capitalize()`` from the joined ``ctx`` of the llama.cpp file.

    That file stores ``activity_label: ctx_a ctx_b`` without lm-eval's capitalisation of ctx_b.
    ctx_b is the trailing sentence fragment; in the ActivityNet items it starts lower-case after
    the last ". " (ctx_a is made of whole sentences), so a lower-case tail is capitalised the way
    ``str.capitalize`` does. Items whose ctx_b starts upper-case are left as they are (lm-eval would
    also lower-case the rest of such a fragment; the split point is not recoverable there).
    """
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        return head + sep + tail.capitalize()
    return ctx


def hellaswag_process_docs(dataset):
    """lm-eval's hellaswag ``process_docs`` on the local ``{ctx, endings, label}`` rows."""

    def _process_doc(doc):
        return {
            "query": hellaswag_preprocess(hellaswag_context(doc["ctx"])),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def copa_convert_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc) -> str:
    """Premise without its final period, then the connector lm-eval uses."""
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc) -> str:
    correct_choice = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
    return " " + copa_convert_choice(correct_choice)


def copa_doc_to_choice(doc) -> list[str]:
    return [" " + copa_convert_choice(doc["choice1"]), " " + copa_convert_choice(doc["choice2"])]


def winogrande_doc_to_text(doc) -> int:
    """Partial scoring: the 'text' is the gold index; the contexts vary, the continuation is shared."""
    return int(doc["gold"])


def winogrande_doc_to_target(doc) -> str:
    """lm-eval scores ``sentence[idx + 1:].strip()`` after the blank."""
    return doc["continuation"].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    return list(doc["context_options"])
