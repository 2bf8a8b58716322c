"""The catalog's taxonomy and attribute families, as data (``configs/understanding/taxonomy.yaml``).

The taxonomy is a tree: master category → sub category → article type. Each article
type names its parents, so a prediction at the leaf is a whole path. Attribute families
(colour, usage, gender, and any family added to the file) list their values and the
master categories they apply to. Every label carries its count in the catalog it was
built from: the counts are the label prior of zero-shot classification.

``taxonomy_from_catalog`` builds the file from a labelled catalog (each article type
under its most frequent parents; the catalog's rare mislabelled parents are dropped).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

LEVELS = ("master_category", "sub_category", "article_type")
UNKNOWN_VALUES = {"", "Unknown", "NA", "None"}

DEFAULT_TEMPLATES: dict[str, list[str]] = {
    "master_category": ["a photo of {}.", "a product photo of {}.", "{}", "an image of {}.", "{} products"],
    "sub_category": ["a photo of {}.", "a product photo of {}.", "{}", "an image of {}."],
    "article_type": ["a photo of {}.", "a product photo of {}.", "{}", "an image of {}.", "a photo of {} for sale."],
    "colour": ["a photo of a {} product.", "a {} product", "{} colour", "{}", "an image of a {} item."],
    "usage": ["a photo of {} wear.", "{} wear", "a {} product", "{}"],
    "gender": ["a product for {}.", "a photo of a product for {}.", "for {}", "{}"],
}


class ArticleType(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    sub_category: str
    master_category: str
    count: int = Field(default=0, ge=0)


class AttributeFamily(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="also the catalog column it is read from")
    values: dict[str, int] = Field(min_length=2, description="value → count in the source catalog")
    templates: list[str] = Field(min_length=1, description="prompt ensemble; {} is the value")
    applies_to: list[str] = Field(default_factory=list, description="master categories; empty = all")

    def applies(self, master_category: str) -> bool:
        return not self.applies_to or master_category in self.applies_to


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = ""
    templates: dict[str, list[str]] = Field(default_factory=lambda: {k: list(DEFAULT_TEMPLATES[k]) for k in LEVELS})
    article_types: list[ArticleType] = Field(min_length=1)
    attributes: list[AttributeFamily] = Field(default_factory=list)
    title_template: str = Field(default="{gender} {colour} {usage} {article_type}",
                                description="generated listing title; a missing or skipped field drops out")

    @model_validator(mode="after")
    def _check(self) -> "Taxonomy":
        names = [a.name for a in self.article_types]
        if len(set(names)) != len(names):
            raise ValueError("article_types: names must be unique")
        missing = [level for level in LEVELS if level not in self.templates]
        if missing:
            raise ValueError(f"templates: missing levels {missing}")
        return self

    def labels(self, level: str) -> list[str]:
        """The labels of one level, sorted."""
        return sorted({getattr(a, level) if level != "article_type" else a.name for a in self.article_types})

    def counts(self, level: str) -> dict[str, int]:
        totals: dict[str, int] = {}
        for article in self.article_types:
            label = article.name if level == "article_type" else getattr(article, level)
            totals[label] = totals.get(label, 0) + article.count
        return totals

    def family(self, name: str) -> AttributeFamily:
        for family in self.attributes:
            if family.name == name:
                return family
        raise KeyError(f"no attribute family {name!r}; known: {[f.name for f in self.attributes]}")


def load_taxonomy(path: str | Path) -> Taxonomy:
    return Taxonomy.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def save_taxonomy(taxonomy: Taxonomy, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(taxonomy.model_dump(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _applies_to(frame: pd.DataFrame, column: str, min_known: float, min_second_share: float) -> list[str]:
    """Master categories where the attribute is mostly known and takes more than one value."""
    masters = []
    for master, rows in frame.groupby("master_category"):
        known = rows[column][~rows[column].isin(UNKNOWN_VALUES)]
        shares = known.value_counts(normalize=True)
        if len(known) >= min_known * len(rows) and len(shares) > 1 and shares.iloc[1] >= min_second_share:
            masters.append(str(master))
    return sorted(masters)


def taxonomy_from_catalog(frame: pd.DataFrame, source: str, families: tuple[str, ...] = ("colour", "usage", "gender"),
                          min_count: int = 1, min_known: float = 0.5, min_second_share: float = 0.02) -> Taxonomy:
    """The taxonomy and attribute families of a labelled catalog, with label counts."""
    article_types = []
    for name, rows in frame.groupby("article_type"):
        if name in UNKNOWN_VALUES or len(rows) < min_count:
            continue
        article_types.append(ArticleType(name=str(name), sub_category=str(rows["sub_category"].mode().iloc[0]),
                                         master_category=str(rows["master_category"].mode().iloc[0]),
                                         count=len(rows)))
    attributes = []
    for column in families:
        counts = frame[column][~frame[column].isin(UNKNOWN_VALUES)].value_counts()
        attributes.append(AttributeFamily(name=column, values={str(k): int(v) for k, v in counts.items()},
                                          templates=list(DEFAULT_TEMPLATES.get(column, ["a photo of a {} product."])),
                                          applies_to=_applies_to(frame, column, min_known, min_second_share)))
    return Taxonomy(source=source, article_types=article_types, attributes=attributes)
