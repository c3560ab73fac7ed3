"""The maps of the code (docs/design.md: the "Paper → code" table and the "Layout" block) stay true to the tree:
every file they name exists, every function / class / method the table names is defined in the package, and every
subpackage of ``avg/`` appears in the layout."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "docs" / "design.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else len(README)]


def _definitions() -> set[str]:
    """Names under avg/ a reader can look up: every function, class, method, assigned name or
    attribute (``self.decoder = ...``), and every string constant (a report row or grid variant name).
    The constants make the check looser: a renamed function whose old name survives as a string
    somewhere under avg/ still passes."""
    names: set[str] = set()
    for path in (ROOT / "avg").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id if isinstance(t, ast.Name) else t.attr for t in node.targets
                             if isinstance(t, (ast.Name, ast.Attribute)))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)
    return names


HF_API = {"generate"}  # transformers' own methods the table compares with


def _table_rows() -> list[str]:
    return [line for line in _section("Paper → code").splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_paper_table_names_files_that_exist():
    rows = _table_rows()
    assert len(rows) >= 15  # eqs. 1-10, Sec. 3.2/3.3, the reranker, Tables 1-7
    missing = []
    for row in rows:
        for path in re.findall(r"`((?:avg|scripts|tools|configs)/[\w/.-]+)`", row):
            if not (ROOT / path).exists():
                missing.append(f"{path} ({row[:40]}…)")
        for name in re.findall(r"`((?:heads|scoring|model|saving|lm_setup)\.py)`", row):  # short names after a full path
            if not any((ROOT / "avg" / sub / name).is_file() for sub in ("reranker", "retriever")):
                missing.append(name)
    assert not missing, "README paper → code table names missing files:\n" + "\n".join(missing)


def test_paper_table_names_functions_that_exist():
    defined = _definitions()
    missing = []
    for row in _table_rows():
        code_cell = row.split(" | ")[-1]
        for token in re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", code_cell):
            if "/" in token or token.isupper() or token.endswith((".py", ".sh", ".json", ".jsonl")):
                continue  # paths, shell variables, file names
            if re.fullmatch(r"[a-z0-9-]+", token) and "-" in token:
                continue  # flag values such as per-level
            name = token.split(".")[-1]
            if name[0].islower() and name in {"python", "bash", "vocab", "children", "shared", "none", "global", "ema",
                                              "best", "full", "stage1"}:
                continue  # values of flags, not code
            if name not in defined and name not in HF_API:
                missing.append(f"{token} ({row[:40]}…)")
    assert not missing, "README paper → code table names undefined code:\n" + "\n".join(missing)


def test_layout_lists_every_subpackage_and_only_real_paths():
    block = _section("Layout")
    listed = set(re.findall(r"^(avg/[\w/.]+)", block, flags=re.M))
    for path in listed:
        assert (ROOT / path).exists(), f"README layout lists {path}, which does not exist"
    subpackages = {f"avg/{p.name}/" for p in (ROOT / "avg").iterdir() if (p / "__init__.py").is_file()}
    absent = sorted(p for p in subpackages if not any(x.startswith(p) for x in listed))
    assert not absent, f"README layout does not list {absent}"
    modules = {f"avg/{p.name}" for p in (ROOT / "avg").glob("*.py") if p.name != "__init__.py"}
    assert modules <= listed, f"README layout does not list {sorted(modules - listed)}"
