"""Make this folder's synthetic shop log: 2,000 impressions of four groups the project has
never heard of (``impressions.csv``, train catalog) and 600 more of products it never trains
on (``impressions-heldout.csv``, val catalog), in a shop's own column names, without
timestamps or sources.

Choices come from ``genshop simulate impressions`` (the hidden utilities of groups A-D in
``configs/groups.yaml``, renamed), over real products of the train catalog drawn without
item pools, as a real log would be. Run from the repository root:

    D=../shared/data/fashion-products
    python docs/examples/shop-log/make_log.py $D/catalog-train.parquet $D/catalog-val.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

from reward.simulator import SimulationConfig, simulate_impressions

HERE = Path(__file__).resolve().parent
NAMES = {"A": "coast", "B": "heritage", "C": "metro", "D": "campus"}  # the shop's own group ids


def write_log(catalog: str, n: int, seed: int, path: Path) -> None:
    frame, _ = simulate_impressions(SimulationConfig(catalog=[catalog], groups=Path("configs/groups.yaml"), n=n, k=4,
                                                     seed=seed, pools=1))
    log = frame.assign(group_id=frame["group_id"].map(NAMES), shown=["|".join(items) for items in frame["items"]])
    log = log.rename(columns={"brief": "prompt"})[["impression_id", "group_id", "prompt", "shown", "chosen"]]
    log.to_csv(path, index=False)


if __name__ == "__main__":
    write_log(sys.argv[1], 2000, 11, HERE / "impressions.csv")
    write_log(sys.argv[2], 600, 12, HERE / "impressions-heldout.csv")
