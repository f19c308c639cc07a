"""``python -m bench``: see :func:`bench.cli.main`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
