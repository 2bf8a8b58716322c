"""The Brief: what a designer asks for, validated field by field.

A brief file is YAML or JSON holding one mapping. Anything wrong with it (unknown
field, wrong type, out-of-range or non-finite value (NaN, ±Infinity), empty title, bytes that are not UTF-8, a file
over ``MAX_BRIEF_FILE_BYTES``) raises ``BriefError`` listing every offending field, so
callers can print them and exit 2 before anything is stored or enqueued.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from genshop.presets import Preset

MAX_BRIEF_FILE_BYTES = 64 * 1024
MAX_SEED = 2**32 - 1

GroupId = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class Brief(BaseModel):
    """A design brief. Optional generation settings fall back to the preset's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)  # NaN/±Infinity: refused

    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)] = ""
    article_type: ShortText | None = None
    colour: ShortText | None = None
    usage: ShortText | None = None
    gender: ShortText | None = None
    groups: list[GroupId] = Field(default_factory=list, max_length=32, description="target customer group ids")
    variants: int = Field(default=4, ge=1, le=64)
    best_of: int = Field(default=1, ge=1, le=16, description="candidates generated per variant; each variant "
                         "keeps its target group's top by the reward model (best-of-N serving)")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    width: int | None = Field(default=None, ge=8, le=2048)
    height: int | None = Field(default=None, ge=8, le=2048)
    negative_prompt: Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)] | None = None
    client_reference: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)] | None = None
    priority: Literal["normal", "high"] = Field(default="normal", description="high: served before every normal "
                                                "brief (`submit --front`); fair among designers within each")

    @field_validator("title", "description", "article_type", "colour", "usage", "gender", "negative_prompt",
                     "client_reference")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:  # PostgreSQL cannot store it; no prompt needs it
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[str]) -> list[str]:
        if len(set(groups)) != len(groups):
            raise ValueError("group ids must be unique")
        return groups


@dataclass(frozen=True)
class FieldIssue:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class BriefError(ValueError):
    """Invalid brief input; ``issues`` names each offending field."""

    def __init__(self, issues: list[FieldIssue], source: str = "brief"):
        self.issues = issues
        self.source = source
        super().__init__(f"invalid {source}: " + "; ".join(str(i) for i in issues))


def _issues_from_validation(exc: ValidationError) -> list[FieldIssue]:
    issues = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "(brief)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {error['input']!r})"
        issues.append(FieldIssue(field, message))
    return issues


def limit_issues(values: dict, preset: Preset) -> list[FieldIssue]:
    """The preset's limits on the sizes and step count that ``values`` sets (integers only;
    other types are the schema's to reject)."""
    limits, issues = preset.limits, []
    for field in ("width", "height"):
        value = values.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if not limits.min_size <= value <= limits.max_size:
            issues.append(FieldIssue(field, f"{value} is outside {limits.min_size}..{limits.max_size} for preset {preset.name!r}"))
        elif value % limits.size_multiple:
            issues.append(FieldIssue(field, f"{value} is not a multiple of {limits.size_multiple}"))
    steps = values.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > limits.max_steps:
        issues.append(FieldIssue("steps", f"{steps} exceeds {limits.max_steps} for preset {preset.name!r}"))
    return issues


def parse_brief(data: Any, source: str = "brief", preset: Preset | None = None) -> Brief:
    """Validate one brief. With a ``preset``, its limits are checked in the same pass, so one
    error names every offending field (schema and limits alike) before any model loads."""
    if not isinstance(data, dict):
        raise BriefError([FieldIssue("(brief)", f"expected a mapping of fields, got {type(data).__name__}")], source)
    try:
        brief = Brief.model_validate(data)
    except ValidationError as exc:
        issues = _issues_from_validation(exc)
        named = {issue.field for issue in issues}
        if preset is not None:
            issues += [issue for issue in limit_issues(data, preset) if issue.field not in named]
        raise BriefError(issues, source) from None
    if preset is not None and (issues := limit_issues(brief.model_dump(), preset)):
        raise BriefError(issues, source)
    return brief


def load_brief_file(path: str | Path, preset: Preset | None = None) -> Brief:
    """Read and validate one brief from a YAML or JSON file (and the ``preset``'s limits, if given)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise BriefError([FieldIssue("(file)", "no such file")], source)
    size = path.stat().st_size
    if size > MAX_BRIEF_FILE_BYTES:
        raise BriefError([FieldIssue("(file)", f"file is {size} bytes; the limit is {MAX_BRIEF_FILE_BYTES}")], source)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BriefError([FieldIssue("(file)", f"not UTF-8 text (invalid byte at offset {exc.start})")], source) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise BriefError([FieldIssue("(file)", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")],
                         source) from None
    except yaml.YAMLError as exc:
        raise BriefError([FieldIssue("(file)", f"not valid YAML: {_yaml_problem(exc)}")], source) from None
    return parse_brief(data, source, preset)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, as ``<problem> (line L, column C)``."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def resolve_brief(brief: Brief, preset: Preset, rng: random.Random | None = None) -> Brief:
    """Fill unset generation settings from the preset and check them against its limits.

    The result has every setting pinned (a seed is drawn if none was given), so the
    stored brief regenerates the same images.
    """
    d = preset.defaults
    resolved = brief.model_copy(update={
        "steps": brief.steps if brief.steps is not None else d.steps,
        "guidance_scale": brief.guidance_scale if brief.guidance_scale is not None else d.guidance_scale,
        "width": brief.width if brief.width is not None else d.width,
        "height": brief.height if brief.height is not None else d.height,
        "negative_prompt": brief.negative_prompt if brief.negative_prompt is not None else d.negative_prompt,
        "seed": brief.seed if brief.seed is not None else (rng or random.SystemRandom()).randint(0, MAX_SEED),
    })
    if issues := limit_issues(resolved.model_dump(), preset):
        raise BriefError(issues)
    return resolved
