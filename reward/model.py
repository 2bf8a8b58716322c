"""The group reward model: CLIP image + brief text + group → one scalar reward (PerFusion-style).

Inputs are unit-length CLIP embeddings (any backend of ``genshop.embedding``), so the
backbone stays frozen and features can be cached. Four blocks of width ``hidden_dim`` are
concatenated into ``x0``: the projected image embedding, the projected brief embedding, the
group vector (a learned embedding of the group id plus a projection of the group's feature
tokens such as ``age_band=18-24``), and a projection of image ⊙ brief (its sum is the CLIP
cosine, so a plain CLIP score is one linear readout away). A DCN-v2 cross network
(``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l``) crosses them explicitly (group × image is the
bilinear term a group-specific taste needs; further layers give higher orders) next to a
deep MLP on ``x0``; a linear head reads both out.

Score scale: the reward is a logit. Softmax over the rewards of the images shown together
(plus ``no_choice`` when "none" is an option) gives the model's choice probabilities; the
difference of two rewards is the log-odds that one is chosen over the other (Bradley–Terry).
Only differences within one (brief, group) are meaningful; the absolute level is arbitrary.

Group index 0 is the population: the group-agnostic "everyone". Training replaces the group
with it at random (``group_dropout``), so it learns the average taste; a group the model does
not know is scored as the population, and ``group_index`` says so (``fallback``). A model
with ``use_groups=False`` always sees the population: the group-agnostic baseline of the
same size.

Saved as ``config.json`` (``RewardModelConfig``) + ``model.safetensors`` with
``save_pretrained`` / ``from_pretrained``; a model trained with the optional LoRA on the
CLIP's image tower also holds ``clip_lora/`` (``reward.clip_lora``), which ``load_scorer``
puts on the embedder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from genshop.embedding import EmbeddingConfig
from reward.groups import POPULATION, Group, feature_vocabulary

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FORMAT_VERSION = 1


class RewardModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = MODEL_FORMAT_VERSION
    embed_dim: int = Field(ge=1, description="dimension of the CLIP embeddings the model reads")
    hidden_dim: int = Field(default=64, ge=1, description="width of each of the four input blocks")
    cross_layers: int = Field(default=3, ge=0)
    deep_layers: int = Field(default=2, ge=0)
    deep_dim: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    use_groups: bool = Field(default=True, description="False: the group-agnostic baseline (always the population)")
    groups: list[Group] = Field(default_factory=list, description="known groups; index i + 1 (0 is the population)")
    group_features: list[str] = Field(default_factory=list, description="feature tokens, the columns of the feature matrix")
    embedding: EmbeddingConfig | None = Field(default=None, description="the embedder whose vectors the model reads")
    embedder_fingerprint: str | None = None
    image_lora: str | None = Field(default=None, description="folder, inside the model's, of a LoRA on the CLIP's "
                                                               "image tower (reward.clip_lora); None: the CLIP is frozen")

    @classmethod
    def for_groups(cls, embed_dim: int, groups: list[Group], **fields) -> "RewardModelConfig":
        return cls(embed_dim=embed_dim, groups=groups, group_features=feature_vocabulary(groups), **fields)


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x0 ⊙ (W x + b) + x``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.normal_(self.linear.weight, std=dim ** -0.5 * 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class RewardModel(nn.Module):
    def __init__(self, config: RewardModelConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_dim, config.embed_dim
        self.group_ids = [POPULATION] + [group.id for group in config.groups]
        features = torch.zeros(len(self.group_ids), max(1, len(config.group_features)))
        column = {token: j for j, token in enumerate(config.group_features)}
        for i, group in enumerate(config.groups, start=1):
            for token in group.feature_tokens():
                if token in column:
                    features[i, column[token]] = 1.0
        self.register_buffer("group_feature_matrix", features, persistent=False)

        self.image_proj = nn.Linear(d, h)
        self.text_proj = nn.Linear(d, h)
        self.product_proj = nn.Linear(d, h)
        self.group_embedding = nn.Embedding(len(self.group_ids), h)
        nn.init.normal_(self.group_embedding.weight, std=0.1)
        self.group_feature_proj = nn.Linear(features.shape[1], h, bias=False)
        self.input_norm = nn.LayerNorm(4 * h)
        self.cross = nn.ModuleList(CrossLayer(4 * h) for _ in range(config.cross_layers))
        deep, width = [], 4 * h
        for _ in range(config.deep_layers):
            deep += [nn.Linear(width, config.deep_dim), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.deep_dim
        self.deep = nn.Sequential(*deep)
        self.head = nn.Linear(4 * h + width, 1)
        self.no_choice_head = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, 1))

    # ------------------------------------------------------------ groups

    def group_index(self, group_id: str | None) -> tuple[int, bool]:
        """(index, fallback): a known group's index, else the population's (0) with ``fallback=True``."""
        if not self.config.use_groups or group_id in (None, POPULATION):
            return 0, False
        if group_id in self.group_ids:
            return self.group_ids.index(group_id), False
        return 0, True

    def group_vectors(self, group_index: torch.Tensor) -> torch.Tensor:
        if not self.config.use_groups:
            group_index = torch.zeros_like(group_index)
        return self.group_embedding(group_index) + self.group_feature_proj(self.group_feature_matrix[group_index])

    # ------------------------------------------------------------ scoring

    def forward(self, image: torch.Tensor, text: torch.Tensor, group_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards ``[B, K]`` and no-choice logits ``[B]`` for images ``[B, K, D]``, briefs ``[B, D]``, groups ``[B]``."""
        b, k, _ = image.shape
        group = self.group_vectors(group_index)  # [B, h]
        text_h = self.text_proj(text)  # [B, h]
        x0 = torch.cat([
            self.image_proj(image),
            text_h[:, None].expand(b, k, -1),
            group[:, None].expand(b, k, -1),
            self.product_proj(image * text[:, None]),
        ], dim=-1)
        x0 = self.input_norm(x0)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        rewards = self.head(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)
        no_choice = self.no_choice_head(torch.cat([group, text_h], dim=-1)).squeeze(-1)
        return rewards, no_choice

    # ------------------------------------------------------------ files

    def save_pretrained(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(self.config.model_dump_json(indent=2), encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "RewardModel":
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}: not a reward model folder")
        config = RewardModelConfig.model_validate(json.loads(config_path.read_text(encoding="utf-8")))
        if config.format_version != MODEL_FORMAT_VERSION:
            raise ValueError(f"{directory}: reward model format {config.format_version} is not supported")
        embedding = config.embedding
        if embedding and not Path(embedding.model).is_absolute() and (directory / embedding.model).is_dir():
            # a shipped model names its CLIP relative to its own folder ("../clip")
            config.embedding = embedding.model_copy(update={"model": str((directory / embedding.model).resolve())})
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.to(device).eval()
