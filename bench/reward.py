"""Reward scoring throughput: images/s batched against one image at a time, on CPU.

Both sides call the worker's function, ``reward.scoring.score_images(model, embedder, images,
brief, groups)``: once with every image (the embedder batches them, the reward model scores
every (image, group) pair in one forward pass), and once per image (each call embeds its
image and the brief and runs the model). Images are real catalog photos when the catalog is
there, else synthetic. Target: batched >= 10x one at a time.

Then end to end, as the score queue sees them: the images stored as ``--briefs`` briefs of
``images / briefs`` items (groups A and B), scored by ``reward.brief_scoring.score_briefs``
(read the store, load the PNGs, embed, score, write the scores) in groups of ``--gather``
briefs, as a worker with ``GENSHOP_GATHER_MAX`` gathers them, and one brief per call (before
issue 21), against the embedder's own batched throughput on the same images.
Target: across briefs >= 80% of the embedder's.

    python bench/reward.py --clip runs/clip-mini/model --reward runs/reward/group/model
    python bench/reward.py                 # a tiny random CLIP and reward model (no files needed)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, bench/ is first on the path and bench/queue.py would shadow the standard library's queue
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
CATALOG = REPO.parent / "shared" / "data" / "fashion-products" / "catalog-val.parquet"
TINY_OPEN_CLIP = {
    "model_cfg": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 2, 2, 1], "width": 24, "head_width": 32},
                  "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}},
    "preprocess_cfg": {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "longest",
                       "fill_color": 255},
}


def random_clip(folder: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    from genshop.embedding import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / OPEN_CLIP_WEIGHTS))
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(TINY_OPEN_CLIP))
    return folder


def bench_images(n: int, catalog: Path = CATALOG):
    from PIL import Image

    if catalog.is_file():
        import pandas as pd

        from genshop.catalog_data import decode_image

        return [decode_image(data) for data in pd.read_parquet(catalog, columns=["image"])["image"][:n]], catalog.stem
    return [Image.new("RGB", (60, 80), (i * 7 % 256, i * 13 % 256, i * 29 % 256)) for i in range(n)], "synthetic"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=None, help="CLIP folder (default: the reward model's, else tiny random)")
    parser.add_argument("--reward", type=Path, default=None, help="reward model folder (default: random, default size)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--groups", nargs="+", default=["A", "B"])
    parser.add_argument("--batch-size", type=int, default=256, help="embedder batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="run both sides under CPU bfloat16 autocast")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--catalog", type=Path, default=CATALOG, help="parquet of catalog photos (else synthetic images)")
    parser.add_argument("--briefs", type=int, default=64, help="end to end: the images arrive as this many briefs")
    parser.add_argument("--gather", type=int, default=8, help="end to end: briefs scored together (GENSHOP_GATHER_MAX)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from genshop.embedding import EmbeddingConfig, load_embedder
    from reward.groups import load_groups
    from reward.model import RewardModel, RewardModelConfig
    from reward.scoring import score_embeddings, score_images

    with tempfile.TemporaryDirectory() as tmp:
        model = RewardModel.from_pretrained(args.reward) if args.reward else None
        if args.clip:
            embedding = EmbeddingConfig.for_directory(args.clip)
        elif model is not None and model.config.embedding is not None:
            embedding = model.config.embedding
        else:
            embedding = EmbeddingConfig.for_directory(random_clip(Path(tmp)))
        embedder = load_embedder(embedding.model_copy(update={"device": "cpu", "batch_size": args.batch_size}))
        if model is None:
            dim = embedder.embed_texts(["x"]).shape[1]
            torch.manual_seed(0)
            model = RewardModel(RewardModelConfig.for_groups(dim, load_groups(REPO / "configs" / "groups.yaml"))).eval()
        images, source = bench_images(args.images, args.catalog)
        brief = "women's red ethnic kurta, festive"

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
        with autocast:
            score_images(model, embedder, images[:8], brief, args.groups)  # warm-up
            batched = timed(lambda: score_images(model, embedder, images, brief, args.groups), args.repeats)
            single_images = images[: max(16, len(images) // 4)]
            single = timed(lambda: [score_images(model, embedder, [image], brief, args.groups)
                                    for image in single_images], args.repeats)
            # the reward model alone, on precomputed embeddings (what the embedder costs is left out)
            vectors, text = embedder.embed_images(images), embedder.embed_texts([brief])[0]
            head_batched = timed(lambda: score_embeddings(model, vectors, text, args.groups), args.repeats)
            head_single = timed(lambda: [score_embeddings(model, v[None], text, args.groups) for v in vectors],
                                args.repeats)

        end_to_end = score_stored_briefs(Path(tmp), model, embedder, images, args)

    result = {
        **end_to_end,
        "images": len(images), "image_source": source, "groups": len(args.groups), "threads": args.threads,
        "clip": str(embedding.model), "reward_model": str(args.reward or "random"),
        "batched_images_per_s": len(images) / batched,
        "one_at_a_time_images_per_s": len(single_images) / single,
        "bf16": args.bf16,
        "reward_model_only_batched_images_per_s": len(images) / head_batched,
        "reward_model_only_one_at_a_time_images_per_s": len(images) / head_single,
    }
    result["ratio"] = result["batched_images_per_s"] / result["one_at_a_time_images_per_s"]
    result["target_ratio"] = 10.0
    result["passed"] = result["ratio"] >= result["target_ratio"]
    print(f"reward scoring on CPU ({args.threads} thread(s){', bf16 autocast' if args.bf16 else ''}), "
          f"{len(images)} {source} images, {len(args.groups)} groups")
    print(f"  batched (one call)       {result['batched_images_per_s']:8.1f} images/s")
    print(f"  one image per call       {result['one_at_a_time_images_per_s']:8.1f} images/s "
          f"(over {len(single_images)} images)")
    print(f"  ratio                    {result['ratio']:8.1f}x  (target >= 10x: {'PASS' if result['passed'] else 'FAIL'})")
    head_ratio = result["reward_model_only_batched_images_per_s"] / result["reward_model_only_one_at_a_time_images_per_s"]
    print(f"  reward model alone (embeddings given): {result['reward_model_only_batched_images_per_s']:.0f} vs "
          f"{result['reward_model_only_one_at_a_time_images_per_s']:.0f} images/s ({head_ratio:.0f}x)")
    print(f"end to end, {len(images)} images as {args.briefs} briefs of {len(images) // args.briefs} "
          f"(store, PNGs, embed, score, store)")
    print(f"  embedder alone (batched) {end_to_end['embedder_images_per_s']:8.1f} images/s")
    print(f"  across briefs ({args.gather} a call) {end_to_end['across_briefs_images_per_s']:8.1f} images/s  "
          f"= {end_to_end['across_briefs_share']:.0%} of the embedder's (target >= 80%: "
          f"{'PASS' if end_to_end['across_briefs_share'] >= 0.8 else 'FAIL'})")
    print(f"  one brief per call       {end_to_end['per_brief_images_per_s']:8.1f} images/s  "
          f"= {end_to_end['per_brief_images_per_s'] / end_to_end['embedder_images_per_s']:.0%} of the embedder's")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def score_stored_briefs(folder: Path, model, embedder, images, args) -> dict:
    """Images/s of ``score_briefs`` over stored briefs (across briefs, and one brief per call) and of the embedder."""
    from genshop.briefs import Brief
    from genshop.store import NewItem, Store
    from reward.brief_scoring import BriefScorer, score_briefs

    store = Store(f"sqlite:///{folder / 'bench.db'}", folder / "files")
    per_brief = len(images) // args.briefs
    scored = per_brief * args.briefs
    stored = [store.images.put(image) for image in images[:scored]]
    scorer = BriefScorer(model=model, embedder=embedder, model_id="bench@1")

    def new_briefs() -> list[str]:
        """The images as ``args.briefs`` new briefs of ``per_brief`` items, none scored yet."""
        ids = []
        for b in range(args.briefs):
            record, _ = store.create_brief(Brief(title=f"bench brief {b}", colour="Red", groups=args.groups,
                                                 variants=per_brief, seed=b, steps=1, guidance_scale=1.0, width=64,
                                                 height=64, negative_prompt=""), "tiny-random")
            store.add_items([NewItem(brief_id=record.id, variant=v, prompt=f"bench brief {b}, Red", negative_prompt="",
                                     seed=b + v, steps=1, guidance_scale=1.0, width=64, height=64, model_id="bench",
                                     model_revision="r", image_sha256=sha, image_path=path, timings={})
                             for v, (sha, path) in enumerate(stored[b * per_brief:(b + 1) * per_brief])])
            ids.append(record.id)
        return ids

    def seconds(score) -> float:
        """Median seconds of ``score(brief ids)`` over fresh briefs (their setup not timed)."""
        times = []
        for _ in range(args.repeats):
            ids = new_briefs()
            started = time.perf_counter()
            score(ids)
            times.append(time.perf_counter() - started)
            assert all(len(s) == per_brief * len(args.groups) for s in store.list_scores_of(ids).values())
        return statistics.median(times)

    def across(ids: list[str]) -> None:
        for start in range(0, len(ids), args.gather):
            score_briefs(store, ids[start:start + args.gather], scorer)

    def one_by_one(ids: list[str]) -> None:
        for brief_id in ids:
            score_briefs(store, [brief_id], scorer)

    across(new_briefs())  # warm-up
    batched_images = images[:scored]
    embedder_s = timed(lambda: embedder.embed_images(batched_images), args.repeats)
    across_s = seconds(across)
    per_brief_s = seconds(one_by_one)
    return {"embedder_images_per_s": scored / embedder_s, "across_briefs_images_per_s": scored / across_s,
            "per_brief_images_per_s": scored / per_brief_s, "across_briefs_share": embedder_s / across_s,
            "briefs": args.briefs, "gather": args.gather}


if __name__ == "__main__":
    main()
