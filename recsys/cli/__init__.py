"""The `recsys` console script: the composition root of every command (see main.py)."""
