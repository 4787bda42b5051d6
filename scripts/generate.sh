#!/usr/bin/env bash
# The main job on the embedded default: set up .venv if needed, then run jobs/generate.py
# (a local Ray, the shipped tiny model, the bundled prompts). Arguments pass through.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "$root/.venv/bin/python" jobs/generate.py "$@"
