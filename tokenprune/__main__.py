"""``python -m tokenprune``."""

from __future__ import annotations

import sys

from tokenprune.cli import main

sys.exit(main())
