"""The `astraea` command: one module per subcommand or small family of them, wired by `main.py`."""
