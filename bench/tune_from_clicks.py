"""Group LoRAs learned from clicks: the closed loop of the product, run offline end to end.

1. The training briefs (``configs/tuning/briefs-train.yaml``) are made by the in-process worker
   from the base model, ``--variants`` candidates each (generate, enrich, score);
2. ``genshop export ab`` lists them beside the catalog's real products of the same titles (control,
   a quarter of the customers), ``genshop simulate ab`` shows them to simulated
   customers of every group (the stand-in for the shop: clicks on the attributes the enrich stage
   reads, never the evaluation judge), ``genshop import ab-results`` turns the clicks into
   preference data (``$GENSHOP_HOME/preferences/ab-<experiment>.parquet``);
   Then the signals are checked against the held-out judgement on the generated candidates
   (``signal_agreement``): how often the enrich stage and the evaluation judge read the same
   colour and article type, and per group the Spearman correlation of the judged utility with
   the CTR and with the reward, and the judged-utility gap between each signal's top 4 and bottom 4
   of a brief: what either signal can teach;
3. per group, ``genshop tune --preferences`` trains a LoRA on it (the images of a brief ranked by
   their click-through rate: ``tune.preference_rankings``), and ``genshop tune eval`` judges it on the
   held-out briefs.

Resumable: briefs carry client references, tuning runs resume from their checkpoints, and a
group's eval is skipped when its JSON exists.

    python bench/tune_from_clicks.py --out runs/clicks [--groups A,B,C,D] [--phase clicks|tune|all]
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
BUNDLE = REPO / "genshop" / "assets" / "genshop-mini"


def cli(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "genshop.cli", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"genshop {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_clicks(args, env: dict[str, str]) -> Path:
    """Steps 1 and 2: the preference file of the experiment."""
    from rich.progress import Progress

    from genshop.briefs import parse_brief
    from genshop.local_worker import LocalModels, load_local_models, run_locally
    from genshop.pipelines import load_pipeline
    from genshop.service import submit_brief
    from genshop.store import open_store

    preferences = Path(env["GENSHOP_HOME"]) / "preferences" / f"ab-{args.experiment}.parquet"
    if preferences.is_file():
        return preferences
    store = open_store()
    local = load_local_models("mini")
    models = LocalModels(pipeline=load_pipeline("mini", adapters=False), scorer=local.scorer, enricher=local.enricher)
    made = []
    entries = yaml.safe_load(args.briefs.read_text())
    with Progress() as bar:
        task = bar.add_task("candidates", total=len(entries))
        for number, entry in enumerate(entries):
            brief = parse_brief({**entry, "groups": list(args.groups), "variants": args.variants,
                                 "steps": args.steps, "seed": 10 * number,
                                 "client_reference": f"clicks/{number}"})
            record, created = submit_brief(store, brief, "mini")
            if created or record.status != "succeeded":
                record = run_locally(store, record.id, models)
            made.append(record.id)
            bar.advance(task)
    if not store.list_catalog_products():  # the control arm: real products of the train split
        cli(["catalog", "import", str(args.catalog), "--no-enrich", "--json"], env)
    export = args.out / args.experiment
    cli(["export", "ab", "--briefs", ",".join(made), "--out", str(export), "--salt", args.experiment, "--force",
         "--arms", f"control=catalog,base=model:{models.pipeline.model_id}", "--weights", "1,3", "--json"], env)
    results = args.out / f"{args.experiment}-results.parquet"
    cli(["simulate", "ab", args.experiment, "--customers", str(args.customers), "--out", str(results)], env)
    cli(["import", "ab-results", str(results), "--replace", "--json"], env)
    return preferences


def signal_agreement(args, groups: list[str]) -> None:
    """Step 2's check: the clicks and the reward against the held-out judgement, per group."""
    import json as _json

    import numpy as np
    import pandas as pd
    from PIL import Image
    from scipy.stats import spearmanr

    from genshop.evaluation.judge import JudgeModel, judge_images, to_pixels
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.simulator import ATTRIBUTES, item_utilities, load_simulator_spec

    export = args.out / args.experiment
    listings = pd.read_parquet(export / "listings.parquet")
    generated = listings[listings["kind"] == "generated"].reset_index(drop=True)
    results = pd.read_parquet(args.out / f"{args.experiment}-results.parquet")
    sums = results.groupby(["listing_id", "group_id"])[["clicks", "impressions"]].sum()
    ctr = (sums["clicks"] / sums["impressions"]).unstack()
    judge = JudgeModel.from_pretrained(BUNDLE / "judge")
    images = [Image.open(export / path).convert("RGB") for path in generated["image"]]
    judged, _ = judge_images(judge, to_pixels(images, judge.config.width, judge.config.height))
    enriched = pd.DataFrame([_json.loads(a) for a in generated["attributes"]])
    parents = {a.name: a.sub_category for a in load_taxonomy(REPO / "configs/understanding/taxonomy.yaml").article_types}
    frame = pd.DataFrame({name: judged[name] for name in ("master_category", "article_type", "colour")})
    frame["sub_category"] = [parents.get(a, "") for a in frame["article_type"]]
    frame["usage"], frame["gender"] = enriched.get("usage", ""), enriched.get("gender", "")
    for column in ATTRIBUTES:
        frame[column] = frame.get(column, "")
    spec = load_simulator_spec(REPO / "configs" / "groups.yaml")
    utilities = item_utilities(spec, frame)
    print(f"{len(generated)} candidates: the enrich stage and the judge read the same colour for "
          f"{(enriched['colour'].str.lower() == frame['colour'].str.lower()).mean():.2f}, the same article type for "
          f"{(enriched['article_type'] == frame['article_type']).mean():.2f}")
    print("| group | Spearman(judged utility, CTR) | Spearman(judged utility, reward) | top-4 minus bottom-4 "
          "judged utility, by CTR | by reward |\n|---|---|---|---|---|")
    for g in groups:
        row = list(spec.groups).index(g)
        rho_ctr, rho_reward, gap_ctr, gap_reward = [], [], [], []
        for _, index in generated.groupby("brief_id").groups.items():
            index = list(index)
            u, clicks = utilities[row, index], ctr.loc[generated["listing_id"][index], g].to_numpy()
            reward = generated[f"score_{g}"][index].to_numpy()
            for signal, rho, gap in ((clicks, rho_ctr, gap_ctr), (reward, rho_reward, gap_reward)):
                if np.ptp(u) > 0 and np.ptp(signal) > 0:
                    rho.append(spearmanr(u, signal).correlation)
                order = np.argsort(-signal)
                gap.append(u[order[:4]].mean() - u[order[-4:]].mean())
        print(f"| {g} | {np.mean(rho_ctr):.3f} | {np.mean(rho_reward):.3f} | {np.mean(gap_ctr):.3f} | "
              f"{np.mean(gap_reward):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--briefs", type=Path, default=REPO / "configs" / "tuning" / "briefs-train.yaml")
    parser.add_argument("--heldout", type=Path, default=REPO / "configs" / "tuning" / "briefs-heldout.yaml")
    parser.add_argument("--catalog", type=Path, default=Path("../shared/data/fashion-products/catalog-train.parquet"),
                        help="the real products of the control arm (the train split)")
    parser.add_argument("--groups", default="A,B,C,D")
    parser.add_argument("--variants", type=int, default=16, help="candidates per training brief")
    parser.add_argument("--steps", type=int, default=12, help="inference steps")
    parser.add_argument("--customers", type=int, default=400_000)
    parser.add_argument("--experiment", default="clicks")
    parser.add_argument("--tune-args", default="--steps 70 --batch-size 4 --lr 3e-3 --rank 4 --beta 20000",
                        help="further `genshop tune` options")
    parser.add_argument("--eval-variants", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--phase", choices=["clicks", "tune", "all"], default="all")
    args = parser.parse_args()
    args.groups = args.groups.split(",")

    home = (args.out / "home").resolve()
    os.environ.update(GENSHOP_HOME=str(home), GENSHOP_PRESET="mini")
    env = dict(os.environ)
    preferences = make_clicks(args, env)
    print(f"preferences: {preferences}")
    signal_agreement(args, args.groups)
    if args.phase == "clicks":
        return
    reward = str(BUNDLE / "reward")
    for group in args.groups:
        run = args.out / f"tune-{group}"
        if not (run / "adapter" / "pytorch_lora_weights.safetensors").is_file():
            cli(["tune", "--group", group, "--briefs", str(args.briefs), "--reward", reward, "--out", str(run),
                 "--preset", "mini", "--preferences", str(preferences), "--inference-steps", str(args.steps),
                 "--threads", str(args.threads), *args.tune_args.split()], env)
        report = run / "eval.json"
        if not report.is_file():
            cli(["tune", "eval", "--group", group, "--adapter", str(run / "adapter"), "--briefs", str(args.heldout),
                 "--reward", reward, "--preset", "mini", "--inference-steps", str(args.steps),
                 "--variants", str(args.eval_variants), "--best-of", "", "--threads", str(args.threads),
                 "--json", str(report)], env)
        result = json.loads(report.read_text())
        print(f"{group}: held-out win {result['heldout_win_rate']:.3f}, reward win {result['reward_win_rate']:.3f}, "
              f"fidelity drop {result['fidelity_drop_points']:.1f}, diversity {result['diversity_ratio']:.2f}x")


if __name__ == "__main__":
    main()
