"""Generation presets: YAML files in ``configs/presets/`` naming a diffusers pipeline.

A preset says where the weights come from (a local folder, a hub id, or component
configs to initialise randomly), which pipeline class loads them, the generation
defaults, and the limits briefs are validated against.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from genshop.settings import get_settings


class GenerationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0.0)
    width: int = Field(ge=8)
    height: int = Field(ge=8)
    negative_prompt: str = ""
    batch_size: int = Field(default=8, ge=1, le=64, description="variants denoised together in one pipeline call")
    max_sequence_length: int | None = Field(default=None, ge=1, le=512,
                                            description="T5 prompt length (SD3, FLUX); default: the pipeline's")


class SizeLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_size: int = Field(ge=8)
    max_size: int = Field(ge=8)
    size_multiple: int = Field(default=8, ge=1)
    max_steps: int = Field(default=150, ge=1)


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    pipeline_class: str = "StableDiffusionPipeline"
    model: str | None = Field(default=None, description="local folder (absolute or repo-relative) or hub id")
    revision: str | None = None
    variant: str | None = None
    random_init: str | None = Field(default=None, description="folder under configs/ with component configs; random weights")
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    defaults: GenerationDefaults
    limits: SizeLimits

    @model_validator(mode="after")
    def _one_source(self) -> "Preset":
        if (self.model is None) == (self.random_init is None):
            raise ValueError("a preset names exactly one of 'model' and 'random_init'")
        return self


class PresetError(ValueError):
    """A preset that does not exist or does not parse."""


class ModelUnavailableError(RuntimeError):
    """The preset's weights are neither on disk nor downloadable (one-line message)."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in (get_settings().configs_dir / "presets").glob("*.yaml"))


def load_preset(name: str) -> Preset:
    path = get_settings().configs_dir / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    try:
        return Preset.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except Exception as exc:  # yaml or pydantic: both mean the file is broken
        raise PresetError(f"preset file {path} is invalid: {exc}") from exc


def random_init_fingerprint(config_folder: str) -> str:
    """Hash of a random-init preset's component configs: a changed config builds a new model."""
    digest = hashlib.sha256()
    root = get_settings().configs_dir / config_folder
    for path in sorted(root.rglob("*.json")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def model_location(preset: Preset) -> str:
    """Where ``from_pretrained`` loads the preset's weights from: a folder path or a hub id."""
    if preset.random_init is not None:
        return str(get_settings().models_dir / f"{preset.random_init}-{random_init_fingerprint(preset.random_init)}")
    candidate = Path(preset.model).expanduser()
    if not candidate.is_absolute():
        repo_relative = get_settings().configs_dir.parent / candidate
        if repo_relative.exists():
            return str(repo_relative)
    return str(candidate) if candidate.exists() else preset.model
