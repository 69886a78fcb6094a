"""Test vectors for the assignment hash, for implementations in other languages.

    .venv/bin/python -m recsys.experiments.vectors > recsys/experiments/hash_vectors.json

The file is checked in; tests/experiments/test_hash_vectors.py checks that it matches this
implementation and an independent transcription of the written spec (docs/experiments.md).
64-bit values are decimal strings (JSON numbers lose precision above 2**53 in many languages).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from recsys.experiments import hashing

VECTOR_FILE_VERSION = 1

USER_IDS = (
    "",
    "user-0000042",
    "user-0000043",
    "alice@example.com",
    "ユーザー-7",
    "émile",
    "🍕-lover",
    "a" * 128,
    "0",
    "qa-tester",
)
LAYER_SALTS = ("retrieval", "arrange", "layer-17", "salt with spaces", "ß")
NUM_BUCKETS = (1000, 10_000, 65_536, 1_000_000)
EXPERIMENTS: tuple[tuple[str, int, tuple[float, ...]], ...] = (
    ("retrieval-depth", 0, (50, 50)),
    ("retrieval-depth", 1, (50, 50)),
    ("restaurant-cap", 3, (1, 1, 1)),
    ("ranker-v7", 0, (0.9, 0.1)),
    ("new-ui", 12, (5, 3, 1.5, 0.25)),
)
MIX_INPUTS = (0, 1, 2, 0xFFFFFFFFFFFFFFFF, 0x0123456789ABCDEF, 1 << 63, 12345678901234567890)


def build_vectors() -> dict[str, Any]:
    return {
        "description": (
            "Assignment hash test vectors; the spec is docs/experiments.md, section 'The hash'. "
            "64-bit values are decimal strings."
        ),
        "version": VECTOR_FILE_VERSION,
        "key64": [
            {"text": text, "key64": str(hashing.key64(text))}
            for text in (*USER_IDS, "layer:retrieval", "holdout:global-holdout")
        ],
        "mix64": [{"input": str(z), "output": str(hashing.mix64(z))} for z in MIX_INPUTS],
        "buckets": [
            {
                "user_id": user_id,
                "layer_salt": salt,
                "num_buckets": nb,
                "bucket": hashing.bucket(user_id, hashing.layer_key(salt), nb),
            }
            for user_id in USER_IDS
            for salt in LAYER_SALTS
            for nb in NUM_BUCKETS
        ],
        "holdout": [
            {
                "user_id": user_id,
                "holdout_salt": "global-holdout",
                "num_buckets": 10_000,
                "bucket": hashing.bucket(user_id, hashing.holdout_key("global-holdout"), 10_000),
            }
            for user_id in USER_IDS
        ],
        "thresholds": [
            {"weights": list(w), "thresholds": hashing.arm_thresholds(w)} for _, _, w in EXPERIMENTS
        ],
        "arms": [
            {
                "user_id": user_id,
                "experiment_salt": salt,
                "epoch": epoch,
                "weights": list(weights),
                "point": point,
                "arm": hashing.arm_index(point, hashing.arm_thresholds(weights)),
            }
            for user_id in USER_IDS
            for salt, epoch, weights in EXPERIMENTS
            for point in (hashing.arm_point(user_id, hashing.experiment_key(salt, epoch)),)
        ],
    }


def main() -> None:
    json.dump(build_vectors(), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
