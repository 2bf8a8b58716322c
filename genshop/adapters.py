"""One LoRA per customer group on the denoiser: add, save in the diffusers LoRA format, load, switch.

The denoiser is the family's (``genshop.families``): the UNet of SD 1.x and SDXL, the
transformer of SD3 and FLUX, with the family's ``lora_targets``. A group's adapter folder
holds ``pytorch_lora_weights.safetensors`` as written by the family pipeline's own
``save_lora_weights`` (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``), so plain diffusers of that family loads
it with ``pipe.load_lora_weights(folder)``. An adapters root holds one folder per group
(``ADAPTERS/<group id>/``); ``load_group_adapters`` puts them all on the one loaded
pipeline under the names ``group_<id>``, and ``use_group`` switches between them (or back
to the base model) without reloading anything.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
from pathlib import Path

import torch

from genshop.families import Family, StableDiffusion

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_RECORD = "genshop_adapter.json"  # what genshop tune wrote beside the weights: group, base model, steps, ...
log = std_logging.getLogger(__name__)
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's; each family has its own (Family.lora_targets)


def adapter_name(group_id: str) -> str:
    return f"group_{group_id}"


def add_group_adapter(denoiser, group_id: str, rank: int = 4, alpha: float | None = None,
                      targets: tuple[str, ...] | list[str] = TARGET_MODULES) -> list[torch.nn.Parameter]:
    """A fresh LoRA on the denoiser's ``targets`` (B = 0: the model is unchanged); returns its parameters."""
    from peft import LoraConfig

    name = adapter_name(group_id)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                    target_modules=list(targets)), adapter_name=name)
    denoiser.set_adapter(name)
    return [p for n, p in denoiser.named_parameters() if f".{name}." in n]


def lora_state_dict(denoiser, group_id: str, family: Family | None = None) -> dict[str, torch.Tensor]:
    return (family or StableDiffusion()).lora_state_dict(denoiser, adapter_name(group_id))


def save_group_adapter(denoiser, group_id: str, folder: str | Path, family: Family | None = None) -> Path:
    """Save the group's LoRA as the family's pipeline does (default: SD 1.x, the UNet)."""
    family = family or StableDiffusion()
    return family.save_lora(folder, family.lora_state_dict(denoiser, adapter_name(group_id)))


def available_adapters(root: str | Path | None, base_model: str | None = None) -> dict[str, Path]:
    """Group id → adapter folder, for every ``root/<group>/pytorch_lora_weights.safetensors``; with
    ``base_model``, an adapter whose ``genshop_adapter.json`` names another base model is left out
    (with a warning): the bundle's LoRAs are the mini model's, not a tiny or a hub model's."""
    if root is None or not Path(root).is_dir():
        return {}
    adapters = {}
    for path in sorted(Path(root).glob(f"*/{LORA_WEIGHTS}")):
        trained_on = adapter_base_model(path.parent)
        if base_model is not None and trained_on is not None and trained_on != base_model:
            log.warning("adapter %s was tuned on %s, not %s: group %s gets the base model",
                        path.parent, trained_on, base_model, path.parent.name)
            continue
        adapters[path.parent.name] = path.parent
    return adapters


def adapter_base_model(folder: Path) -> str | None:
    """The base model a LoRA was tuned on, from its ``genshop_adapter.json`` (None: not recorded)."""
    record = folder / ADAPTER_RECORD
    return json.loads(record.read_text()).get("base_model") if record.is_file() else None


def load_group_adapters(pipeline, root: str | Path | None, base_model: str | None = None) -> dict[str, Path]:
    """Load every group adapter under ``root`` (tuned on ``base_model``, when given) onto the
    pipeline, inactive until ``use_group``."""
    from diffusers.utils import logging

    adapters = available_adapters(root, base_model)
    previous = logging.get_verbosity()
    logging.set_verbosity_error()  # "no LoRA keys for the text encoder": true of every denoiser-only adapter
    try:
        for group_id, folder in adapters.items():
            pipeline.load_lora_weights(str(folder), adapter_name=adapter_name(group_id))
    finally:
        logging.set_verbosity(previous)
    if adapters:
        pipeline.disable_lora()
    return adapters


def adapter_fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / LORA_WEIGHTS).read_bytes()).hexdigest()[:12]


def use_group(pipeline, group_id: str | None, adapters: dict[str, Path]) -> bool:
    """Switch the pipeline to the group's adapter; a group without one gets the base model. True if tuned."""
    if group_id in adapters:
        pipeline.enable_lora()
        pipeline.set_adapters([adapter_name(group_id)])
        return True
    if adapters:
        pipeline.disable_lora()
    return False


