"""`python -m mailrouter` is the `mailrouter` command."""

from __future__ import annotations

import sys

from mailrouter.cli import main

sys.exit(main())
