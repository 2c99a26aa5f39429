"""`python -m opsgate`."""

from __future__ import annotations

import sys

from opsgate.cli import main

sys.exit(main())
