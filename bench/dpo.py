"""The project's Diffusion-DPO step against the structure of the original Diffusion-DPO code,
per model family, same network, same batch, measured side by side in one run.

- ``genshop``: the network frozen with a LoRA on the family's targets (UNet attention; DiT
  attention and feed-forward), the only trainable weights; the reference is the same
  network with adapters disabled (``genshop.tuning``).
- ``original``: the whole network trained, the reference a deep copy kept frozen beside it
  (as in the paper's code and diffusers' research script when it trains the full UNet).

The network is the family's real configuration (SD 1.5's UNet, SDXL's UNet, SD 3.5
Medium's MMDiT, FLUX.1-dev's DiT) at reduced width or depth, at least 100M parameters,
so that weights, gradients and optimizer state dominate memory as they do at real scale:
the smallest latent (8×8, 64 px), one pair, 77 text tokens, the family's own network call,
conditioning and noise process (DDPM ε for SD 1.5/SDXL, flow matching for SD3/FLUX). Each
variant runs in its own child process, so peak memory is its own: on CUDA
``max_memory_allocated``, on CPU the child's peak resident set (``ru_maxrss``) above what
it held before building any model. Reported: median step time (after warm-up), peak
memory, and the same accounting worked out for the real model's parameter count (counted
on the meta device from the real configuration): weights, reference copy, gradients and
AdamW's two moments, fp32, and bf16 weights/gradients with fp32 moments; activations not
counted.

    python bench/dpo.py --family sd15|sdxl|sd3|flux [--steps 3] [--warmup 1] [--rank 4]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: bench/queue.py must not shadow the stdlib's queue

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_TOKENS = 77
LATENT = 8

SD15 = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "in_channels": 4, "layers_per_block": 2,
        "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SDXL = {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
        "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "out_channels": 4,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
SD35_MEDIUM = {"attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
               "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
               "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "qk_norm": "rms_norm", "sample_size": 128}
FLUX_DEV = {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 56, 56], "patch_size": 1}

# family → (model class, real config, its reduction for the bench, real model's name)
FAMILIES = {
    "sd15": ("UNet2DConditionModel", SD15, {"block_out_channels": [160, 320, 640, 640]}, "SD 1.5 UNet"),
    "sdxl": ("UNet2DConditionModel", SDXL, {"block_out_channels": [160, 320, 640], "transformer_layers_per_block": [1, 2, 2]},
             "SDXL base UNet"),
    "sd3": ("SD3Transformer2DModel", SD35_MEDIUM, {"num_attention_heads": 12, "caption_projection_dim": 768,
                                                   "num_layers": 8, "dual_attention_layers": [0, 1, 2, 3],
                                                   "pos_embed_max_size": 96}, "SD 3.5 Medium MMDiT"),
    "flux": ("FluxTransformer2DModel", FLUX_DEV, {"num_attention_heads": 8, "num_layers": 2, "num_single_layers": 4},
             "FLUX.1-dev DiT"),
}
SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def family_parts(name: str):
    """(training side, noise process, LoRA targets, conditioning shapes) of a family, as genshop tunes it."""
    from genshop.families import family_named
    from genshop.tuning.noise import DiffusionProcess, FlowMatchingProcess

    family = family_named({"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}[name])
    if name == "sd15":
        return family, DiffusionProcess(SCALED_LINEAR), {"encoder_hidden_states": (TEXT_TOKENS, 768)}
    if name == "sdxl":
        return family, DiffusionProcess(SCALED_LINEAR), {"encoder_hidden_states": (TEXT_TOKENS, 2048),
                                                         "text_embeds": (1280,), "time_ids": (6,)}
    if name == "sd3":
        return family, FlowMatchingProcess({"num_train_timesteps": 1000, "shift": 3.0}), {
            "encoder_hidden_states": (TEXT_TOKENS, 4096), "pooled_projections": (2048,)}
    return family, FlowMatchingProcess({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}), {
        "encoder_hidden_states": (TEXT_TOKENS, 4096), "pooled_projections": (768,), "guidance": ()}


def network_class(name: str):
    import diffusers

    return getattr(diffusers, FAMILIES[name][0])


def bench_config(name: str) -> dict:
    _, real, reduction, _ = FAMILIES[name]
    return {**real, **reduction}


def lora_parameter_count(model, targets, rank: int) -> int:
    """What a rank-``rank`` LoRA on ``targets`` adds (peft's matching: the name or a dotted suffix)."""
    import torch

    total = 0
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(module_name == t or module_name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def real_accounting(name: str, rank: int) -> dict:
    import torch

    family = family_parts(name)[0]
    with torch.device("meta"):
        model = network_class(name).from_config(FAMILIES[name][1])
    params = sum(p.numel() for p in model.parameters())
    lora = lora_parameter_count(model, family.lora_targets, rank)
    return {"params": params, "lora": lora,
            "fp32": {"original": 20 * params, "genshop": 4 * params + 16 * lora},  # W + ref + grad + 2 moments
            "bf16": {"original": 14 * params, "genshop": 2 * params + 16 * lora}}  # bf16 W/ref/grad, fp32 moments


def run_variant(args) -> dict:
    import copy
    import resource
    import statistics
    import time

    import torch

    from genshop.adapters import add_group_adapter
    from genshop.tuning.tune import preference_step

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family, process, shapes = family_parts(args.family)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after imports, before any model
    torch.manual_seed(0)
    network = network_class(args.family).from_config(bench_config(args.family)).to(device)
    channels = network.config.in_channels // (4 if args.family == "flux" else 1)
    latents = torch.randn(args.pairs, 2, channels, LATENT, LATENT)
    conditioning = {key: torch.randn(args.pairs, *shape, device=device) for key, shape in shapes.items()}
    if "time_ids" in conditioning:
        conditioning["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * args.pairs, device=device)
    if "guidance" in conditioning:
        conditioning["guidance"] = torch.full((args.pairs,), 3.5, device=device)
    generator = torch.Generator().manual_seed(0)

    reference = None
    if args.variant == "genshop":
        network.requires_grad_(False)
        parameters = add_group_adapter(network, "bench", rank=args.rank, targets=family.lora_targets)
        for p in parameters:
            p.requires_grad_(True)
    else:
        reference = copy.deepcopy(network).requires_grad_(False).eval()
        parameters = list(network.parameters())

    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    times = []
    for i in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss, _ = preference_step(family, network, process, latents, conditioning, "dpo", args.beta, generator, reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
    return {"variant": args.variant, "device": device, "step_s": statistics.median(times), "peak_bytes": peak,
            "params": sum(p.numel() for n, p in network.named_parameters() if "lora_" not in n),
            "trainable": sum(p.numel() for p in parameters)}


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), default="sd15")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--beta", type=float, default=None, help="default: by prediction type (losses.DEFAULT_BETA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--variant", choices=["genshop", "original"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.beta is None:
        from genshop.tuning.losses import default_beta

        args.beta = default_beta("flow" if args.family in ("sd3", "flux") else "epsilon")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    from rich.console import Console
    from rich.table import Table

    results = {}
    for variant in ("original", "genshop"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True,
                              text=True)
        if proc.returncode:
            sys.exit(f"{variant} variant failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    original, ours = results["original"], results["genshop"]
    real = real_accounting(args.family, args.rank)
    title = (f"{args.family}: DPO step, {FAMILIES[args.family][3]} config reduced, {args.pairs} pair(s), "
             f"{LATENT}x{LATENT} latent, {original['device']}, {args.threads} thread(s)")
    table = Table("", "original: full network + deep-copied reference", "genshop: LoRA, adapters off", "ratio",
                  title=title)
    table.add_row("network parameters", f"{original['params']:,}", f"{original['params']:,}", "")
    table.add_row("trainable parameters", f"{original['trainable']:,}", f"{ours['trainable']:,}",
                  f"{ours['trainable'] / original['trainable']:.4f}x")
    table.add_row(f"median step time ({args.steps} after {args.warmup} warm-up)", f"{original['step_s']:.2f} s",
                  f"{ours['step_s']:.2f} s", f"{ours['step_s'] / original['step_s']:.2f}x (target <= 1.0)")
    table.add_row("peak memory, measured", gib(original["peak_bytes"]), gib(ours["peak_bytes"]),
                  f"{ours['peak_bytes'] / original['peak_bytes']:.2f}x (target <= 0.6)")
    table.add_row(f"real {FAMILIES[args.family][3]}: parameters", f"{real['params'] / 1e9:.2f}B",
                  f"LoRA r={args.rank}: {real['lora'] / 1e6:.1f}M", "")
    for precision, label in (("fp32", "fp32"), ("bf16", "bf16, fp32 moments")):
        numbers = real[precision]
        table.add_row(f"  W + ref + grads + AdamW, {label}", gib(numbers["original"]), gib(numbers["genshop"]),
                      f"{numbers['genshop'] / numbers['original']:.2f}x")
    Console(width=140).print(table)
    if args.json:
        args.json.write_text(json.dumps({"family": args.family, "results": results, "real": real}, indent=2))


if __name__ == "__main__":
    main()
