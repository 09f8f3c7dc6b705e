#!/usr/bin/env bash
# I1 on TinyImageNet with ABSA (STRATEGY=... for another); see run_preset.sh --help for the settings.
set -euo pipefail
PRESET=i1 exec "$(dirname "$0")/run_preset.sh" "$@"
