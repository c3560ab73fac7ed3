"""The README's commands stay true to the tree: every ```bash block parses (`bash -n`); every command in it names a
script, file or module that exists; a script's or module's `--flags` appear in its source; every `avg <command>`
line runs `--help` with status 0 and uses only flags that help lists. Also: the README is a front page of at most
300 lines, its links and repository paths exist, it links every page under docs/, and the two blocks another
process rewrites (the results status line and the results table) are where that process looks for them."""
from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S)
REPO_DIRS = ("scripts", "tools", "configs", "docs", "tests", "avg")
REPO_PATH = re.compile(r"(?<![\w/.$-])((?:%s)/[\w./-]*[\w/])" % "|".join(REPO_DIRS))
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
KNOWN = {"bash", "python", "python3", "avg", "source", "conda", "printf", "echo"}


def _commands(block: str) -> list[list[str]]:
    """Simple commands of a bash block, as word lists: continuations joined, comments dropped, split at pipes,
    `&&`, `||` and `;`, redirections and leading VAR=value assignments removed."""
    text = block.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        words, skip = [], False
        for tok in list(lex) + [";"]:
            if skip:
                skip = False
            elif tok in (">", ">>", "<", "2>", "&>"):
                skip = True
            elif tok in ("|", "||", "&&", ";", "&"):
                while words and ASSIGNMENT.match(words[0]):
                    words.pop(0)
                if words:
                    commands.append(words)
                words = []
            else:
                words.append(tok)
    return commands


ALL_COMMANDS = [cmd for block in BLOCKS for cmd in _commands(block)]


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


def _module_file(name: str) -> Path:
    """The file `python -m name` runs: the module, or a package's __main__.py (a package without one cannot run)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"README runs python -m {name}, which is not importable"
    path = Path(spec.origin)
    if spec.submodule_search_locations is not None:
        path = path.parent / "__main__.py"
        assert path.is_file(), f"README runs python -m {name}, a package without __main__.py"
    return path


def _source_with_callees(script: Path) -> str:
    """A script's text and the source of the Python modules and tools it runs (where its flags go)."""
    text = script.read_text()
    parts = [text]
    for mod in re.findall(r"(?:python3?|\$LAUNCH|\$\{LAUNCH\}) -m ([\w.]+)", text):
        spec = importlib.util.find_spec(mod)
        if spec is not None and spec.origin and spec.submodule_search_locations is None:
            parts.append(Path(spec.origin).read_text())
    for tool in re.findall(r"\b(tools/[\w./-]+\.py)", text):
        if (ROOT / tool).is_file():
            parts.append((ROOT / tool).read_text())
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def _avg_help(subcommand: str | None) -> str:
    args = [sys.executable, "-m", "avg"] + ([subcommand] if subcommand else []) + ["--help"]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(args[2:])} exited {res.returncode}: {res.stderr[-2000:]}"
    return res.stdout


def _check_avg(words: list[str]) -> None:
    """`avg ...` or `python -m avg ...`: the subcommand's --help runs, and lists every flag the README uses."""
    rest = words[1:]
    sub = rest[0] if rest and not rest[0].startswith("-") else None
    help_text = _avg_help(sub)
    if sub is not None:
        assert re.search(rf"^\s+{re.escape(sub)}\b", _avg_help(None), flags=re.M), f"avg has no command {sub!r}"
    missing = [f for f in _flags(rest) if f not in help_text]
    assert not missing, f"README: `{' '.join(words)}` uses {missing}, not in `avg {sub or ''} --help`"


