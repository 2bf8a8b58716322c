"""Shares of attribute values among a group's items against the catalog's, and disparities between groups.

- A share's 95% interval is Wilson's score interval (``scipy.stats.binomtest(...).proportion_ci``).
- A value is ``favoured`` when its whole interval lies above the catalog's share, ``disfavoured``
  when below, else ``as catalog``.
- A disparity is one value's share in one group minus another's; its interval is Newcombe's
  hybrid score interval (method 10 of Newcombe 1998), built from the two Wilson intervals. It
  is flagged when it is at least ``threshold`` and the interval excludes 0. The groups' items
  may overlap (the reward audit ranks the same catalog for every group), which makes the
  interval conservative, never too narrow.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations

from pydantic import BaseModel, Field
from scipy.stats import binomtest

CONFIDENCE = 0.95


class ValueShare(BaseModel):
    value: str
    count: int = Field(description="the group's items with this value")
    share: float
    low: float = Field(description="95% Wilson interval")
    high: float
    catalog_share: float
    lift: float | None = Field(description="share / catalog share (None where the catalog has none)")
    verdict: str = Field(description="favoured | disfavoured | as catalog")


class Disparity(BaseModel):
    attribute: str
    value: str
    group: str
    other_group: str
    share: float
    other_share: float
    difference: float = Field(description="share - other_share")
    low: float = Field(description="95% Newcombe interval of the difference")
    high: float


def wilson_interval(count: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    if total == 0:
        return 0.0, 1.0
    interval = binomtest(count, total).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def newcombe_interval(a: ValueShare, b: ValueShare) -> tuple[float, float]:
    """The interval of ``a.share - b.share`` from the two shares' Wilson intervals."""
    difference = a.share - b.share
    return (difference - math.hypot(a.share - a.low, b.high - b.share),
            difference + math.hypot(a.high - a.share, b.share - b.low))


def value_shares(values: Sequence[str], catalog_shares: Mapping[str, float],
                 confidence: float = CONFIDENCE) -> list[ValueShare]:
    """Every value of the items or of the catalog: its share among ``values`` with its interval, against the
    catalog's; largest share first (then the catalog's)."""
    counts, total = Counter(values), len(values)
    shares = []
    for value in sorted(set(counts) | {v for v, s in catalog_shares.items() if s > 0}):
        count = counts.get(value, 0)
        low, high = wilson_interval(count, total, confidence)
        reference = float(catalog_shares.get(value, 0.0))
        verdict = "favoured" if low > reference else "disfavoured" if high < reference else "as catalog"
        shares.append(ValueShare(value=value, count=count, share=count / total if total else 0.0, low=low, high=high,
                                 catalog_share=reference, lift=count / total / reference if total and reference else None,
                                 verdict=verdict))
    return sorted(shares, key=lambda s: (-s.share, -s.catalog_share, s.value))


def disparities(by_group: Mapping[str, Mapping[str, Sequence[ValueShare]]], threshold: float) -> list[Disparity]:
    """Each pair of groups and each value: the difference of their shares, where it is at least ``threshold``
    and its interval excludes 0; largest first."""
    flagged = []
    for g, h in combinations(sorted(by_group), 2):
        for attribute, shares in by_group[g].items():
            others = {s.value: s for s in by_group[h].get(attribute, [])}
            for share in shares:
                other = others.get(share.value)
                if other is None:
                    continue
                low, high = newcombe_interval(share, other)
                difference = share.share - other.share
                if abs(difference) >= threshold and (low > 0 or high < 0):
                    first, second, sign = (g, h, 1) if difference > 0 else (h, g, -1)
                    flagged.append(Disparity(
                        attribute=attribute, value=share.value, group=first, other_group=second,
                        share=share.share if sign > 0 else other.share,
                        other_share=other.share if sign > 0 else share.share, difference=abs(difference),
                        low=low if sign > 0 else -high, high=high if sign > 0 else -low))
    return sorted(flagged, key=lambda d: (-d.difference, d.attribute, d.value, d.group))
