"""``genshop simulate ab``: results for an exported experiment, from the simulator's groups.

Each simulated customer belongs to a group (drawn by the simulator's shares), is assigned
an arm by the manifest's salted hash of their id (as the shop would), browses one of the
experiment's briefs, and is shown that arm's listings for it. They click one listing or
none by the simulator's multinomial logit over the listings' attributes (the attributes
the export recorded: the enrich stage's predictions for generated items, the catalog's
for real products; the brief-colour bonus included), add the clicked listing to the cart
with ``cart_rate`` and buy it with ``purchase_rate``. The output is a results file in the
format ``genshop import ab-results`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from genshop.experiments.manifest import Manifest, assign_arm
from genshop.experiments.results import RESULT_COLUMNS
from reward.simulator import ATTRIBUTES, choice_probabilities, item_utilities, load_simulator_spec, sample_choices


class AbSimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    groups: Path = Field(description="groups YAML with a simulator section")
    customers: int = Field(default=20_000, ge=1)
    seed: int = 0
    cart_rate: float = Field(default=0.4, ge=0, le=1, description="P(add to cart | click)")
    purchase_rate: float = Field(default=0.5, ge=0, le=1, description="P(purchase | add to cart)")


def simulate_ab(manifest: Manifest, config: AbSimulationConfig) -> pd.DataFrame:
    spec = load_simulator_spec(config.groups)
    group_ids = list(spec.groups)
    shares = np.array([taste.share for taste in spec.groups.values()])
    no_choice = np.array([taste.no_choice for taste in spec.groups.values()])
    listing_ids = list(manifest.items)
    items = list(manifest.items.values())
    attributes = pd.DataFrame([{name: item.attributes.get(name, "") for name in ATTRIBUTES} for item in items])
    utilities = item_utilities(spec, attributes)
    asked = np.array([bool(item.brief_colour) and item.attributes.get("colour", "").lower() == item.brief_colour.lower()
                      for item in items])
    utilities = utilities + spec.brief_colour_bonus * asked
    shown_by: dict[tuple[str, str], list[int]] = {}
    for index, item in enumerate(items):
        shown_by.setdefault((item.brief, item.arm), []).append(index)
    briefs = sorted({item.brief for item in items})

    rng = np.random.default_rng(config.seed)
    counts = np.zeros((len(group_ids), len(items), 4), dtype=np.int64)  # impressions, clicks, carts, purchases
    customer_groups = rng.choice(len(group_ids), size=config.customers, p=shares / shares.sum())
    customer_briefs = rng.integers(len(briefs), size=config.customers)
    for customer in range(config.customers):
        g = customer_groups[customer]
        arm = assign_arm(f"sim-customer-{config.seed}-{customer}", manifest.salt, manifest.arms)
        shown = shown_by.get((briefs[customer_briefs[customer]], arm))
        if not shown:
            continue
        counts[g, shown, 0] += 1
        probabilities = choice_probabilities(utilities[g, shown], np.array(no_choice[g]), spec.temperature)
        choice = sample_choices(probabilities[None, :], rng)[0]
        if choice < 0:
            continue
        clicked = shown[choice]
        counts[g, clicked, 1] += 1
        if rng.random() < config.cart_rate:
            counts[g, clicked, 2] += 1
            if rng.random() < config.purchase_rate:
                counts[g, clicked, 3] += 1
    rows = [{"experiment_id": manifest.experiment_id, "listing_id": listing_ids[i], "arm": items[i].arm,
             "group_id": group_ids[g], "impressions": int(c[0]), "clicks": int(c[1]), "add_to_carts": int(c[2]),
             "purchases": int(c[3])}
            for g in range(len(group_ids)) for i, c in enumerate(counts[g]) if c[0] > 0]
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
