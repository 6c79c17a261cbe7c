"""`python -m astraea.tools.cli` runs the `astraea` command."""

from astraea.tools.cli.main import main

raise SystemExit(main())
