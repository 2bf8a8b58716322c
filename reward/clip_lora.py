"""The optional LoRA on the reward model's CLIP image tower (the backbone is frozen by default).

Phase 1 of training (``reward.training``) fits the reward model on frozen, cached CLIP
embeddings. With ``RewardTrainingConfig.clip_lora`` set, phase 2 (``tune_image_lora``)
goes on from the best phase-1 model with peft LoRA adapters on the last stage of the image
tower, trained together with the reward model, so the image embeddings themselves move
toward what the groups care about. The text tower stays frozen (brief embeddings stay
cached). Every item's pixels are preprocessed once and held in memory as float16, and a
batch embeds each of its distinct items once.

The adapter is saved inside the reward model folder as ``clip_lora/`` in peft's format
(``adapter_config.json`` + ``adapter_model.safetensors``); ``load_image_lora`` puts it on a
loaded embedder, so scoring, evaluation and tuning embed images through it. A tuned image
tower is a different embedder: ``lora_fingerprint`` extends the base fingerprint with the
adapter's weights, so cached embeddings of the frozen CLIP are never reused for it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from genshop.embedding import Embedder

if TYPE_CHECKING:
    from reward.data import ImpressionTensors
    from reward.model import RewardModel

LORA_FOLDER = "clip_lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ClipLoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        default=None, description="module names in the embedder's model; default: the image tower's last stage")
    epochs: int = Field(default=2, ge=1, description="phase-2 epochs; the best on held-out items is kept")
    batch_size: int = Field(default=128, ge=1, description="impressions per phase-2 step")
    impressions_per_epoch: int | None = Field(default=None, ge=1, description="a phase-2 epoch sees at most this "
                                              "many training impressions, a fresh random subset each epoch")
    learning_rate: float = Field(default=3e-4, gt=0, description="peak for the adapters; cosine decay to 5%")
    model_learning_rate: float = Field(default=1e-4, gt=0, description="peak for the reward model (already trained)")


# ---------------------------------------------------------------- adapters on an embedder

def _last_stage_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Module-name prefixes of the image tower's last stage, by architecture."""
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "attnpool"):  # open_clip ModifiedResNet
        return "visual.layer4.", "visual.attnpool."
    if visual is not None and hasattr(visual, "transformer"):  # open_clip VisionTransformer
        return (f"visual.transformer.resblocks.{len(visual.transformer.resblocks) - 1}.mlp.",)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "clip":  # transformers CLIPModel
        return f"vision_model.encoder.layers.{len(model.vision_model.encoder.layers) - 1}.", "visual_projection"
    if model_type == "siglip":  # transformers SiglipModel: no projection, the pooling head makes the embedding
        tower = "vision_model.vision_model" if hasattr(model.vision_model, "vision_model") else "vision_model"  # 4.x
        layers = len(model.get_submodule(tower).encoder.layers)
        return f"{tower}.encoder.layers.{layers - 1}.", f"{tower}.head."
    raise ValueError(f"no default LoRA targets for a {type(model).__name__}; set clip_lora.target_modules")


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The Linear and Conv2d layers of the image tower's last stage, by architecture.

    open_clip ModifiedResNet: ``layer4`` and the attention pool; open_clip ViT: the last
    block's MLP (its attention is ``nn.MultiheadAttention``, which bypasses its Linear
    layers); transformers ``CLIPModel``: the last vision encoder layer and the projection;
    transformers ``SiglipModel``: the last vision encoder layer and the pooling head's MLP
    (the head's attention is an ``nn.MultiheadAttention`` too).
    """
    prefixes = _last_stage_prefixes(model)
    bypassed = {f"{name}.{child}" for name, module in model.named_modules()
                if isinstance(module, torch.nn.MultiheadAttention) for child, _ in module.named_modules() if child}
    names = [name for name, module in model.named_modules()
             if name.startswith(prefixes) and name not in bypassed
             and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    if not names:
        raise ValueError(f"no Linear or Conv2d layers under {prefixes} in {type(model).__name__}")
    return names


def add_image_lora(embedder: Embedder, config: ClipLoraConfig) -> list[torch.nn.Parameter]:
    """Inject fresh adapters into the embedder's model; returns the trainable (adapter) parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.target_modules or default_target_modules(embedder.model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    inject_adapter_in_model(lora, embedder.model)
    embedder.peft_config = lora
    params = []
    for name, param in embedder.model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append(param)
    return params


def save_image_lora(embedder: Embedder, folder: str | Path) -> Path:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    embedder.peft_config.save_pretrained(str(folder))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(embedder.model).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def load_image_lora(embedder: Embedder, folder: str | Path) -> Embedder:
    """Put a saved adapter on a loaded embedder (in eval mode); returns the embedder."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_WEIGHTS}: not a CLIP LoRA folder")
    lora = LoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(lora, embedder.model)
    result = set_peft_model_state_dict(embedder.model, load_file(str(folder / ADAPTER_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: adapter weights for layers the CLIP lacks: {result.unexpected_keys[:3]}")
    embedder.peft_config = lora
    embedder.model.eval()
    return embedder


def lora_fingerprint(base_fingerprint: str, folder: str | Path) -> str:
    """The embedder fingerprint of the base CLIP with this adapter on its image tower."""
    digest = hashlib.sha256(base_fingerprint.encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- phase 2: train the adapters with the reward model

def item_pixels(embedder: Embedder, items: Sequence[str], image_of: Callable, batch_size: int = 512) -> torch.Tensor:
    """Every item's preprocessed pixels ``[n, 3, h, w]`` as float16, decoded a batch at a time."""
    return torch.cat([embedder.pixels([image_of(item) for item in items[start:start + batch_size]]).half()
                      for start in range(0, len(items), batch_size)])


def tune_image_lora(model: RewardModel, embedder: Embedder, pixels: torch.Tensor, train: ImpressionTensors,
                    held: ImpressionTensors, config: ClipLoraConfig,
                    loss_fn: Callable, held_out_metrics: Callable, log: Callable[[dict], None],
                    generator: torch.Generator, group_dropout: float,
                    on_step: Callable[[int, int, float], None] | None = None) -> dict:
    """Phase 2: the reward model and fresh image-tower adapters (``add_image_lora``), trained together.

    ``train``/``held`` are ``ImpressionTensors`` whose item rows index ``pixels``. Each epoch
    ends with the held-out items re-embedded through the current adapters; the best epoch's
    reward-model and adapter weights are restored at the end. Returns the best metrics.
    ``on_step(step, total_steps, loss)`` reports progress.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    device = embedder.device

    def held_out() -> dict[str, float]:
        embedder.model.eval()
        rows = torch.unique(held.item_rows[held.mask])
        embeddings = held.item_embeddings.clone()
        embeddings[rows] = torch.from_numpy(embedder.embed_pixels(pixels[rows]))
        return held_out_metrics(model, dataclasses.replace(held, item_embeddings=embeddings), device)

    adapters = add_image_lora(embedder, config)  # zero-initialised: phase 2 starts where phase 1 ended
    best = {"epoch": 0, **held_out(), "state": copy.deepcopy(model.state_dict()),
            "adapter": copy.deepcopy(get_peft_model_state_dict(embedder.model))}
    log({"phase": "clip_lora", "epoch": 0, "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"]})
    optimizer = torch.optim.AdamW([{"params": adapters, "lr": config.learning_rate},
                                   {"params": list(model.parameters()), "lr": config.model_learning_rate}],
                                  weight_decay=0.01)
    peaks = [group["lr"] for group in optimizer.param_groups]
    per_epoch = min(len(train), config.impressions_per_epoch or len(train))
    step, total_steps = 0, config.epochs * -(-per_epoch // config.batch_size)
    for epoch in range(1, config.epochs + 1):
        model.train()
        embedder.model.eval()  # BatchNorm statistics stay those of the frozen CLIP
        order = torch.randperm(len(train), generator=generator)[:config.impressions_per_epoch]
        tick = time.perf_counter()
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
            _, briefs, group_index, mask, chosen = train.batch(rows, device)
            items, inverse = torch.unique(train.item_rows[rows], return_inverse=True)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                features = embedder.image_features(pixels[items].float().to(device))
            images = torch.nn.functional.normalize(features.float(), dim=-1)[inverse.to(device)]
            if group_dropout > 0:
                group_index = group_index.masked_fill(torch.rand(len(group_index), generator=generator).to(device)
                                                      < group_dropout, 0)
            rewards, no_choice = model(images, briefs, group_index)
            loss = loss_fn(rewards.float(), no_choice.float(), mask, chosen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + adapters, 1.0)
            optimizer.step()
            step += 1
            if on_step:
                on_step(step, total_steps, loss.item())
        metrics = held_out()
        log({"phase": "clip_lora", "epoch": epoch, "train_loss": loss.item(), **metrics,
             "epoch_s": time.perf_counter() - tick})
        if metrics["val_loss"] < best["val_loss"] - 1e-4:
            best = {"epoch": epoch, **metrics, "state": copy.deepcopy(model.state_dict()),
                    "adapter": copy.deepcopy(get_peft_model_state_dict(embedder.model))}
    model.load_state_dict(best["state"])
    set_peft_model_state_dict(embedder.model, best["adapter"])
    model.eval()
    return {k: v for k, v in best.items() if k not in ("state", "adapter")}

