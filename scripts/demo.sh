#!/usr/bin/env bash
# The end-to-end demo on the embedded synthetic corpus (CPU, local Ray, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/blip2 demo "$@"
