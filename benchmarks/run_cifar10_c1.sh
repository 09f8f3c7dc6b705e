#!/usr/bin/env bash
# C1 on CIFAR-10 with ABSA (STRATEGY=... for another); see run_preset.sh --help for the settings.
set -euo pipefail
PRESET=c1 exec "$(dirname "$0")/run_preset.sh" "$@"
