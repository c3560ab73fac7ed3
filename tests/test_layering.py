"""Import rules of the package, read from the source with ``ast`` (function-level imports included):

* no module imports another module's private name (``from avg.x import _name``) or reaches one
  through a module alias (``M._name``) -- a private helper that two modules need is public;
* the library does not import the test suite or the tools.

The full layer order of the re-layering issue (core < artifacts < models < train < stages <
experiments) is not enforced yet: the package still has upward edges; this file is where that
rule will live.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avg"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(tree: ast.AST):
    """(module imported, names taken from it, line) for every import statement, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        me = _module_name(path)
        aliases = {}  # local alias -> avg module, for `import avg.x as M` / `from avg import x as M`
        for module, names, line in _imports(tree):
            if not module.startswith("avg"):
                continue
            if module != me:
                bad += [f"{path.relative_to(ROOT)}:{line}: from {module} import {n}" for n in names if _private(n)]
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == module:
                    for a in node.names:
                        aliases[a.asname or a.name] = f"{module}.{a.name}"
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.asname:
                            aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != me
                    and (PACKAGE.parent / (aliases[node.value.id].replace(".", "/") + ".py")).is_file()):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr} "
                           f"({aliases[node.value.id]})")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_library_does_not_import_tests_or_tools():
    bad = []
    for path in _modules():
        for module, _, line in _imports(ast.parse(path.read_text(), filename=str(path))):
            if module.split(".")[0] in ("tests", "tools", "conftest"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_private_import(tmp_path):
    """The walker sees function-level imports and alias attributes (not only top-level statements)."""
    src = "def f():\n    from avg.data.karpathy import _hidden\n    import avg.utils.io as IO\n    return IO._secret\n"
    tree = ast.parse(src)
    found = [(m, n) for m, n, _ in _imports(tree)]
    assert ("avg.data.karpathy", ["_hidden"]) in found and ("avg.utils.io", []) in found
    assert _private("_hidden") and not _private("__all__") and not _private("public")
