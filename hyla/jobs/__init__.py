"""Entry points: the `hyla` command line."""
