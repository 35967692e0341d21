#!/usr/bin/env bash
# The main job: sets up the environment, then runs `sphere-fast demo` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh triton,editing
sphere-fast demo "$@"
