"""Remote code: the model's own modules, flattened into a checkpoint folder.

transformers loads a model type it does not know from the folder's ``auto_map`` and the Python
files beside ``config.json`` (``trust_remote_code=True``), importing them as one flat package:
only ``from .name import ...`` between files of the folder's top level. LoopMoE's modules live in
a package tree (``loopmoe/config.py``, ``loopmoe/model/*.py``, ``loopmoe/model/kernels/*.py``), so
``save_pretrained`` writes the *import closure* of the classes it names (every ``loopmoe`` module
they import, transitively) as flat files, each ``from loopmoe.a.b import`` rewritten to
``from .loopmoe_a_b import`` and nothing else changed. The files are made from the installed
sources at every save: there is one copy of the model code, the package's.

The closure may import only the standard library, torch and transformers (checked here, so a
new dependency fails at save time, not on a user's machine). Custom ops register under a
namespace of their own in a copy (``kernels/namespace.py``), so loopmoe and any number of
exported checkpoints load side by side in one process.

A model loaded *as* remote code and saved again walks the same way: its modules are already flat
and their relative imports are kept as they are, so the copy reproduces itself.

This module is part of the closure (``modeling.py`` imports it), like ``loopmoe.atomic``: standard library only.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

from loopmoe.atomic import atomic_write_text

PACKAGE = "loopmoe"
# transformers' file-name conventions for the two modules ``auto_map`` names.
_CONVENTIONAL = {"loopmoe.config": "configuration_loopmoe", "loopmoe.model.modeling": "modeling_loopmoe"}
_ALLOWED_PACKAGES = frozenset(sys.stdlib_module_names) | {"torch", "transformers"}


def flat_name(module: str) -> str:
    """The file stem of ``module`` in a checkpoint folder (``loopmoe.model.layers`` -> ``loopmoe_model_layers``)."""
    if module in _CONVENTIONAL:
        return _CONVENTIONAL[module]
    if module.split(".", 1)[0] == PACKAGE:
        return module.replace(".", "_")
    return module.rpartition(".")[2]  # already a flat copy: transformers_modules.<folder>...<stem>


def auto_map(classes: dict[str, type]) -> dict[str, str]:
    """``config.json``'s ``auto_map``: ``{"AutoModelForCausalLM": "modeling_loopmoe.LoopMoEForCausalLM", ...}``."""
    return {auto: f"{flat_name(cls.__module__)}.{cls.__name__}" for auto, cls in classes.items()}


def remote_code_files(classes: dict[str, type]) -> dict[str, str]:
    """``{file name: source}`` of the flattened import closure of ``classes``' modules."""
    files: dict[str, str] = {}
    pending = list(dict.fromkeys(cls.__module__ for cls in classes.values()))
    seen = set(pending)
    while pending:
        module = pending.pop()
        source, imported = _flatten(module)
        files[flat_name(module) + ".py"] = source
        for dependency in imported:
            if dependency not in seen:
                seen.add(dependency)
                pending.append(dependency)
    return files


def write_remote_code(folder: str | Path, classes: dict[str, type]) -> list[Path]:
    """Write the flattened modules of ``classes`` into ``folder`` (each file replaced atomically)."""
    written = []
    for name, source in sorted(remote_code_files(classes).items()):
        atomic_write_text(Path(folder) / name, source)
        written.append(Path(folder) / name)
    return written


def _flatten(module: str) -> tuple[str, list[str]]:
    """``module``'s source with its package imports made relative, and the modules it imports from the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RuntimeError(f"cannot write remote code: no Python source for module {module!r}")
    source = Path(spec.origin).read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    package = module.rpartition(".")[0]
    imported = []
    for node in ast.walk(ast.parse(source, spec.origin)):
        where = f"{spec.origin}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".", 1)[0]
                if top == PACKAGE or top not in _ALLOWED_PACKAGES:
                    raise RuntimeError(
                        f"cannot write remote code: {where} imports {alias.name!r}; model code may import only "
                        f"the standard library, torch and transformers, and its own modules as `from {PACKAGE}.x import y`"
                    )
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # a flat copy's relative import: keep it
                imported.append(f"{package}.{node.module}")
            elif node.level:
                raise RuntimeError(
                    f"cannot write remote code: {where} uses a relative import other than `from .x import`"
                )
            elif node.module and node.module.split(".", 1)[0] == PACKAGE:
                imported.append(node.module)
                line = node.lineno - 1
                pattern = rf"\bfrom\s+{re.escape(node.module)}\s+import\b"
                lines[line], count = re.subn(pattern, f"from .{flat_name(node.module)} import", lines[line])
                if count != 1:
                    raise RuntimeError(
                        f"cannot write remote code: {where}: put `from {node.module} import` on one line"
                    )
            elif node.module and node.module.split(".", 1)[0] not in _ALLOWED_PACKAGES:
                raise RuntimeError(
                    f"cannot write remote code: {where} imports from {node.module!r}; model code may import only "
                    "the standard library, torch and transformers"
                )
    return "".join(lines), imported
