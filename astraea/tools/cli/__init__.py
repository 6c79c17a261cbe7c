"""The `astraea` command: one module per subcommand, wired by `main.py`."""
