"""How far a reward that knew each group's taste exactly could get, seeing through the product's eyes.

``genshop tune eval`` brackets tuning between best-of-N by the training reward and best-of-N
by the held-out judgement (the oracle). Between the two lies a third ceiling: the simulator's
hidden group utility (``configs/groups.yaml``) applied to what the *product* reads in an
image (the enrich stage's zero-shot classifier, or the understanding's top-tuned heads)
instead of to what the evaluation judge reads: to the labels each reads, or in expectation
over its posteriors (article type x colour, the interactions included; "expected"). No reward trained on clicks can know a group's
taste better than the simulator that made the clicks, so best-of-N by this "perception"
selector bounds what any reward built on the product's readers could pick, and so what
tuning toward such a reward could reach. (The product's own such reward, fitted on clicks, is
``genshop reward fit-attributes``; ``genshop tune eval --reward`` gives best-of-N by it.)

For each held-out brief, ``--base`` base images (the base arm) and a pool of ``--pool`` more
(other seeds), made as generation makes them; every figure is the held-out win rate of the
best-of-N pick against the base arm, in exact expectation over the pool's N-subsets
(``genshop.tuning.evaluation.best_of_n_weights``), per group and selector.

    python bench/perception_ceiling.py [--briefs 24] [--pool 16] [--steps 12] [--threads 2]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: the repository root on sys.path

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--briefs", type=int, default=24, help="the first this many held-out briefs")
    parser.add_argument("--base", type=int, default=4, help="base-arm images per brief")
    parser.add_argument("--pool", type=int, default=16, help="pool images per brief")
    parser.add_argument("--best-of", default="4,8,16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reads", type=Path, default=None, help="save every image's readings here (parquet)")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import torch
    from rich.progress import track

    from genshop.enrichment import HIERARCHY, enrich_config_from_settings, load_enricher, understand_images
    from genshop.evaluation.judge import JudgeModel
    from genshop.generation import build_prompt, generate_batch
    from genshop.pipelines import load_pipeline
    from genshop.settings import BUNDLE_DIR, get_settings
    from genshop.tuning.evaluation import _judged_frame, best_of_n_weights, win_rate
    from genshop.tuning.tune import load_tune_briefs
    from genshop.understanding.categorize import leaf_log_posterior
    from genshop.understanding.taxonomy import load_taxonomy
    from reward.attribute_reward import expected_utilities
    from reward.scoring import load_scorer, score_images
    from reward.simulator import item_utilities, load_simulator_spec

    torch.set_num_threads(args.threads)
    loaded = load_pipeline(args.preset, adapters=False)
    briefs = load_tune_briefs(REPO / "configs" / "tuning" / "briefs-heldout.yaml", loaded.preset, 0, steps=args.steps)
    briefs = briefs[: args.briefs]
    settings = get_settings()
    config = enrich_config_from_settings(settings)
    readers = {name: load_enricher(config.model_copy(update={"classifier": name})) for name in ("zero-shot", "top-tuned")}
    judge = JudgeModel.from_pretrained(BUNDLE_DIR / "judge")
    model, embedder = load_scorer(BUNDLE_DIR / "reward")
    spec = load_simulator_spec(REPO / "configs" / "groups.yaml")
    groups = list(spec.groups)
    taxonomy = load_taxonomy(REPO / "configs" / "understanding" / "taxonomy.yaml")
    parents = {a.name: (a.master_category, a.sub_category) for a in taxonomy.article_types}
    leaves = taxonomy.labels("article_type")
    true_utilities = lambda items: item_utilities(spec, items)  # noqa: E731

    def perceived(found, brief):
        """The judge frame's columns, as a product reader reads them."""
        frame = pd.DataFrame({"article_type": [f.article_type.label for f in found],
                              "colour": [(f.attributes.get("colour").label if f.attributes.get("colour") else "")
                                         for f in found]})
        frame["master_category"] = [parents.get(a, ("", ""))[0] for a in frame["article_type"]]
        frame["sub_category"] = [parents.get(a, ("", ""))[1] for a in frame["article_type"]]
        frame["usage"], frame["gender"] = brief.usage or "", brief.gender or ""
        return frame

    def expected(reader, embeddings, brief, utilities):
        """``[groups, n]``: each group's ``utilities`` in expectation over the reader's posteriors (article type x colour)."""
        log_posteriors = reader.classifier.log_posteriors(embeddings)
        p_leaf = np.exp(leaf_log_posterior(log_posteriors, taxonomy, reader.classifier.temperatures.get(HIERARCHY, 1.0)))
        return expected_utilities(utilities, p_leaf, np.exp(log_posteriors["colour"]), leaves, parents,
                                  reader.classifier.labels["colour"], brief.usage or "", brief.gender or "")

    rows = []
    seeds = list(range(args.base)) + [1_000_003 * (c + 1) for c in range(args.pool)]
    for b, brief in enumerate(track(briefs, description="base arm and pool, read four ways")):
        images = [made.image for made in generate_batch(loaded, brief, seeds)]
        frames = {"oracle": _judged_frame(judge, images, brief, parents)}
        expectations = {}
        for name, reader in readers.items():
            embeddings, found = understand_images(reader, images)
            frames[name] = perceived(found, brief)
            expectations[f"{name} expected"] = expected(reader, embeddings, brief, true_utilities)
        utilities = {**{name: item_utilities(spec, frame) for name, frame in frames.items()}, **expectations}
        scores = score_images(model, embedder, images, build_prompt(brief), groups)
        for i in range(len(images)):
            row = {"brief": b, "image": i, "arm": "base" if i < args.base else "pool"}
            for g, group in enumerate(groups):
                row[f"{group}:reward"] = scores[group].rewards[i]
                for name, u in utilities.items():
                    row[f"{group}:{name}"] = float(u[g, i])
            rows.append(row)
    frame = pd.DataFrame(rows)
    if args.reads:
        frame.to_parquet(args.reads)

    selectors = ["reward", "zero-shot", "zero-shot expected", "top-tuned",
                 "top-tuned expected", "oracle"]
    sizes = [int(n) for n in args.best_of.split(",") if n]
    print(f"{len(briefs)} held-out briefs x ({args.base} base + {args.pool} pool) images, {args.steps} steps; "
          "held-out win rate of the best-of-N pick against the base arm")
    print("| group | selector | " + " | ".join(f"N={n}" for n in sizes) + " |\n|---|---|" + "---|" * len(sizes))
    for group in groups:
        for selector in selectors:
            figures = []
            for n in sizes:
                wins = []
                for _, images in frame.groupby("brief"):
                    base = images[images["arm"] == "base"][f"{group}:oracle"].to_numpy()
                    pool = images[images["arm"] == "pool"]
                    weights = best_of_n_weights(pool[f"{group}:{selector}"].to_numpy(), n)
                    judged = pool[f"{group}:oracle"].to_numpy()
                    wins.append(weights @ np.array([win_rate(np.full(len(base), x), base) for x in judged]))
                figures.append(float(np.mean(wins)))
            print(f"| {group} | {selector} | " + " | ".join(f"{x:.3f}" for x in figures) + " |")


if __name__ == "__main__":
    main()
