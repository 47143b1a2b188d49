"""``python -m unisondb`` → the ``unisondb`` command."""

from unisondb.cli import main

raise SystemExit(main())
