"""Safe loading: no checkpoint or array file can run code when it is read.

Scans the source of avg/ and tools/ (AST, not grep, so comments and strings do not count):

* every ``torch.load(...)`` passes ``weights_only=True``;
* ``np.load``/``numpy.load`` never passes ``allow_pickle=True``;
* no ``pickle``/``dill``/``joblib`` loads at all;
* ``trust_remote_code`` is never set to a literal True: only a user's explicit flag may turn it on;
* nothing calls ``accelerator.register_for_checkpointing``: accelerate reloads such custom objects
  with ``weights_only=False`` (the retriever trainers keep the LR schedule in JSON instead).

The checker is itself tested on small snippets, so a scan that silently matches nothing fails.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("avg", "tools")
PICKLE_MODULES = {"pickle", "dill", "joblib", "cloudpickle", "_pickle"}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for Attribute(Name('torch'), 'load'); '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe loads in one Python source text, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    torch_names, numpy_names, load_aliases = {"torch"}, {"np", "numpy"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch":
                    torch_names.add(a.asname or "torch")
                if a.name == "numpy":
                    numpy_names.add(a.asname or "numpy")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy"):
            for a in node.names:
                if a.name == "load":
                    load_aliases[a.asname or "load"] = node.module
    out = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            out.append(f"{where}: imports from {node.module}")
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in PICKLE_MODULES:
                    out.append(f"{where}: imports {a.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, attr = name.rpartition(".")
        module = load_aliases.get(name) if not head else ("torch" if head in torch_names else
                                                          "numpy" if head in numpy_names else head)
        if attr == "load" or (not head and name in load_aliases):
            if module == "torch" and not _is_true(_kw(node, "weights_only")):
                out.append(f"{where}: torch.load without weights_only=True")
            if module == "numpy" and _kw(node, "allow_pickle") is not None and not (
                    isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False):
                out.append(f"{where}: np.load with allow_pickle")
        if _is_true(_kw(node, "trust_remote_code")):
            out.append(f"{where}: trust_remote_code=True")
        if attr == "register_for_checkpointing":
            out.append(f"{where}: register_for_checkpointing (accelerate unpickles it with weights_only=False)")
    return out


def _sources():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20, f"scan found only {len(files)} files under {SCANNED}"
    return files


def test_project_sources_load_safely():
    found = []
    for path in _sources():
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert found == [], "unsafe loads:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet,bad", [
    ("import torch\nx = torch.load('a.pt')\n", True),
    ("import torch\nx = torch.load('a.pt', map_location='cpu', weights_only=False)\n", True),
    ("import torch as T\nx = T.load('a.pt')\n", True),
    ("from torch import load\nx = load('a.pt')\n", True),
    ("import numpy as np\nx = np.load('a.npy', allow_pickle=True)\n", True),
    ("import pickle\nx = pickle.load(open('a', 'rb'))\n", True),
    ("from transformers import AutoModel\nm = AutoModel.from_pretrained('x', trust_remote_code=True)\n", True),
    ("accelerator.register_for_checkpointing(scheduler)\n", True),
    ("import torch\nx = torch.load('a.pt', map_location='cpu', weights_only=True)\n", False),
    ("import numpy as np\nx = np.load('a.npy', mmap_mode='r')\n", False),
    ("m = AutoModel.from_pretrained('x', trust_remote_code=args.trust_remote_code)\n", False),
    ("import json\nx = json.load(open('a'))\n", False),
    ("# torch.load('a.pt') in a comment\ns = 'torch.load(x)'\n", False),
], ids=lambda v: v if isinstance(v, bool) else None)
def test_checker_flags_unsafe_snippets(snippet, bad):
    assert bool(violations(snippet)) is bad, violations(snippet)


def test_weights_only_refuses_a_pickled_object(tmp_path):
    """What the rule buys: a checkpoint holding an arbitrary object is refused, not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        torch.load(path, weights_only=True)


class _Payload:
    """Stands in for an object whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("this would have run",))
