"""One module per CLI command (see sasq/cli.py)."""
