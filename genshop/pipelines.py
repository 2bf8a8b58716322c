"""Diffusers pipelines from presets: ``from_pretrained`` and nothing else reads weights.

``load_pipeline(preset)`` resolves the preset's folder or hub id and calls the
pipeline class's ``from_pretrained``, then loads every group LoRA under
``GENSHOP_ADAPTERS`` onto it (``genshop.adapters``). Presets with ``random_init`` are first built from
their component configs (seeded, so every machine gets the same weights) and saved
with ``save_pretrained`` into ``GENSHOP_MODELS``, then loaded like any checkpoint. One
builder serves every family: the config folder's ``model_index.json`` (diffusers' own
format) names the pipeline class and each component folder's class.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genshop.presets import ModelUnavailableError, Preset, PresetError, load_preset, model_location
from genshop.settings import get_settings
from genshop.tokenizer import write_clip_tokenizer


@dataclass(frozen=True)
class LoadedPipeline:
    """A ready pipeline and the identity recorded on every item it makes."""

    pipeline: object
    preset: Preset
    model_id: str
    revision: str
    device: str
    adapters: dict[str, Path] = field(default_factory=dict)  # group id → LoRA folder, loaded on the pipeline
    adapter_revisions: dict[str, str] = field(default_factory=dict)  # group id → fingerprint of the loaded weights

    @property
    def family(self):
        """The pipeline's model family (``genshop.families``)."""
        from genshop.families import family_of

        return family_of(self.pipeline)

    def identity(self, group_id: str | None) -> tuple[str, str]:
        """(model id, revision) of what makes a variant for ``group_id``: base, or base plus the group's LoRA."""
        if group_id in self.adapters:
            return f"{self.model_id}+lora:{group_id}", f"{self.revision}+{self.adapter_revisions[group_id]}"
        return self.model_id, self.revision


def resolve_device(requested: str | None = None) -> str:
    requested = requested or get_settings().device
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


SD_LAYOUT = {  # configs/tiny-random has no model_index.json: the SD 1.x layout
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def pipeline_layout(config_dir: Path) -> dict:
    """The random-init folder's ``model_index.json`` (as diffusers writes it: component → [library, class],
    other keys the pipeline's own options), or the SD 1.x layout when it has none."""
    index = config_dir / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else SD_LAYOUT


def random_component(library: str, class_name: str, folder: Path, scratch: Path):
    """One component from its config folder: a model with random weights (from the global torch
    seed), a scheduler, or a tokenizer (saved in the folder; CLIP's from open_clip's vocabulary)."""
    import diffusers
    import transformers

    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, class_name)
    if library == "transformers" and "Tokenizer" in class_name:
        if (folder / "tokenizer_config.json").is_file():
            return cls.from_pretrained(folder)
        if class_name.startswith("CLIPTokenizer"):
            return cls.from_pretrained(write_clip_tokenizer(scratch / f"{folder.name}-src"))
        raise FileNotFoundError(f"{folder}: no tokenizer files for {class_name}")
    if library == "diffusers" and issubclass(cls, diffusers.SchedulerMixin):
        return cls.from_config(json.loads((folder / "scheduler_config.json").read_text()))
    config = json.loads((folder / "config.json").read_text())
    if library == "diffusers":
        return cls.from_config(config)
    return cls(cls.config_class(**config))


def build_random_pipeline(config_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Instantiate a pipeline from component configs with seeded random weights and save it.

    ``config_dir/model_index.json`` says which class each component folder holds (the
    pipeline's own ``model_index.json`` format); components are built in its order after one
    ``torch.manual_seed(seed)``, so every machine builds the same weights."""
    import diffusers

    layout = pipeline_layout(config_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        torch.manual_seed(seed)
        components, options = {}, {}
        for name, value in layout.items():
            if name.startswith("_"):
                continue
            if isinstance(value, list) and len(value) == 2:
                library, class_name = value
                components[name] = None if library is None else random_component(
                    library, class_name, config_dir / name, Path(tmp))
            else:
                options[name] = value
        pipe = getattr(diffusers, layout["_class_name"])(**components, **options)
        staged = Path(tmp) / "pipeline"
        pipe.save_pretrained(staged, safe_serialization=True)
        try:
            os.rename(staged, out_dir)  # atomic: concurrent builders race, one wins, all load the same
        except OSError:
            if not (out_dir / "model_index.json").exists():
                raise
    return out_dir


def ensure_weights(preset: Preset) -> str:
    location = model_location(preset)
    if preset.random_init is not None and not (Path(location) / "model_index.json").exists():
        build_random_pipeline(get_settings().configs_dir / preset.random_init, Path(location))
    return location


def weights_revision(location: str, preset: Preset) -> str:
    """The preset's pinned revision, else a fingerprint of the local folder's configs and weight files."""
    if preset.revision:
        return preset.revision
    folder = Path(location)
    if not folder.is_dir():
        return "unpinned"
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes() if path.suffix in {".json", ".txt"} else str(path.stat().st_size).encode())
    return "sha256:" + digest.hexdigest()[:16]


def load_pipeline(preset: Preset | str, device: str | None = None, adapters: bool = True) -> LoadedPipeline:
    """Load the preset's pipeline with ``from_pretrained``; offline failures are one-line errors.
    ``adapters``: with the group LoRAs of ``GENSHOP_ADAPTERS`` (tuning and its evaluation load the base only)."""
    import diffusers

    from genshop.families import family_for_class_name

    preset = load_preset(preset) if isinstance(preset, str) else preset
    try:
        family_for_class_name(preset.pipeline_class)  # every stage needs the pipeline's family
    except ValueError as exc:
        raise PresetError(f"preset {preset.name!r}: {exc}") from None
    device = resolve_device(device)
    location = ensure_weights(preset)
    pipeline_class = getattr(diffusers, preset.pipeline_class)
    dtype = getattr(torch, preset.torch_dtype) if device != "cpu" else torch.float32
    kwargs = {"dtype": dtype}
    if preset.revision:
        kwargs["revision"] = preset.revision
    if preset.variant and device != "cpu":
        kwargs["variant"] = preset.variant
    if preset.pipeline_class == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    previous = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the hub's retry chatter is not the error
    try:
        pipe = pipeline_class.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"preset {preset.name!r}: model {location!r} is not on this machine and cannot be downloaded "
            f"({type(exc).__name__}); put it in the Hugging Face cache or point the preset at a local folder"
        ) from None
    finally:
        diffusers.utils.logging.set_verbosity(previous)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    from genshop.adapters import adapter_fingerprint, load_group_adapters

    model_id = preset.model or f"genshop/{Path(location).name}"
    adapters = load_group_adapters(pipe, get_settings().adapters_dir if adapters else None, model_id)  # hashed once
    return LoadedPipeline(pipeline=pipe, preset=preset, model_id=model_id,
                          revision=weights_revision(location, preset), device=device, adapters=adapters,
                          adapter_revisions={group: adapter_fingerprint(folder) for group, folder in adapters.items()})
