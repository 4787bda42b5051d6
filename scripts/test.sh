#!/usr/bin/env bash
# The test command: set up .venv if needed (idempotent), then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu RAY_DATA_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
