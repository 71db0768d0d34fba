"""``python -m specops``: the command line (see :mod:`specops.cli`)."""

from .cli import main

raise SystemExit(main())
