"""Best-of-N serving on this CPU: candidates/s when the N candidates of every variant are made
in one batched pipeline call (as variants are today) against one candidate per call, each
including the reward model's scoring of the candidates and the pick of each variant's top.

    python bench/best_of_n.py [--preset mini] [--n 8] [--variants 2] [--threads N] [--steps S]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: bench/queue.py must not shadow the stdlib's queue

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=os.environ.get("GENSHOP_PRESET", "mini"))
    parser.add_argument("--reward", type=Path, default=None, help="default: the bundle's reward model")
    parser.add_argument("--n", type=int, default=8, help="candidates per variant")
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from genshop.pipelines import load_pipeline
    from genshop.settings import BUNDLE_DIR
    from reward.scoring import load_scorer, score_images

    torch.set_num_threads(args.threads)
    loaded = load_pipeline(args.preset, device="cpu")
    pipe, defaults = loaded.pipeline, loaded.preset.defaults
    steps = args.steps or defaults.steps
    model, embedder = load_scorer(args.reward or BUNDLE_DIR / "reward")
    prompt = "Men Black Leather Wallet"  # build_prompt of the brief below is the title itself
    total = args.n * args.variants

    def generate(seeds: list[int]):
        with torch.inference_mode():
            return pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=defaults.guidance_scale,
                        width=defaults.width, height=defaults.height,
                        generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    def pick(images) -> list[int]:
        rewards = np.array(score_images(model, embedder, images, prompt, ["A"])["A"].rewards).reshape(args.variants,
                                                                                                     args.n)
        return rewards.argmax(axis=1).tolist()

    from genshop.briefs import parse_brief, resolve_brief
    from genshop.generation import candidate_seed, generate_batch, reward_scorer

    brief = resolve_brief(parse_brief({"title": prompt, "variants": args.variants, "best_of": args.n, "seed": 0,
                                       "steps": steps, "groups": ["A"]}), loaded.preset)
    seeds = [candidate_seed(0, v, c) for v in range(args.variants) for c in range(args.n)]
    scorer = reward_scorer(args.reward or BUNDLE_DIR / "reward")
    generate(seeds[:2])  # warm-up
    timings = {}
    started = time.perf_counter()
    batched = [g.best_of["kept"] for g in generate_batch(loaded, brief, list(range(args.variants)), scorer=scorer)]
    timings["batched: one call of variants x N (generate_batch)"] = time.perf_counter() - started
    started = time.perf_counter()
    single = pick([image for s in seeds for image in generate([s])])
    timings["one candidate per call"] = time.perf_counter() - started

    table = Table(title=f"bench/best_of_n.py — preset {args.preset}, best-of-{args.n} x {args.variants} variants, "
                        f"{defaults.width}x{defaults.height}, {steps} steps, torch threads={args.threads}")
    for column in ("mode", "seconds", "candidates/s"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for mode, seconds in timings.items():
        table.add_row(mode, f"{seconds:.1f}", f"{total / seconds:.2f}")
    first, second = timings.values()
    table.add_row("batched / single", "", f"{second / first:.2f}x")
    Console().print(table)
    print(f"picks agree (same seeds, batched vs single): {batched == single}")


if __name__ == "__main__":
    main()
