"""The on-brief guard's readers against the evaluation judge, on the base model's own images.

``genshop tune --on-brief`` ranks the candidates a reader takes for the brief's article type
above the others. Which reader it uses matters: what it protects is what the judge of
``genshop tune eval`` checks only as far as the two agree. For the training briefs
(``configs/tuning/briefs-train.yaml``), ``--variants`` base images each (made as generation makes
them: each variant's own seed, the tuning's steps), read by the enrich stage's zero-shot classifier and by the understanding folder's
top-tuned heads (``--on-brief-reader``), and by the judge: each reader's agreement with the
judge (article type, colour), and the share of the images it reads as on brief (off brief)
that the judge finds on brief.

    python bench/guard_readers.py [--briefs 36] [--variants 4] [--steps 12] [--threads 2]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: the repository root on sys.path

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--briefs", type=int, default=36, help="the first this many training briefs")
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd
    import torch
    from rich.progress import track

    from genshop.enrichment import enrich_config_from_settings, load_enricher, understand_images
    from genshop.evaluation.judge import JudgeModel, judge_images, to_pixels
    from genshop.generation import generate_batch
    from genshop.pipelines import load_pipeline
    from genshop.settings import BUNDLE_DIR, get_settings
    from genshop.tuning.tune import load_tune_briefs

    torch.set_num_threads(args.threads)
    loaded = load_pipeline(args.preset, adapters=False)
    briefs = load_tune_briefs(REPO / "configs" / "tuning" / "briefs-train.yaml", loaded.preset, 0, steps=args.steps)
    config = enrich_config_from_settings(get_settings())
    readers = {name: load_enricher(config.model_copy(update={"classifier": name})) for name in ("zero-shot", "top-tuned")}
    judge = JudgeModel.from_pretrained(BUNDLE_DIR / "judge")
    rows = []
    for brief in track(briefs[: args.briefs], description="base images, read three ways"):
        images = [made.image for made in generate_batch(loaded, brief, list(range(args.variants)))]
        judged, _ = judge_images(judge, to_pixels(images, judge.config.width, judge.config.height))
        read = {name: understand_images(reader, images)[1] for name, reader in readers.items()}
        for i in range(len(images)):
            row = {"brief": brief.article_type, "judge": judged["article_type"][i], "judge_colour": judged["colour"][i]}
            for name, found in read.items():
                colour = found[i].attributes.get("colour")
                row[name], row[f"{name} colour"] = found[i].article_type.label, colour.label if colour else ""
            rows.append(row)
    frame = pd.DataFrame(rows)
    judge_on = frame["judge"] == frame["brief"]
    print(f"{len(frame)} base images ({args.briefs} training briefs x {args.variants}, {args.steps} steps); "
          f"the judge reads {judge_on.mean():.3f} as the brief's article type")
    print("| reader | same article type as the judge | same colour | reads on brief | judge on brief, "
          "of those it reads on brief | of those it reads off brief |\n|---|---|---|---|---|---|")
    for name in readers:
        on = frame[name] == frame["brief"]
        print(f"| {name} | {(frame[name] == frame['judge']).mean():.3f} | "
              f"{(frame[f'{name} colour'].str.lower() == frame['judge_colour'].str.lower()).mean():.3f} | "
              f"{on.mean():.3f} | {judge_on[on].mean():.3f} | {judge_on[~on].mean():.3f} |")


if __name__ == "__main__":
    main()
