"""The experiment's shared vocabulary: arms, listings, the manifest, and arm assignment.

Arms (``--arms "control=catalog,base=preset:mini,tuned=model:genshop-mini+A"``): a name and
a selector of the listings the arm shows for each brief of the experiment:

| selector | listings |
| --- | --- |
| ``catalog`` | real catalog products whose attributes match the brief's (article type, colour, usage, gender) |
| ``generated`` | every generated item of the brief |
| ``preset:NAME`` | generated items of briefs run with preset NAME |
| ``model:ID`` | generated items made by model ID (a base pipeline, or base plus adapter) |
| ``best-of:N`` | generated items kept from N candidates by the reward (briefs with ``best_of: N``) |

``preset:`` and ``model:`` arms list single samples only; a best-of item belongs to its
``best-of:N`` arm (and to ``generated``), so base and best-of-N are arms side by side.

The first arm is the control. Arm names are unique and weights finite, in (0, 1e6].
Arm names, like experiment ids, are short slugs: they name
files and folders, so they can never lead outside the export folder.

Assignment of customers (or any unit: a customer id, a session, a group) to arms is a
salted hash, so anyone holding the manifest reproduces it::

    u = int(sha256(f"{salt}:{unit_id}")[:16], 16) / 2**64      # uniform in [0, 1)
    arm = the first arm whose cumulative weight share exceeds u
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN)]
MAX_ARM_WEIGHT = 1e6  # weights are relative: a finite, bounded range keeps every share a real number
ASSIGNMENT = ("u = int(sha256(salt + ':' + unit_id).hexdigest()[:16], 16) / 2**64; "
              "arm = the first arm whose cumulative weight share exceeds u")


class ExperimentInputError(ValueError):
    """Bad experiment input; ``issues`` names each offending field or row. Nothing was written."""

    def __init__(self, issues: list[str], source: str = "experiment"):
        self.issues, self.source = issues, source
        shown = issues[:20] + ([f"... and {len(issues) - 20} more"] if len(issues) > 20 else [])
        super().__init__(f"invalid {source}: " + "; ".join(shown))


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Slug
    selector: str = Field(pattern=r"^(catalog|generated|preset:[^,]+|model:[^,]+|best-of:([2-9]|1[0-6]))$")
    weight: float = Field(default=1.0, gt=0, le=MAX_ARM_WEIGHT, allow_inf_nan=False)

    @property
    def kind(self) -> str:
        return self.selector.partition(":")[0]

    @property
    def value(self) -> str:
        return self.selector.partition(":")[2]

    def selects(self, model_id: str, best_of: int) -> bool:
        """Whether a generated item made by ``model_id`` from ``best_of`` candidates is this arm's."""
        if self.kind == "best-of":
            return best_of == int(self.value)
        if self.kind in ("preset", "model"):
            return best_of == 1 and (self.kind == "preset" or model_id == self.value)
        return self.kind == "generated"


def repeated_arm_names(arms: list[Arm]) -> list[str]:
    names = [arm.name for arm in arms]
    return sorted({name for name in names if names.count(name) > 1})


def _unique_arm_names(arms: list[Arm]) -> list[Arm]:
    if repeated := repeated_arm_names(arms):
        raise ValueError(f"arm names must be unique: {', '.join(map(repr, repeated))} repeated")
    return arms


Arms = Annotated[list[Arm], Field(min_length=2, description="the first arm is the control"),
                 AfterValidator(_unique_arm_names)]


def parse_arms(spec: str, weights: str | None = None) -> list[Arm]:
    """``"control=catalog,base=generated"`` (and optional weights ``"1,1"``) → arms, first = control."""
    issues, arms = [], []
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    weight_values = [w.strip() for w in weights.split(",")] if weights else ["1"] * len(parts)
    if len(parts) < 2:
        issues.append(f"arms: need at least two arms (control first), got {len(parts)}")
    if len(weight_values) != len(parts):
        issues.append(f"weights: {len(weight_values)} weights for {len(parts)} arms")
    for number, part in enumerate(parts):
        name, sep, selector = part.partition("=")
        try:
            weight = float(weight_values[number]) if number < len(weight_values) else 1.0
            arms.append(Arm(name=name.strip(), selector=selector.strip(), weight=weight))
        except ValueError as exc:
            errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else [
                {"loc": ("weight",), "msg": str(exc)}]
            for error in errors:
                issues.append(f"arms[{number}] {part!r}: {'.'.join(map(str, error['loc']))}: {error['msg']}"
                              + ("" if sep else " (expected NAME=SELECTOR)"))
    issues += [f"arms: arm name {n!r} is used twice" for n in repeated_arm_names(arms)]
    if issues:
        raise ExperimentInputError(issues, "--arms")
    return arms


def assign_arm(unit_id: str, salt: str, arms: list[Arm]) -> str:
    """The arm of one unit (customer id, session, group): deterministic given the salt."""
    u = int(hashlib.sha256(f"{salt}:{unit_id}".encode()).hexdigest()[:16], 16) / 2**64
    total = sum(arm.weight for arm in arms)
    cumulative = 0.0
    for arm in arms:
        cumulative += arm.weight / total
        if u < cumulative:
            return arm.name
    return arms[-1].name


class Listing(BaseModel):
    """One row of an export's listings file: what the shop puts on its page."""

    listing_id: str
    item_id: str = Field(description="the generated item's id, or the catalog product's")
    arm: str
    kind: Literal["generated", "catalog"]
    brief_id: str = Field(description="the brief this listing answers (for catalog listings: the brief it was matched to)")
    brief: str = Field(description="the brief's title: listings of all arms for one brief compete for the same customers")
    title: str
    description: str
    category_path: list[str]
    attributes: dict[str, str]
    image: str = Field(description="image file, relative to the export folder")
    image_sha256: str
    scores: dict[str, float] = Field(description="reward per customer group (generated items that were scored)")
    model_id: str
    model_revision: str
    reward_model: str | None = None


class ManifestItem(BaseModel):
    arm: str
    brief: str
    brief_colour: str | None = None
    image: str
    attributes: dict[str, str]


class ManifestArm(Arm):
    listings: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    experiment_id: Slug
    created_at: datetime
    salt: str
    unit: str = "customer"
    assignment: str = ASSIGNMENT
    control: str
    arms: list[ManifestArm]
    groups: list[str]
    briefs: list[str] = Field(description="brief ids")
    listings_file: str
    items: dict[str, ManifestItem] = Field(description="listing id → its arm, brief, image and attributes")
    model_versions: dict[str, list[str]] = Field(description="arm → the model ids@revisions of its listings")
    reward_models: list[str]
    files: dict[str, str] = Field(description="every other file of the export, relative path → SHA-256")

    def arm(self, name: str) -> ManifestArm:
        return next(arm for arm in self.arms if arm.name == name)


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing any path that would lead outside ``root``."""
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or Path(relative).is_absolute():
        raise ExperimentInputError([f"path {relative!r} leads outside {root}"], "path")
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(export_dir: str | Path, verify: bool = True) -> Manifest:
    """An export's manifest; with ``verify``, every file's checksum is checked."""
    export_dir = Path(export_dir)
    manifest = Manifest.model_validate(json.loads((export_dir / MANIFEST_FILE).read_text()))
    if verify:
        bad = [name for name, digest in manifest.files.items()
               if not inside(export_dir, name).is_file() or file_sha256(inside(export_dir, name)) != digest]
        if bad:
            raise ExperimentInputError([f"{name}: missing or changed since export" for name in bad], str(export_dir))
    return manifest
