"""``python -m tocsin``: the same as the ``tocsin`` command."""

from tocsin.cli import main

raise SystemExit(main())
