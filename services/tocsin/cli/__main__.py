"""``python -m tocsin.cli``: the same as the ``tocsin`` command (as before the split)."""

from tocsin.cli import main

raise SystemExit(main())
