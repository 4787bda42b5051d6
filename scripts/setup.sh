#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch (CPU wheel) installed first,
# then the project with every extra under constraints.txt, so that no CUDA torch is pulled.
# Re-running is cheap: a stamp of pyproject.toml + constraints.txt skips the install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PROPHET_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp_want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$venv/.prophet-stamp" ] && [ "$(cat "$venv/.prophet-stamp")" = "$stamp_want" ]; then
  exit 0
fi
echo "setting up $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel on this machine (or the registry's, elsewhere).
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[pipeline,hf,lmeval,dev,test]"
echo "$stamp_want" > "$venv/.prophet-stamp"
