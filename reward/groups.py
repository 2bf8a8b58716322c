"""Customer groups as a reward model may see them: an id, a name and a few descriptive features.

``configs/groups.yaml`` has two top-level sections that are read by different code on purpose:

- ``groups:`` what models may know about a group (this module): ``id``, ``name``, and the
  optional features ``age_band``, ``region``, ``taste_tags``;
- ``simulator:`` the hidden utilities ``genshop simulate`` draws choices from. Only
  ``reward.simulator`` reads it; a reward model never sees it.

The id ``population`` is reserved: it names the group-agnostic "everyone" a reward model
falls back to for a group it does not know.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

POPULATION = "population"
GROUPS_FORMAT_VERSION = 1


class GroupsConfigError(ValueError):
    """The groups file cannot be used; the message names the file and the problem."""


class Group(BaseModel):
    """One customer group: its id and the features a model may condition on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    name: str = ""
    age_band: str | None = None
    region: str | None = None
    taste_tags: tuple[str, ...] = ()

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == POPULATION:
            raise ValueError(f"'{POPULATION}' is reserved for the group-agnostic fallback")
        return value

    def feature_tokens(self) -> list[str]:
        """The group's features as tokens such as ``age_band=18-24`` or ``taste=streetwear``."""
        tokens = []
        if self.age_band:
            tokens.append(f"age_band={self.age_band}")
        if self.region:
            tokens.append(f"region={self.region}")
        tokens += [f"taste={tag}" for tag in self.taste_tags]
        return tokens


class GroupsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = GROUPS_FORMAT_VERSION
    groups: list[Group] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _unique_ids(cls, groups: list[Group]) -> list[Group]:
        seen = set()
        for group in groups:
            if group.id in seen:
                raise ValueError(f"duplicate group id {group.id!r}")
            seen.add(group.id)
        return groups


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GroupsConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise GroupsConfigError(f"{path}: expected a mapping with a 'groups' list")
    return data


def load_groups(path: str | Path) -> list[Group]:
    """The ``groups:`` section of a groups file (the ``simulator:`` section is ignored here)."""
    data = read_yaml(path)
    try:
        parsed = GroupsFile(version=data.get("version", GROUPS_FORMAT_VERSION), groups=data.get("groups") or [])
    except ValidationError as exc:
        issues = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise GroupsConfigError(f"{path}: {issues}") from None
    if parsed.version != GROUPS_FORMAT_VERSION:
        raise GroupsConfigError(f"{path}: groups format version {parsed.version} is not supported "
                                f"(expected {GROUPS_FORMAT_VERSION})")
    return parsed.groups


def feature_vocabulary(groups: Sequence[Group]) -> list[str]:
    """Every feature token any group has, sorted: the columns of the group feature matrix."""
    return sorted({token for group in groups for token in group.feature_tokens()})
