"""The personalization A/B readout: per customer group, arms control=catalog, base, best-of-8
(by the reward, or by `--best-of-reward`) and tuned (the group's LoRA, where it has one), through the product's own path: briefs generated
by the in-process worker (generate, enrich, score), then `genshop export ab`, `simulate ab`,
`import ab-results` and `report ab`. Prints each group's CTR and CTR uplift against the catalog
control and against the base model, with 95% intervals.

One experiment per group G: the held-out briefs made three ways (base: no target group, so the
base model; best-of-8: `best_of: 8, groups: [G]` from the base model, kept by G's reward;
tuned: `groups: [G]` with G's LoRA), plus the catalog's real products for the same titles.
Simulated customers of every group browse it; the row that counts is group G's. Resumable:
briefs carry client references, so a rerun reuses what was made.

    python bench/ab_personalization.py --out runs/ab --adapters genshop/assets/genshop-mini/adapters \
        [--phase candidates]   # base and best-of-8 only (no adapters needed): start them early
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _path  # noqa: F401  (the repository root on sys.path)
import yaml

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "genshop.cli", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"genshop {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, default=REPO / "genshop" / "assets" / "genshop-mini" / "adapters")
    parser.add_argument("--briefs", type=Path, default=REPO / "configs" / "tuning" / "briefs-heldout.yaml")
    parser.add_argument("--catalog", type=Path, default=Path("../shared/data/fashion-products/catalog-val.parquet"),
                        help="the real products of the control arm (the val split)")
    parser.add_argument("--groups", default="A,B,C,D")
    parser.add_argument("--per-type", type=int, default=1, help="held-out briefs per article type")
    parser.add_argument("--limit", type=int, default=None, help="at most this many held-out briefs")
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--best-of", type=int, default=8)
    parser.add_argument("--best-of-reward", type=Path, default=None,
                        help="the reward that keeps the best-of-N candidates (GENSHOP_BEST_OF_REWARD: a CLIP reward "
                             "model or an attribute reward folder; default: the bundle's reward model)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--customers", type=int, default=40_000)
    parser.add_argument("--phase", choices=["candidates", "all"], default="all")
    args = parser.parse_args()

    home = (args.out / "home").resolve()
    os.environ.update(GENSHOP_HOME=str(home), GENSHOP_ADAPTERS=str(args.adapters.resolve()), GENSHOP_PRESET="mini")
    if args.best_of_reward:
        os.environ["GENSHOP_BEST_OF_REWARD"] = str(args.best_of_reward.resolve())
    kept_by = args.best_of_reward.name if args.best_of_reward else "reward"  # best-of briefs of another reward differ
    env = dict(os.environ)
    groups = args.groups.split(",")
    entries, per_type = [], {}
    for entry in yaml.safe_load(args.briefs.read_text()):
        per_type[entry["article_type"]] = per_type.get(entry["article_type"], 0) + 1
        if per_type[entry["article_type"]] <= args.per_type:
            entries.append(entry)
    entries = entries[: args.limit]

    from genshop.briefs import parse_brief
    from genshop.local_worker import LocalModels, load_local_models, run_locally
    from genshop.pipelines import load_pipeline
    from genshop.service import submit_brief
    from genshop.store import open_store
    from rich.progress import Progress

    store = open_store()
    if not store.list_catalog_products():
        cli(["catalog", "import", str(args.catalog), "--no-enrich", "--json"], env)
    local = load_local_models("mini")  # with the group LoRAs of --adapters
    tuned_models = local if args.phase == "all" else None
    base_models = LocalModels(pipeline=load_pipeline("mini", adapters=False), scorer=local.scorer,
                              enricher=local.enricher)
    tuned_groups = [g for g in groups if tuned_models is not None and g in tuned_models.pipeline.adapters]
    if tuned_models is not None and tuned_groups != groups:
        print(f"no adapter under {args.adapters} for group(s) {', '.join(g for g in groups if g not in tuned_groups)}: "
              "no tuned arm (they get the base model)")
    arms = {"base": (base_models, {"groups": []}),
            **{f"best{args.best_of}-{g}": (base_models, {"groups": [g], "best_of": args.best_of}) for g in groups},
            **{f"tuned-{g}": (tuned_models, {"groups": [g]}) for g in tuned_groups}}
    made: dict[str, list[str]] = {}
    with Progress() as bar:
        task = bar.add_task("briefs", total=len(arms) * len(entries))
        for arm, (models, fields) in arms.items():
            for number, entry in enumerate(entries):
                brief = parse_brief({**entry, **fields, "variants": args.variants, "steps": args.steps,
                                     "seed": 1000 + 10 * number, "client_reference":
                                     f"ab16/{arm}{'/' + kept_by if 'best_of' in fields else ''}/{number}"})
                record, created = submit_brief(store, brief, "mini")
                if created or record.status != "succeeded":
                    record = run_locally(store, record.id, models)
                made.setdefault(arm, []).append(record.id)
                bar.advance(task)
    if args.phase == "candidates":
        print(f"base and best-of-{args.best_of} briefs made under {home}; rerun with --phase all for the readout")
        return

    base_id = base_models.pipeline.model_id
    rows = []
    for g in groups:
        experiment = f"ab16-{g}"
        tuned = g in tuned_groups
        brief_ids = made["base"] + made[f"best{args.best_of}-{g}"] + (made[f"tuned-{g}"] if tuned else [])
        export = args.out / experiment
        cli(["export", "ab", "--briefs", ",".join(brief_ids), "--out", str(export), "--salt", "ab16", "--force",
             "--arms", f"control=catalog,base=model:{base_id},best{args.best_of}=best-of:{args.best_of}"
                       + (f",tuned=model:{base_id}+lora:{g}" if tuned else ""), "--json"], env)
        results = args.out / f"{experiment}-results.parquet"
        cli(["simulate", "ab", experiment, "--customers", str(args.customers), "--out", str(results)], env)
        cli(["import", "ab-results", str(results), "--replace", "--json"], env)
        report = json.loads(cli(["report", "ab", experiment, "--json"], env))
        readouts = {(r["arm"], r["group"]): r for r in report["groups"]}
        arms_of_g = ("control", "base", f"best{args.best_of}", *(["tuned"] if tuned else []))
        for arm in arms_of_g:
            rows.append((g, arm, readouts[arm, g]))
        base = readouts["base", g]
        for arm in arms_of_g[2:]:  # against the base model: the same listings' counts
            other = readouts[arm, g]
            rows.append((g, f"{arm} vs base", {"ctr_uplift": relative_vs(other, base), "impressions": other["impressions"],
                                                "ctr": other["ctr"]}))
    print(f"\n{len(entries)} held-out briefs x {args.variants} variants per arm, {args.steps} steps, "
          f"{args.customers} simulated customers per experiment (one experiment per group); best-of-{args.best_of} "
          f"kept by {args.best_of_reward or 'the bundle reward model'}\n")
    print("| group | arm | impressions | CTR | CTR uplift [95% CI] |")
    print("|---|---|---|---|---|")
    for g, arm, r in rows:
        u = r.get("ctr_uplift")
        shown = "-" if u is None else (f"{100 * u['relative']:+.1f}% [{100 * u['ci_low']:+.1f}, "
                                       f"{100 * u['ci_high']:+.1f}] p={u['p_value']:.2g}")
        print(f"| {g} | {arm} | {r['impressions']} | {100 * r['ctr']:.2f}% | {shown} |")


def relative_vs(arm: dict, base: dict) -> dict | None:
    from genshop.experiments.readout import relative_uplift

    uplift = relative_uplift(arm["clicks"], arm["impressions"], base["clicks"], base["impressions"])
    return None if uplift is None else uplift.model_dump()


if __name__ == "__main__":
    main()
