"""The request path composed: the serving snapshot, how it is built, the stage list."""
