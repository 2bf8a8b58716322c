"""The offline default pipeline on this CPU, measured side by side in one run.

1. images/s of the preset's pipeline at batch 1 and batch 16 (same prompt, steps, size).
2. The CPU's measured fp32 matmul peak (large square matmuls, all threads) and the share
   of it that one UNet forward reaches (FLOPs counted by torch's FlopCounterMode).

    python bench/mini.py [--preset mini] [--threads N]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: bench/queue.py must not shadow the stdlib's queue

import argparse
import os
import time


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=os.environ.get("GENSHOP_PRESET", "mini"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from torch.utils.flop_counter import FlopCounterMode

    from genshop.pipelines import load_pipeline

    torch.set_num_threads(args.threads)
    loaded = load_pipeline(args.preset, device="cpu")
    pipe, defaults = loaded.pipeline, loaded.preset.defaults

    def generate(batch: int):
        return lambda: pipe(["Men Black Leather Wallet"] * batch, num_inference_steps=defaults.steps,
                            guidance_scale=defaults.guidance_scale, width=defaults.width, height=defaults.height,
                            generator=[torch.Generator().manual_seed(i) for i in range(batch)])

    per_image = {batch: timed(generate(batch), args.repeats) / batch for batch in (1, 16)}

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    peak = 2 * n**3 / timed(lambda: a @ b, 10)

    unet = pipe.unet
    scale = pipe.vae_scale_factor
    latents = torch.randn(32, unet.config.in_channels, defaults.height // scale, defaults.width // scale)
    context = torch.randn(32, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    timestep = torch.full((32,), 500)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(latents, timestep, context)
        flops = counter.get_total_flops()
        seconds = timed(lambda: unet(latents, timestep, context), args.repeats)
    achieved = flops / seconds

    table = Table(title=f"bench/mini.py — preset {args.preset} ({loaded.model_id}), {defaults.width}x{defaults.height}, "
                        f"{defaults.steps} steps, torch threads={args.threads}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("images/s, batch 1", f"{1 / per_image[1]:.2f}")
    table.add_row("images/s, batch 16", f"{1 / per_image[16]:.2f}")
    table.add_row("batch 16 / batch 1", f"{per_image[1] / per_image[16]:.2f}x")
    table.add_row("fp32 matmul peak, 2048x2048 (GFLOP/s)", f"{peak / 1e9:.1f}")
    table.add_row("UNet forward, batch 32 (GFLOP/s)", f"{achieved / 1e9:.1f}")
    table.add_row("UNet forward / matmul peak", f"{100 * achieved / peak:.1f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
