"""``python -m scaling_abs`` / ``accelerate launch -m scaling_abs train ...``."""

import sys

from scaling_abs.cli import main

sys.exit(main())
