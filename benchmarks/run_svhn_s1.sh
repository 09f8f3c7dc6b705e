#!/usr/bin/env bash
# S1 on SVHN with ABSA (STRATEGY=... for another); see run_preset.sh --help for the settings.
set -euo pipefail
PRESET=s1 exec "$(dirname "$0")/run_preset.sh" "$@"
