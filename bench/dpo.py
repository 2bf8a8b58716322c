"""The project's Diffusion-DPO step against the structure of the original Diffusion-DPO code,
same UNet, same batch, measured side by side in one run.

- ``genshop``: the UNet frozen with a LoRA on its attention projections (the only trainable
  weights); the reference is the same UNet with adapters disabled (``genshop.tuning``).
- ``original``: the whole UNet trained, the reference a deep copy kept frozen beside it
  (as in the paper's code and diffusers' research script when it trains the full UNet).

Each variant runs in its own child process, so peak memory is its own: on CUDA
``max_memory_allocated``, on CPU the child's peak resident set (``ru_maxrss``) above what
it held before building any model (so the interpreter and torch themselves do not count). Reported:
median step time, peak memory, and the implicit accuracy (share of pairs whose policy
margin beats the reference's), as diffusers' research script logs it.

    python bench/dpo.py [--unet-config configs/generator/unet.json] [--pairs 4] [--steps 8]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: bench/queue.py must not shadow the stdlib's queue

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(args) -> dict:
    import copy
    import resource
    import statistics
    import time

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from genshop.adapters import add_group_adapter
    from genshop.tuning.tune import preference_step

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after imports, before any model
    config = json.loads((REPO / args.unet_config).read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    size = config.get("sample_size", 32)
    latents = torch.randn(args.pairs, 2, config["in_channels"], size, size)
    conditioning = torch.randn(args.pairs, 77, config["cross_attention_dim"], device=device)
    generator = torch.Generator().manual_seed(0)

    reference = None
    if args.variant == "genshop":
        unet.requires_grad_(False)
        parameters = add_group_adapter(unet, "bench", rank=args.rank)
        for p in parameters:
            p.requires_grad_(True)
    else:
        reference = copy.deepcopy(unet).requires_grad_(False).eval()
        parameters = list(unet.parameters())

    def step():
        return preference_step(unet, scheduler, latents, conditioning, "dpo", args.beta, generator, reference)

    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    times, accuracies = [], []
    for i in range(args.steps + 2):
        started = time.perf_counter()
        loss, accuracy = step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - started)
            accuracies.append(accuracy.item())
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
    return {"variant": args.variant, "device": device, "step_s": statistics.median(times), "peak_bytes": peak,
            "trainable": sum(p.numel() for p in parameters), "implicit_accuracy": sum(accuracies) / len(accuracies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", default="configs/generator/unet.json")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--beta", type=float, default=5000.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["genshop", "original"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    from rich.console import Console
    from rich.table import Table

    results = {}
    for variant in ("original", "genshop"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True,
                              text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    original, ours = results["original"], results["genshop"]
    table = Table("", "original (full UNet + deep-copied reference)", "genshop (LoRA, adapters disabled)", "ratio",
                  title=f"Diffusion-DPO step, {args.pairs} pairs, {args.unet_config}, {original['device']}")
    table.add_row("trainable parameters", f"{original['trainable']:,}", f"{ours['trainable']:,}",
                  f"{ours['trainable'] / original['trainable']:.4f}x")
    table.add_row("median step time", f"{original['step_s'] * 1000:.1f} ms", f"{ours['step_s'] * 1000:.1f} ms",
                  f"{ours['step_s'] / original['step_s']:.2f}x (target <= 1.0)")
    table.add_row("peak memory", f"{original['peak_bytes'] / 2**20:.0f} MiB", f"{ours['peak_bytes'] / 2**20:.0f} MiB",
                  f"{ours['peak_bytes'] / original['peak_bytes']:.2f}x (target <= 0.6)")
    table.add_row("implicit accuracy", f"{original['implicit_accuracy']:.3f}", f"{ours['implicit_accuracy']:.3f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