def lora_side(name: str) -> str | None:
    """'up' for a LoRA's up/B matrix, 'down' for its down/A one (the SD 1.x and the PEFT spellings)."""
    if ".lora.up." in name or ".lora_B." in name:
        return "up"
    if ".lora.down." in name or ".lora_A." in name:
        return "down"
    return None


def average_group_adapters(folders: list[Path], out: Path, rank: int | None = None) -> Path:
    """One LoRA whose update is the mean of several LoRAs' updates: a weight average of policies
    tuned from the same base model on the same reward (WARP, Ramé et al. 2024), which keeps the
    direction they share and averages away what each run's seed and batches made it hack. Per
    module the ``down``/``A`` matrices are stacked and the ``up``/``B`` ones joined times 1/k, so
    ``up @ down`` is exactly ``1/k sum_i up_i @ down_i`` at rank ``k * r`` (diffusers reads the rank
    from the shapes). With ``rank``, each module's mean update is cut to its ``rank`` largest singular
    directions instead (``truncated_lora``: the best rank-``rank`` approximation; exact at ``k * r``),
    so the average costs no more room than one run. Refused (ValueError) unless every folder has the
    same modules, base model, group and scale."""
    from safetensors.torch import load_file, save_file

    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ValueError("adapters: averaging needs at least two")
    weights = [load_file(str(f / LORA_WEIGHTS)) for f in folders]
    for folder, w in zip(folders[1:], weights[1:]):
        if sorted(w) != sorted(weights[0]):
            raise ValueError(f"adapters: {folder} has other modules than {folders[0]}")
    others = [n for n in weights[0] if lora_side(n) is None]
    if others:
        raise ValueError(f"adapters: {folders[0]} holds {others[0]!r}, not an up/down matrix (alphas cannot be averaged)")
    records = [json.loads((f / ADAPTER_RECORD).read_text()) if (f / ADAPTER_RECORD).is_file() else {} for f in folders]
    for key in ("base_model", "group", "scale"):
        values = {str(r.get(key)) for r in records}
        if len(values) > 1:
            raise ValueError(f"adapters: tuned for different {key.replace('_', ' ')}s ({', '.join(sorted(values))})")
    k = len(folders)
    averaged = {name: torch.cat([w[name] / k for w in weights], dim=1) if lora_side(name) == "up"
                else torch.cat([w[name] for w in weights], dim=0) for name in weights[0]}
    if rank is not None:
        averaged = truncated_lora(averaged, rank)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in averaged.items()}, str(out / LORA_WEIGHTS))
    meta = dict(records[0])
    meta.update(averaged_from=[str(f) for f in folders],
                rank=next(t.shape[0] for n, t in averaged.items() if lora_side(n) == "down"))
    (out / ADAPTER_RECORD).write_text(json.dumps(meta, indent=2))
    return out


def truncated_lora(weights: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Each module's update ``up @ down`` as its best rank-``rank`` factorization (SVD: ``up = U_r
    sqrt(S_r)``, ``down = sqrt(S_r) V_r^T``); a module of lower rank keeps its own rank."""
    out = {}
    for up_name in (n for n in weights if lora_side(n) == "up"):
        down_name = up_name.replace(".lora.up.", ".lora.down.").replace(".lora_B.", ".lora_A.")
        up, down = weights[up_name], weights[down_name]
        if up.ndim != 2 or down.ndim != 2:
            raise ValueError(f"adapters: {up_name} is not a linear layer's LoRA; --rank needs 2-D matrices")
        u, s, vh = torch.linalg.svd(up.double() @ down.double(), full_matrices=False)
        r = min(rank, down.shape[0])
        root = s[:r].sqrt()
        out[up_name] = (u[:, :r] * root).to(up.dtype).contiguous()
        out[down_name] = (root[:, None] * vh[:r]).to(down.dtype).contiguous()
    return out


def scale_group_adapter(folder: Path, scale: float, out: Path) -> Path:
    """A copy of a LoRA with its update scaled by ``scale`` (every ``up``/``B`` matrix times it):
    ``scale`` < 1 moves the tuned model back toward the base in weight space, a KL-like knob
    applied after training. ``genshop_adapter.json`` is copied with ``scale`` recorded."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(Path(folder) / LORA_WEIGHTS))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor * scale if lora_side(name) == "up" else tensor
               for name, tensor in weights.items()}, str(out / LORA_WEIGHTS))
    record = Path(folder) / ADAPTER_RECORD
    meta = json.loads(record.read_text()) if record.is_file() else {}
    meta["scale"] = meta.get("scale", 1.0) * scale
    (out / ADAPTER_RECORD).write_text(json.dumps(meta, indent=2))
    return out

