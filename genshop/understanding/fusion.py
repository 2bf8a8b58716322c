"""The multimodal product vector (the CLIP-ITA idea): image, title and attributes fused in CLIP space.

Each modality's frozen CLIP embedding gets its own linear projection (initialised to the
identity, so the untrained fusion is the plain sum); the product vector is the normalised
sum of the projected, normalised modalities, in the same space as CLIP text queries. The
projections are fitted so that a product's vector is closest to the text embedding of its
own category (softmax over every article type's prompt-ensemble embedding), which is what
category-to-image retrieval asks: the query "kurtas" should rank every kurta first.

Modalities that an item lacks (a generated item has no real title) are left out of its sum.
Saved as ``fusion.safetensors`` + ``fusion_config.json`` in the understanding folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from genshop.understanding.taxonomy import UNKNOWN_VALUES

MODALITIES = ("image", "title", "attributes")
FUSION_CONFIG = "fusion_config.json"
FUSION_WEIGHTS = "fusion.safetensors"


def attribute_text(attributes: Mapping[str, str]) -> str:
    """The attribute modality as text: "Red, Women" (values of the known attributes, in a fixed order)."""
    return ", ".join(value for key, value in sorted(attributes.items()) if value and value not in UNKNOWN_VALUES)


def modality_embeddings(embedder, image_embeddings: np.ndarray, titles: Sequence[str],
                        attributes: Sequence[Mapping[str, str]]) -> dict[str, np.ndarray]:
    """The three modalities of items: their image embeddings (given), title and attribute-text embeddings."""
    return {"image": image_embeddings, "title": embedder.embed_texts(list(titles)),
            "attributes": embedder.embed_texts([attribute_text(a) for a in attributes])}


class ProductFusion(torch.nn.Module):
    def __init__(self, dim: int, modalities: tuple[str, ...] = MODALITIES):
        super().__init__()
        self.dim, self.modalities = dim, modalities
        self.projections = torch.nn.ModuleDict({m: torch.nn.Linear(dim, dim, bias=False) for m in modalities})
        for projection in self.projections.values():
            torch.nn.init.eye_(projection.weight)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.projections[m](torch.nn.functional.normalize(features[m], dim=-1))
                 for m in self.modalities if m in features]
        return torch.nn.functional.normalize(torch.stack(parts).sum(dim=0), dim=-1)

    @torch.no_grad()
    def fuse(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return self({m: torch.from_numpy(np.asarray(v, dtype=np.float32)) for m, v in features.items()}).numpy()

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / FUSION_WEIGHTS))
        (folder / FUSION_CONFIG).write_text(json.dumps({"dim": self.dim, "modalities": list(self.modalities)}),
                                            encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ProductFusion":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / FUSION_CONFIG).read_text(encoding="utf-8"))
        fusion = cls(config["dim"], tuple(config["modalities"]))
        fusion.load_state_dict(load_file(str(folder / FUSION_WEIGHTS)))
        return fusion.eval()


def fit_fusion(features: Mapping[str, np.ndarray], targets: np.ndarray, class_embeddings: np.ndarray,
               logit_scale: float, steps: int = 300, learning_rate: float = 3e-3, weight_decay: float = 1e-3,
               batch_size: int = 1024, seed: int = 0) -> ProductFusion:
    """Fit the projections: cross-entropy of each product against every category's text embedding.

    Each batch drops one random modality from a random third of its rows, so the fusion
    also works for items without a title. The identity initialisation is pulled back by
    ``weight_decay`` on the difference from the identity.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = class_embeddings.shape[1]
    fusion = ProductFusion(dim, tuple(m for m in MODALITIES if m in features))
    tensors = {m: torch.from_numpy(np.asarray(v, dtype=np.float32)) for m, v in features.items()}
    classes = torch.from_numpy(np.asarray(class_embeddings, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(targets)).long()
    keep = labels >= 0
    tensors, labels = {m: v[keep] for m, v in tensors.items()}, labels[keep]
    optimizer = torch.optim.AdamW(fusion.parameters(), lr=learning_rate, weight_decay=0.0)
    identity = torch.eye(dim)
    for _ in range(steps):
        rows = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=generator)
        batch = {m: v[rows] for m, v in tensors.items()}
        dropped = fusion.modalities[int(torch.randint(len(fusion.modalities), (1,), generator=generator))]
        if dropped != "image" and len(fusion.modalities) > 1:
            drop = torch.rand(len(rows), generator=generator) < 1 / 3
            batch[dropped] = torch.where(drop[:, None], torch.zeros_like(batch[dropped]), batch[dropped])
        logits = logit_scale * fusion(batch) @ classes.T
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        loss = loss + weight_decay * sum((p.weight - identity).square().sum() for p in fusion.projections.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return fusion.eval()


def category_retrieval_map(product_vectors: np.ndarray, labels: np.ndarray, class_embeddings: np.ndarray,
                           class_labels: list[str]) -> float:
    """Mean average precision of category → product retrieval, over the categories present in ``labels``."""
    labels = np.asarray(labels, dtype=object)
    precisions = []
    for c, name in enumerate(class_labels):
        relevant = labels == name
        if not relevant.any():
            continue
        order = np.argsort(-(product_vectors @ class_embeddings[c]), kind="stable")
        hits = relevant[order]
        ranks = np.flatnonzero(hits) + 1
        precisions.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    return float(np.mean(precisions)) if precisions else 0.0
