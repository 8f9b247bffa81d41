"""A default training corpus that ships with Python itself.

The main job must run on a fresh machine that has only this package installed,
with no network and no downloaded data. CPython carries two bodies of English
technical prose that need nothing else:

* ``pydoc_data.topics.topics``: the language reference topics used by ``help()``
  (about 80 documents, ~0.5 MB);
* the docstrings of the pure-Python standard library (~1.5 MB), read with
  ``ast`` from the source files, so no module is imported (importing e.g.
  ``antigravity`` or ``tkinter`` has side effects).

Order is deterministic (sorted topic names, then sorted relative file paths), so
two machines with the same Python version produce the same corpus.
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from pathlib import Path

# Folders of the stdlib whose docstrings are test scaffolding, demos or vendored code.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter"}
)


def embedded_identity() -> str:
    """A string that changes whenever the embedded corpus may change (the Python build)."""
    return f"embedded-v1|python={sys.version}|stdlib={_stdlib_root()}"


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """All embedded documents: pydoc topics first, then one document per stdlib module.

    Cached because parsing the standard library takes a few seconds.
    """
    return tuple(_pydoc_topics()) + tuple(_stdlib_docstrings())


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds drop pydoc_data
        return []
    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def _stdlib_docstrings() -> list[str]:
    """One document per stdlib module: its module, class and function docstrings."""
    root = _stdlib_root()
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        text = _module_text(relative, tree)
        if text:
            documents.append(text)
    return documents


def _module_text(relative: Path, tree: ast.Module) -> str:
    module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(f"{module}\n\n{module_doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                parts.append(f"{module}.{node.name}\n\n{doc}")
    return "\n\n".join(parts)
