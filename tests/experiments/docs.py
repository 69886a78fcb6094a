"""Small experiments documents for tests."""

from __future__ import annotations

import copy
from typing import Any

from recsys.experiments.config import default_config


def two_layer_doc() -> dict[str, Any]:
    """default_config() plus launch defaults, a targeted experiment and a 10% holdout."""
    doc = default_config()
    doc["holdout"] = {"salt": "global-holdout", "buckets": [[0, 1000]]}
    doc["layers"][0]["launch_defaults"] = {"nprobe": 32}
    doc["layers"].append(
        {
            "name": "ranking",
            "salt": "ranking",
            "launch_defaults": {"model_version": "m1"},
            "experiments": [
                {
                    "name": "ranker-v2",
                    "status": "running",
                    "epoch": 0,
                    "buckets": [[0, 5000]],
                    "targeting": {"platforms": ["ios"], "has_location": True},
                    "arms": [
                        {"name": "control", "weight": 1, "params": {}},
                        {"name": "v2", "weight": 1, "params": {"model_version": "m2"}},
                    ],
                },
                {
                    "name": "ranker-draft",
                    "status": "stopped",
                    "epoch": 0,
                    "buckets": [[0, 100]],
                    "arms": [{"name": "v3", "weight": 1, "params": {"model_version": "m3"}}],
                },
            ],
        }
    )
    return doc


def single_experiment_doc(
    buckets: list[list[int]], weights: list[float], epoch: int = 0
) -> dict[str, Any]:
    return {
        "schema": 1,
        "layers": [
            {
                "name": "layer",
                "experiments": [
                    {
                        "name": "exp",
                        "status": "running",
                        "epoch": epoch,
                        "buckets": copy.deepcopy(buckets),
                        "arms": [
                            {"name": f"arm-{i}", "weight": w, "params": {}}
                            for i, w in enumerate(weights)
                        ],
                    }
                ],
            }
        ],
    }
