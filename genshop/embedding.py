"""The one embedding interface: images and texts → L2-normalised vectors in a shared space.

Two backends, chosen by ``EmbeddingConfig.backend``:

- ``open_clip``: ``model`` is a folder holding ``open_clip_config.json`` (``model_cfg`` +
  ``preprocess_cfg``) and a safetensors checkpoint (the layout ``genshop train clip``
  writes, and the layout of open_clip models on the hub), or a built-in open_clip
  architecture name (``ViT-B-32``, ``RN50``, ...) with ``pretrained`` = a local
  ``.safetensors`` checkpoint file (e.g. a LAION or Marqo-ecommerce checkpoint copied onto
  the machine). Any open_clip image tower (ModifiedResNet, ViT) loads through open_clip's
  own factory; pickled checkpoints (``.bin``/``.pt``/``.pth``) are never loaded.
- ``transformers``: ``model`` is a folder or hub id of a ``CLIPModel`` or a ``SiglipModel``
  (told by its ``config.json``), loaded with the Auto classes; what differs between them
  (text padding, the defaults for a bare folder) is ``TRANSFORMERS_ARCHITECTURES``.

``load_embedder(config)`` returns an ``Embedder`` with ``embed_images``, ``embed_texts``
(batched, float32, unit length) and ``logit_scale`` (the model's learned temperature,
exponentiated: similarity × logit_scale are the model's logits, up to SigLIP's
``logit_bias``, which no softmax over images or labels sees).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CHECKPOINTS = (OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.safetensors", "model.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model")  # .model: SentencePiece

ProgressCallback = Callable[[int, int], None]  # (done, total)


class EmbeddingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["open_clip", "transformers"]
    model: str = Field(description="open_clip: folder with open_clip_config.json, or a built-in architecture name; "
                                   "transformers: CLIPModel or SiglipModel folder or hub id")
    pretrained: str | None = Field(default=None, description="open_clip with a built-in architecture: local "
                                                             ".safetensors checkpoint file")
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


def open_clip_checkpoint(folder: str | Path) -> Path:
    """The safetensors checkpoint in an open_clip model folder: open_clip's own file names first, else the only one."""
    folder = Path(folder)
    for name in OPEN_CLIP_CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{folder} holds no .safetensors checkpoint (pickled .bin/.pt ones are not loaded)")
    if len(found) > 1:
        raise FileNotFoundError(f"{folder} holds {len(found)} checkpoints ({', '.join(p.name for p in found)}): "
                                f"name the one to load {OPEN_CLIP_WEIGHTS}")
    return found[0]


class _WeightsLoadedAfterwards(logging.Filter):
    """open_clip's warnings for a model built with ``load_weights=False``, whose checkpoint is loaded next."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "Multiple checkpoints found" not in message


@contextmanager
def _quiet(filter_: logging.Filter):
    root = logging.getLogger()
    root.addFilter(filter_)
    try:
        yield
    finally:
        root.removeFilter(filter_)


def _local_checkpoint(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"open_clip checkpoint {path!r} is not a local file")
    if not path.endswith(".safetensors"):
        raise ValueError(f"open_clip checkpoint {path!r}: only .safetensors checkpoints are loaded, not pickles")
    return path


class OpenClipEmbedder(Embedder):
    backend = "open_clip"

    def __init__(self, config: EmbeddingConfig):
        import open_clip

        self.device = _resolve_device(config.device)
        self.batch_size = config.batch_size
        folder = Path(config.model)
        if folder.is_dir():  # the folder's config; its checkpoint chosen here, as open_clip could pick a pickle
            name, checkpoint = f"local-dir:{folder}", open_clip_checkpoint(folder)
            with _quiet(_WeightsLoadedAfterwards()):
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, load_weights=False,
                                                                                       device=self.device)
            open_clip.load_checkpoint(self.model, str(checkpoint), device=self.device)
        else:
            name = config.model
            pretrained = config.pretrained and _local_checkpoint(config.pretrained)
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                                   device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def pixels(self, images):
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    def image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        return encode_text_trimmed(self.model, self.tokenizer(list(texts)).to(self.device))


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` on only as many positions as the batch's longest text uses.

    open_clip pads every text to the context length (77 for OpenAI's CLIP) and runs the text
    tower on all of it; a shop's queries are 5 to 10 tokens. With CLIP's causal attention mask a
    position sees only those before it, so the positions up to each text's end-of-text token,
    the one pooled, come out the same without the padding behind them: the same embeddings
    (to float rounding) for a fraction of the work. Models of another kind (a custom or
    Hugging Face text tower, no causal mask, another pooling) run ``encode_text`` as it is."""
    import open_clip
    from open_clip.transformer import text_global_pool

    causal = getattr(model, "attn_mask", None) is not None
    if type(model) is not open_clip.CLIP or not causal or model.text_pool_type not in ("argmax", "eos"):
        return model.encode_text(tokens)
    if model.text_pool_type == "argmax":  # the end-of-text token: the highest id of each text
        pooled_at = tokens.argmax(dim=-1)
    else:
        pooled_at = (tokens == model.text_eos_id).int().argmax(dim=-1)
    length = int(pooled_at.max()) + 1  # no position after the pooled one changes it
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def _offline_clip_tokenizer(model_config):
    """CLIP's own BPE vocabulary, built offline (for a bare CLIPModel folder)."""
    from transformers import CLIPTokenizer

    from genshop.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(
            write_clip_tokenizer(tmp, model_max_length=model_config.text_config.max_position_embeddings))


