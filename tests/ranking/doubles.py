"""Small real implementations the model-cache and loading tests pass in."""

from __future__ import annotations


class Rejections:
    """Records every ``on_rejected(name, version, reason)`` call of a model cache."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, name: str, version: str, reason: str) -> None:
        self.calls.append((name, version, reason))


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
