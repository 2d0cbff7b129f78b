"""``python -m gradwise`` is the ``gradwise`` command."""

from gradwise.cli import main

raise SystemExit(main())