def _check(words: list[str]) -> None:
    cmd, args = words[0], words[1:]
    if cmd.endswith("/avg"):
        cmd = "avg"
    assert cmd in KNOWN, f"README runs {cmd!r}; this test knows how to check {sorted(KNOWN)}"
    if cmd == "avg":
        _check_avg(words)
    elif cmd == "bash":
        assert args, "bash without a script"
        script = ROOT / args[0]
        assert script.is_file(), f"README runs bash {args[0]}, which does not exist"
        source = _source_with_callees(script)
        missing = [f for f in _flags(args[1:]) if f not in source]
        assert not missing, f"README: `{' '.join(words)}` uses {missing}, found neither in {args[0]} nor in what it runs"
    elif cmd in ("python", "python3"):
        if args[:1] == ["-m"]:
            module = args[1]
            if module == "avg":
                _check_avg(["avg"] + args[2:])
                return
            source = _module_file(module).read_text()
            rest = args[2:]
        else:
            assert args and (ROOT / args[0]).is_file(), f"README runs python {args[:1]}, which does not exist"
            source, rest = (ROOT / args[0]).read_text(), args[1:]
        missing = [f for f in _flags(rest) if f not in source]
        assert not missing, f"README: `{' '.join(words)}` uses {missing}, not in the module's source"
    elif cmd == "source":
        target = args[0]
        if not target.startswith(".venv/"):  # made by scripts/bootstrap.sh, which test.sh runs first
            assert (ROOT / target).is_file(), f"README sources {target}, which does not exist"
    elif cmd == "conda" and "-f" in args:
        assert (ROOT / args[args.index("-f") + 1]).is_file(), f"README: `{' '.join(words)}` names a missing file"


def test_readme_is_a_front_page():
    n = len(README.splitlines())
    assert n <= 300, f"README.md has {n} lines; the front page keeps to 300 (move detail to docs/)"


def test_readme_has_bash_blocks_with_commands():
    assert len(BLOCKS) >= 5 and len(ALL_COMMANDS) >= 10, (len(BLOCKS), len(ALL_COMMANDS))
    names = {c[0] for c in ALL_COMMANDS}
    assert {"bash", "avg"} <= names, names


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_bash_block_parses(block):
    res = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"bash -n failed on:\n{block}\n{res.stderr}"


@pytest.mark.parametrize("words", ALL_COMMANDS, ids=[" ".join(c)[:60] for c in ALL_COMMANDS])
def test_command_names_what_exists(words):
    _check(words)


def test_repository_paths_and_links_exist():
    """Every repository path the README names (in a command, in backticks or in prose) and every relative link."""
    missing = []
    for path in REPO_PATH.findall(README):
        if not (ROOT / path).exists():
            missing.append(path)
    for link in re.findall(r"\]\(([^)\s]+)\)", README):
        target = link.split("#", 1)[0]
        if target and not re.match(r"^[a-z]+://", target) and not (ROOT / target).exists():
            missing.append(link)
    assert not missing, f"README names paths that do not exist: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_link_anchors_exist():
    bad = []
    for link in re.findall(r"\]\(([^)\s]+#[^)\s]+)\)", README):
        target, anchor = link.split("#", 1)
        page = (ROOT / target).read_text() if target else README
        slugs = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", page, flags=re.M)}
        if anchor not in slugs:
            bad.append(link)
    assert not bad, f"README links to headings that do not exist: {bad}"


def test_every_docs_page_is_linked():
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    linked = {link.split("#", 1)[0] for link in re.findall(r"\]\(([^)\s]+)\)", README)}
    assert pages <= linked, f"README's documentation index misses {sorted(pages - linked)}"


def test_results_blocks_are_in_place():
    """The status line and the results table are rewritten by hand later: one marker each, in order, the table
    between its two markers, and the status line an HTML comment (it renders as nothing)."""
    status, start, end = "<!-- RESULTS-STATUS -->", "<!-- RESULTS-TABLE -->", "<!-- /RESULTS-TABLE -->"
    for marker in (status, start, end):
        assert README.count(marker) == 1, f"README must hold {marker} exactly once"
    assert README.index(status) < README.index(start) < README.index(end)
    table = README[README.index(start):README.index(end)]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and "---" in rows[1], "the results block holds a markdown table"
    assert "docs/results.md" in table


DRY_RUNS = [c for c in ALL_COMMANDS if c[0] == "bash" and "--dry-run" in c]


@pytest.mark.parametrize("words", DRY_RUNS, ids=[" ".join(c) for c in DRY_RUNS])
def test_readme_dry_runs_run_as_written(words, tmp_path):
    """The README's --dry-run commands run as written (outputs pointed at a temporary folder): exit 0, name every
    stage's command, write nothing."""
    import os

    env = {**os.environ, "OUT_DIR": str(tmp_path / "out"), "WANDB_MODE": "disabled"}
    res = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"`{' '.join(words)}` exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert "$ bash scripts/train_retriever_t5.sh" in res.stdout and not (tmp_path / "out").exists()


def test_readme_runs_some_dry_run():
    assert DRY_RUNS, "the README shows no --dry-run command (the test above would check nothing)"
