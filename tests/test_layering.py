"""Import rules of the package, read from the source with ``ast`` (function-level imports included):

* dependencies run one way: every module belongs to a unit (a subpackage, or a top-level module
  such as ``avg.metrics``), units sit in the layers of ``LAYERS``, and a module imports only its
  own unit or units of lower layers -- so the package has no import cycles between units;
* no module imports another module's private name (``from avg.x import _name``) or reaches one
  through a module alias (``M._name``) -- a private helper that two modules need is public;
* nothing imports a stage module (``avg.stages``) but another stage module: stages are entry points,
  run as ``python -m avg.stages.<name>`` (by their scripts, run_all and the grid), never libraries;
* the library does not import the test suite or the tools.
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


# lowest first; a unit imports only from its own unit or from units of lower layers
LAYERS = (
    ("avg.core",),                                        # io, manifests, tracking, cli, seeds, devices, progress
    ("avg.artifacts", "avg.metrics", "avg.search"),        # files stages hand each other; R@K; code index, beam search,
                                                          # galleries, exact search
    ("avg.data",),                                        # caption datasets, images, demo scenes, sample tables
    ("avg.models",),                                      # RQ-VAE, k-means, CLIP loaders, the demo CLIP
    ("avg.train",),                                       # the training loop, checkpoints and resume; seeded batches
    ("avg.retriever",),                                   # voken vocabulary, retriever data, query prefix, T5/LLaMA set-up, evaluation
    ("avg.objectives",),                                  # eqs. 7-10 with candidate mining; the reranker's losses
    ("avg.rqvae",),                                       # the RQ-VAE's training data
    ("avg.reranker",),                                    # reranker lists, models, scoring, steps
    ("avg.stages",),                                      # one module per stage script (imported by nothing else)
    ("avg.experiments",),                                 # benchmarks, grid, report, seeds, pages
    ("avg.api",),                                         # the Python API over a trained run
    ("avg.cli",),                                         # the avg command (and python -m avg: avg.__main__)
    ("avg", "avg.__main__"),                              # the package's own __init__ and __main__
)


def _unit(module: str) -> str:
    """The most specific unit of LAYERS that holds ``module``."""
    best = max((u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module}: in no unit of LAYERS (add it to its layer)")
    return best


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _upward_edges(modules: dict) -> list:
    """(importer, imported, line) for every import of a unit of the same or a higher layer (other than itself)."""
    bad = []
    for me, tree in modules.items():
        mine = _unit(me)
        for module, names, line in _imports(tree):
            if not module.startswith("avg"):
                continue
            targets = [module] + ([f"{module}.{n}" for n in names] if module in ("avg", "avg.search") else [])
            for t in targets:
                unit = _unit(t)
                if unit != mine and _layer(unit) >= _layer(mine) and not (t in ("avg", "avg.search") and len(targets) > 1):
                    bad.append((me, t, line))
    return bad


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


def test_dependencies_run_one_way():
    modules = {_module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in _modules()}
    bad = [f"{me} (layer {_layer(_unit(me))}) line {line} imports {t} (layer {_layer(_unit(t))})"
           for me, t, line in _upward_edges(modules)]
    assert not bad, "imports against the layer order of LAYERS:\n" + "\n".join(bad)


def test_the_layer_rule_catches_an_upward_edge():
    """A function-level import of a higher layer is found; imports within a unit and downward are not."""
    modules = {
        "avg.metrics": ast.parse("def f():\n    from avg.search.gallery import Gallery\n"),
        "avg.search.beam": ast.parse("from avg.search.gallery import Gallery\nfrom avg.core.io import read_json\n"),
        "avg.data.karpathy": ast.parse("from avg.artifacts.emb import load_emb\nimport avg.reranker.model as RM\n"),
    }
    assert sorted(_upward_edges(modules)) == [("avg.data.karpathy", "avg.reranker.model", 2),
                                              ("avg.metrics", "avg.search.gallery", 2)]
    assert _unit("avg.search.exact") == "avg.search" and _unit("avg.cli") == "avg.cli"


def test_nothing_imports_a_stage_module():
    bad = []
    for path in _modules():
        me = _module_name(path)
        if _unit(me) == "avg.stages":
            continue
        for module, names, line in _imports(ast.parse(path.read_text(), filename=str(path))):
            targets = [module] + [f"{module}.{n}" for n in names if module == "avg"]
            bad += [f"{path.relative_to(ROOT)}:{line}: imports {t}" for t in targets
                    if t.startswith("avg") and _unit(t) == "avg.stages"]
    assert not bad, "stage modules are entry points, not libraries (move what is shared below them):\n" + "\n".join(bad)


def test_the_library_does_not_import_tests_or_tools():
    bad = []
    for path in _modules():
        for module, _, line in _imports(ast.parse(path.read_text(), filename=str(path))):
            if module.split(".")[0] in ("tests", "tools", "conftest"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_private_import(tmp_path):
    """The walker sees function-level imports and alias attributes (not only top-level statements)."""
    src = "def f():\n    from avg.data.karpathy import _hidden\n    import avg.core.io as IO\n    return IO._secret\n"
    tree = ast.parse(src)
    found = [(m, n) for m, n, _ in _imports(tree)]
    assert ("avg.data.karpathy", ["_hidden"]) in found and ("avg.core.io", []) in found
    assert _private("_hidden") and not _private("__all__") and not _private("public")
