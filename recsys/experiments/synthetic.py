"""A synthetic experiments document of any size, for benchmarks and load tests.

``n_experiments`` spread evenly over ``n_layers`` layers, each layer's experiments splitting
``coverage`` of its buckets between them, 2 or 3 arms each, a tenth of them targeted, the first
four layers turning real pipeline parameters (the others run experiments without parameters the
pipeline knows, e.g. A/A tests), and a 0.5% global holdout.
"""

from __future__ import annotations

from typing import Any

from recsys.experiments.config import SCHEMA_VERSION

PARAM_LAYERS: tuple[tuple[str, list[Any]], ...] = (
    ("retrieval_k", [200, 300, 400]),
    ("nprobe", [8, 16, 32]),
    ("max_per_restaurant", [1, 2, 3]),
    ("radius_km", [5.0, 8.0, 12.0]),
)


def synthetic_config(
    n_layers: int, n_experiments: int, coverage: float, num_buckets: int = 10_000
) -> dict[str, Any]:
    layers: list[dict[str, Any]] = []
    base, extra = divmod(n_experiments, n_layers)
    per_layer = [base + (i < extra) for i in range(n_layers)]
    for i, count in enumerate(per_layer):
        share = int(num_buckets * coverage) // max(count, 1)
        experiments = []
        for j in range(count):
            n_arms = 2 + (j % 2)
            param = PARAM_LAYERS[i] if i < len(PARAM_LAYERS) else None
            arms = [
                {
                    "name": f"arm-{k}",
                    "weight": 1 + k,
                    "params": {param[0]: param[1][k]} if param else {},
                }
                for k in range(n_arms)
            ]
            exp: dict[str, Any] = {
                "name": f"exp-{i}-{j}",
                "status": "running",
                "epoch": 0,
                "buckets": [[j * share, (j + 1) * share]] if share else [],
                "arms": arms,
            }
            if (i * count + j) % 10 == 0:
                exp["targeting"] = {"surfaces": ["home"], "platforms": ["ios", "android"]}
            experiments.append(exp)
        layers.append({"name": f"layer-{i}", "salt": f"salt-{i}", "experiments": experiments})
    return {
        "schema": SCHEMA_VERSION,
        "num_buckets": num_buckets,
        "holdout": {"salt": "holdout", "buckets": [[0, 50]]},
        "layers": layers,
    }