def _no_tokenizer(model_config):
    raise FileNotFoundError(f"a {model_config.model_type} model folder needs its tokenizer files (tokenizer.json, "
                            "or spiece.model with the sentencepiece package)")


def _clip_image_processor(model_config):
    from transformers import CLIPImageProcessor

    size = model_config.vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _siglip_image_processor(model_config):
    from transformers import SiglipImageProcessor

    size = model_config.vision_config.image_size
    return SiglipImageProcessor(size={"height": size, "width": size})  # squash to size, mean = std = 0.5


@dataclass(frozen=True)
class TransformersArchitecture:
    """What differs between the image–text models of the transformers backend."""

    text_padding: bool | str  # SigLIP's text tower pools the last position: pad to max_length, as it was trained
    text_attention_mask: bool  # SigLIP was trained without one (its tokenizers return none)
    tokenizer: Callable  # model config → tokenizer, for a bare model folder
    image_processor: Callable  # model config → image processor, for a folder without preprocessor_config.json


TRANSFORMERS_ARCHITECTURES = {  # by config.json's model_type
    "clip": TransformersArchitecture(True, True, _offline_clip_tokenizer, _clip_image_processor),
    "siglip": TransformersArchitecture("max_length", False, _no_tokenizer, _siglip_image_processor),
}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TransformersEmbedder(Embedder):
    backend = "transformers"

    def __init__(self, config: EmbeddingConfig):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        self.device = _resolve_device(config.device)
        self.batch_size = config.batch_size
        kwargs = {"local_files_only": config.local_files_only}
        model_config = AutoConfig.from_pretrained(config.model, **kwargs)
        if model_config.model_type not in TRANSFORMERS_ARCHITECTURES:
            raise ValueError(f"{config.model}: a {model_config.model_type!r} model; the transformers backend loads "
                             f"{' and '.join(TRANSFORMERS_ARCHITECTURES)} models")
        self.architecture = TRANSFORMERS_ARCHITECTURES[model_config.model_type]
        self.model = AutoModel.from_pretrained(config.model, config=model_config, **kwargs).to(self.device).eval()
        folder = Path(config.model)
        local = folder.is_dir()
        if not local or any((folder / name).is_file() for name in TOKENIZER_FILES):
            self.tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
        else:
            self.tokenizer = self.architecture.tokenizer(model_config)
        if not local or (folder / "preprocessor_config.json").is_file():
            self.processor = AutoImageProcessor.from_pretrained(config.model, **kwargs)
        else:
            self.processor = self.architecture.image_processor(model_config)
        self.max_length = min(model_config.text_config.max_position_embeddings, self.tokenizer.model_max_length)
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    def pixels(self, images):
        return self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]

    def image_features(self, pixels):
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts):
        tokens = self.tokenizer(list(texts), padding=self.architecture.text_padding, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device) if self.architecture.text_attention_mask else None
        return _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask))


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
