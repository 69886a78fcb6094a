"""Breaking one column of the users' rows in the online feature store, and putting it back.

The rows are the ones ``recsys features publish`` wrote (``{prefix}{features_version}:uv:{user}``,
float64 bytes, ranking.features.user_feature_rows). :meth:`OnlineFeatureFault.inject` keeps
every original value in memory and overwrites the column; :meth:`OnlineFeatureFault.restore`
writes the originals back (also when the run fails: the simulator calls it in ``finally``).
Blocking Redis calls: run them off the event loop.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import redis

from recsys.ranking.feature_store import PUBLISH_CHUNK, user_key
from recsys.simulation.scenarios import FeatureFault


class FeatureStoreMissing(RuntimeError):
    """The online store holds no rows for this features version."""


class OnlineFeatureFault:
    def __init__(
        self,
        url: str,
        prefix: str,
        features_version: str,
        user_ids: npt.NDArray[np.str_],
        row_width: int,
        fault: FeatureFault,
    ) -> None:
        self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._keys = [user_key(prefix, features_version, u) for u in user_ids.tolist()]
        self._row_bytes = row_width * 8
        self._column = fault.index(row_width)
        self._fault = fault
        self._saved: dict[str, bytes] = {}
        self.where = f"{prefix}{features_version}:uv:*"

    def check(self) -> None:
        """Raise :class:`FeatureStoreMissing` unless the first user's row is there."""
        value = self._client.get(self._keys[0]) if self._keys else None
        if not isinstance(value, bytes) or len(value) != self._row_bytes:
            raise FeatureStoreMissing(
                f"broken-feature: no user rows at {self.where}; publish them with "
                "`recsys features publish` and serve with `recsys serve --feature-store`"
            )

    def inject(self) -> int:
        """Overwrite the column in every row the store holds; returns the rows changed."""
        changed = 0
        value = np.nan if self._fault.mode == "nan" else self._fault.value
        for lo in range(0, len(self._keys), PUBLISH_CHUNK):
            keys = self._keys[lo : lo + PUBLISH_CHUNK]
            found = self._client.mget(keys)
            pipe = self._client.pipeline(transaction=False)
            for key, raw in zip(keys, found, strict=True):
                if not isinstance(raw, bytes) or len(raw) != self._row_bytes:
                    continue
                self._saved.setdefault(key, raw)
                row = np.frombuffer(raw, np.float64).copy()
                row[self._column] = value
                pipe.set(key, row.tobytes())
                changed += 1
            pipe.execute()
        return changed

    def restore(self) -> int:
        """Write every saved row back; returns how many."""
        saved = list(self._saved.items())
        for lo in range(0, len(saved), PUBLISH_CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for key, raw in saved[lo : lo + PUBLISH_CHUNK]:
                pipe.set(key, raw)
            pipe.execute()
        self._saved.clear()
        return len(saved)

    def close(self) -> None:
        self._client.close()
