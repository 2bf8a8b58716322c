"""``genshop report ab``: CTR and CVR per arm and per group, uplift against control, SRM check.

- CTR = clicks / impressions; CVR = purchases / clicks (post-click conversion).
- Relative uplift of an arm over control, ``p_arm / p_control - 1``, with a 95% confidence
  interval from the delta method on the log of the ratio (``var log p = (1 - p) / successes``)
  and the two-sided p-value of the pooled two-proportion z-test.
- Sample-ratio mismatch: a chi-square test of page views per arm (a customer assigned to an
  arm sees all of its listings for the brief they browse, so views per brief and arm are the
  mean impressions of those listings) against the arms' weights; flagged below p = 0.001.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats

from genshop.experiments.manifest import Manifest
from genshop.store import AbResult

SRM_ALPHA = 0.001
Z_95 = 1.959963984540054


class Uplift(BaseModel):
    relative: float = Field(description="p_arm / p_control - 1")
    ci_low: float
    ci_high: float
    p_value: float


class ArmReadout(BaseModel):
    arm: str
    group: str | None = Field(description="None: all groups together")
    impressions: int
    clicks: int
    add_to_carts: int
    purchases: int
    ctr: float | None
    cvr: float | None
    ctr_uplift: Uplift | None = None
    cvr_uplift: Uplift | None = None


class SampleRatioCheck(BaseModel):
    observed: dict[str, float] = Field(description="page views per arm")
    expected_share: dict[str, float]
    chi2: float
    p_value: float
    mismatch: bool


class AbReport(BaseModel):
    experiment_id: str
    control: str
    arms: list[ArmReadout]
    groups: list[ArmReadout]
    srm: SampleRatioCheck
    plot: str | None = None


def _rate(successes: int, trials: int) -> float | None:
    return successes / trials if trials else None


def relative_uplift(x_arm: int, n_arm: int, x_control: int, n_control: int) -> Uplift | None:
    """None when either rate is undefined or zero (no ratio to speak of)."""
    if not (n_arm and n_control and x_arm and x_control):
        return None
    p_arm, p_control = x_arm / n_arm, x_control / n_control
    log_ratio = math.log(p_arm / p_control)
    se = math.sqrt((1 - p_arm) / x_arm + (1 - p_control) / x_control)
    pooled = (x_arm + x_control) / (n_arm + n_control)
    se_difference = math.sqrt(pooled * (1 - pooled) * (1 / n_arm + 1 / n_control))
    z = (p_arm - p_control) / se_difference if se_difference > 0 else 0.0
    return Uplift(relative=p_arm / p_control - 1, ci_low=math.exp(log_ratio - Z_95 * se) - 1,
                  ci_high=math.exp(log_ratio + Z_95 * se) - 1, p_value=float(2 * stats.norm.sf(abs(z))))


def _readouts(results: list[AbResult], arms: list[str], control: str, group: str | None) -> list[ArmReadout]:
    totals = {arm: dict.fromkeys(("impressions", "clicks", "add_to_carts", "purchases"), 0) for arm in arms}
    for result in results:
        if group is None or result.group_id == group:
            for name in totals[result.arm]:
                totals[result.arm][name] += getattr(result, name)
    base = totals[control]
    readouts = []
    for arm in arms:
        t = totals[arm]
        readout = ArmReadout(arm=arm, group=group, **t, ctr=_rate(t["clicks"], t["impressions"]),
                             cvr=_rate(t["purchases"], t["clicks"]))
        if arm != control:
            readout.ctr_uplift = relative_uplift(t["clicks"], t["impressions"], base["clicks"], base["impressions"])
            readout.cvr_uplift = relative_uplift(t["purchases"], t["clicks"], base["purchases"], base["clicks"])
        readouts.append(readout)
    return readouts


def sample_ratio_check(manifest: Manifest, results: list[AbResult]) -> SampleRatioCheck:
    """Chi-square of page views per arm against the arms' weights.

    The unit of randomization is the customer, not the impression: one page view shows all
    of an arm's listings for a brief at once, so impressions come in clusters and a test on
    them would flag mismatches that are not there. Page views per (brief, arm) are the mean
    impressions of its listings; an arm's expected share is its weight times the number of
    briefs it has listings for.
    """
    listings: Counter[tuple[str, str]] = Counter((item.brief, item.arm) for item in manifest.items.values())
    impressions: Counter[tuple[str, str]] = Counter()
    for result in results:
        impressions[manifest.items[result.listing_id].brief, result.arm] += result.impressions
    observed = {arm.name: 0.0 for arm in manifest.arms}
    for (brief, arm), count in impressions.items():
        observed[arm] += count / listings[brief, arm]
    briefs_per_arm = Counter(arm for _, arm in listings)
    design = np.array([arm.weight * briefs_per_arm[arm.name] for arm in manifest.arms], dtype=float)
    share = design / design.sum()
    counts = np.array(list(observed.values()))
    chi2, p_value = (stats.chisquare(counts, share * counts.sum()) if counts.sum() else (0.0, 1.0))
    return SampleRatioCheck(observed={arm: round(views, 2) for arm, views in observed.items()},
                            expected_share=dict(zip(observed, share.round(6).tolist())),
                            chi2=float(chi2), p_value=float(p_value), mismatch=bool(p_value < SRM_ALPHA))


def plot_report(report: AbReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    arms = [r.arm for r in report.arms]
    ctr = [100 * (r.ctr or 0) for r in report.arms]
    errors = [[0, 0] for _ in report.arms]
    for i, r in enumerate(report.arms):  # Wilson 95% interval of each arm's CTR
        if r.impressions:
            centre, half = _wilson(r.clicks, r.impressions)
            errors[i] = [100 * (r.ctr - (centre - half)), 100 * (centre + half - r.ctr)]
    axes[0].bar(arms, ctr, yerr=np.array(errors).T, capsize=6, color=["#888"] + ["#3b7dd8"] * (len(arms) - 1))
    axes[0].set(title=f"{report.experiment_id}: CTR by arm (95% CI)", ylabel="CTR %")
    groups = sorted({r.group for r in report.groups})
    width = 0.8 / max(1, len(arms))
    for a, arm in enumerate(arms):
        values = [100 * (next((r.ctr for r in report.groups if r.group == g and r.arm == arm), 0) or 0) for g in groups]
        axes[1].bar(np.arange(len(groups)) + a * width, values, width, label=arm)
    axes[1].set_xticks(np.arange(len(groups)) + width * (len(arms) - 1) / 2, groups)
    axes[1].set(title="CTR by customer group and arm", ylabel="CTR %")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _wilson(successes: int, trials: int) -> tuple[float, float]:
    p = successes / trials
    denominator = 1 + Z_95**2 / trials
    centre = (p + Z_95**2 / (2 * trials)) / denominator
    half = Z_95 * math.sqrt(p * (1 - p) / trials + Z_95**2 / (4 * trials**2)) / denominator
    return centre, half


def ab_report(manifest: Manifest, results: list[AbResult], plot_path: Path | None = None) -> AbReport:
    arms = [arm.name for arm in manifest.arms]
    groups = sorted({result.group_id for result in results})
    report = AbReport(experiment_id=manifest.experiment_id, control=manifest.control,
                      arms=_readouts(results, arms, manifest.control, None),
                      groups=[r for group in groups for r in _readouts(results, arms, manifest.control, group)],
                      srm=sample_ratio_check(manifest, results))
    if plot_path is not None:
        report.plot = str(plot_report(report, plot_path))
    return report
