"""The one embedding interface: images and texts → L2-normalised vectors in a shared space.

Two backends, chosen by ``EmbeddingConfig.backend``:

- ``open_clip``: ``model`` is a folder holding ``open_clip_config.json`` (``model_cfg`` +
  ``preprocess_cfg``) and a safetensors checkpoint (the layout ``genshop train clip``
  writes, and the layout of open_clip models on the hub), or a built-in open_clip
  architecture name with ``pretrained`` = a local checkpoint file (e.g. a LAION or
  Marqo-ecommerce checkpoint copied onto the machine).
- ``transformers``: ``model`` is a folder or hub id of a ``transformers.CLIPModel``.

``load_embedder(config)`` returns an ``Embedder`` with ``embed_images``, ``embed_texts``
(batched, float32, unit length) and ``logit_scale`` (the model's learned temperature,
exponentiated: similarity × logit_scale are the model's logits).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt")

ProgressCallback = Callable[[int, int], None]  # (done, total)


class EmbeddingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["open_clip", "transformers"]
    model: str = Field(description="open_clip: folder with open_clip_config.json, or a built-in architecture name; "
                                   "transformers: CLIPModel folder or hub id")
    pretrained: str | None = Field(default=None, description="open_clip with a built-in architecture: local checkpoint file")
    device: str = "auto"
    batch_size: int = Field(default=256, ge=1)
    local_files_only: bool = Field(default=True, description="transformers: never reach the hub")

    @classmethod
    def for_directory(cls, path: str | Path, **overrides) -> "EmbeddingConfig":
        """The config for a model folder, the backend told by the files in it."""
        folder = Path(path)
        if (folder / OPEN_CLIP_CONFIG).is_file():
            return cls(backend="open_clip", model=str(folder), **overrides)
        if (folder / "config.json").is_file():
            return cls(backend="transformers", model=str(folder), **overrides)
        raise FileNotFoundError(f"{folder} holds neither {OPEN_CLIP_CONFIG} (open_clip) nor config.json (transformers)")


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _batched(items: Sequence, batch_size: int, embed: Callable[[Sequence], torch.Tensor],
             progress: ProgressCallback | None) -> np.ndarray:
    chunks = []
    for start in range(0, len(items), batch_size):
        with torch.inference_mode():
            chunks.append(_normalised(embed(items[start:start + batch_size])))
        if progress:
            progress(min(start + batch_size, len(items)), len(items))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


class Embedder:
    """Embeds images and texts with one model; subclasses say how to turn a batch into features."""

    backend: str
    device: str
    batch_size: int
    logit_scale: float

    model: torch.nn.Module

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's input tensor ``[n, 3, h, w]`` for a batch of images (its own preprocessing)."""
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of preprocessed ``pixels``; differentiable (for tuning the image tower)."""
        raise NotImplementedError

    def _image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.image_features(self.pixels(images).to(self.device))

    def _text_features(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image], progress: ProgressCallback | None = None) -> np.ndarray:
        return _batched(list(images), self.batch_size, self._image_features, progress)

    def embed_pixels(self, pixels: torch.Tensor, progress: ProgressCallback | None = None) -> np.ndarray:
        """``embed_images`` for pixels already preprocessed (``pixels``), e.g. held in memory for training."""
        return _batched(pixels, self.batch_size, lambda batch: self.image_features(batch.float().to(self.device)),
                        progress)

    def embed_texts(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        return _batched(list(texts), self.batch_size, self._text_features, progress)


class OpenClipEmbedder(Embedder):
    backend = "open_clip"

    def __init__(self, config: EmbeddingConfig):
        import open_clip

        self.device = _resolve_device(config.device)
        self.batch_size = config.batch_size
        folder = Path(config.model)
        if folder.is_dir():
            name, pretrained = f"local-dir:{folder}", None
        else:
            name, pretrained = config.model, config.pretrained
            if pretrained is not None and not Path(pretrained).is_file():
                raise FileNotFoundError(f"open_clip checkpoint {pretrained!r} is not a local file")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def pixels(self, images):
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    def image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def _offline_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    from genshop.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, model_max_length=max_length))


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TransformersEmbedder(Embedder):
    backend = "transformers"

    def __init__(self, config: EmbeddingConfig):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.device = _resolve_device(config.device)
        self.batch_size = config.batch_size
        kwargs = {"local_files_only": config.local_files_only}
        self.model = CLIPModel.from_pretrained(config.model, **kwargs).to(self.device).eval()
        max_length = self.model.config.text_config.max_position_embeddings
        folder = Path(config.model)
        local = folder.is_dir()
        if not local or (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            self.tokenizer = CLIPTokenizer.from_pretrained(config.model, **kwargs)
        else:  # a bare model folder: CLIP's own BPE vocabulary, built offline
            self.tokenizer = _offline_tokenizer(max_length)
        if not local or (folder / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(config.model, **kwargs)
        else:
            size = self.model.config.vision_config.image_size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def pixels(self, images):
        return self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]

    def image_features(self, pixels):
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                    attention_mask=tokens["attention_mask"].to(self.device)))


def load_embedder(config: EmbeddingConfig) -> Embedder:
    """Load the model named by ``config`` with its backend; nothing is downloaded for local folders."""
    if config.backend == "open_clip":
        return OpenClipEmbedder(config)
    return TransformersEmbedder(config)


def _hash_file(digest, path: Path) -> None:
    digest.update(f"{path.name}:{path.stat().st_size}:".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def embedder_fingerprint(config: EmbeddingConfig) -> str:
    """A short hash of what determines the embeddings: backend, model files (contents), checkpoint."""
    digest = hashlib.sha256(f"{config.backend}|".encode())
    model = Path(config.model)
    if model.is_dir():
        for path in sorted(p for p in model.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            _hash_file(digest, path)
    else:
        digest.update(config.model.encode())
    if config.pretrained:
        _hash_file(digest, Path(config.pretrained))
    return digest.hexdigest()[:16]


def read_open_clip_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
