"""Installation fails clearly: scripts/bootstrap.sh checks the Python version before anything else, against
pyproject.toml's requires-python, and says in one line which version is needed and how to get it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_python(path: Path, version: str) -> Path:
    """An interpreter that says it is ``version`` and fails the version check as that version would."""
    major, minor = map(int, version.split(".")[:2])
    path.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then echo "Python {version}"; exit 0; fi
exec {sys.executable} -c "import sys; sys.version_info = ({major}, {minor}, 0); exec(sys.argv[1])" "$2"
""")
    path.chmod(0o755)
    return path


def _bootstrap(tmp_path, python: Path):
    env = {**os.environ, "PYTHON_BIN": str(python), "VENV": str(tmp_path / "venv")}
    return subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_an_older_python_stops_bootstrap_with_one_clear_line(tmp_path):
    need = re.search(r'requires-python\s*=\s*">=\s*([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    res = _bootstrap(tmp_path, _fake_python(tmp_path / "python3.10", "3.10.12"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: avg needs Python >= {need}")
    assert "Python 3.10.12" in lines[0] and f"PYTHON_BIN=python{need}" in lines[0]
    assert not (tmp_path / "venv").exists()  # stopped before creating anything


def test_the_supported_python_passes_the_check(tmp_path):
    need = re.search(r'requires-python\s*=\s*">=\s*([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    res = _bootstrap(tmp_path, _fake_python(tmp_path / "python", need + ".0"))
    assert "needs Python" not in res.stderr  # it went on (to create the venv, which the fake cannot)
