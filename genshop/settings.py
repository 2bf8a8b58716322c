"""Process-wide settings, read from the environment once.

Every knob a deployment turns lives here, with the default that makes a fresh
checkout work offline: a home folder for images, models and the SQLite database,
the Redis URLs for Celery, and the preset the workers load.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "genshop-mini"
DEFAULT_TAXONOMY = REPO_ROOT / "configs" / "understanding" / "taxonomy.yaml"
OFF = "off"
DESIGNER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    home: Path = Field(description="GENSHOP_HOME: images, built models, the default SQLite database")
    models_dir: Path = Field(description="GENSHOP_MODELS: where presets with random_init are built (default HOME/models)")
    database_url: str = Field(description="GENSHOP_DATABASE_URL: any SQLAlchemy URL (sqlite, postgresql+psycopg)")
    images_url: str | None = Field(default=None, description="GENSHOP_IMAGES_URL: where images live: unset (files "
                                   "under GENSHOP_HOME), file:///folder, or s3://bucket/prefix (AWS_* variables)")
    index_url: str | None = Field(default=None, description="GENSHOP_INDEX_URL: http://host:port of `genshop index "
                                  "serve`, the one index of a deployment; unset: the faiss index in GENSHOP_INDEX_DIR")
    broker_url: str = Field(description="GENSHOP_BROKER_URL: Celery broker (Redis)")
    result_backend: str = Field(description="GENSHOP_RESULT_BACKEND: Celery result backend, defaults to the broker URL")
    preset: str = Field(description="GENSHOP_PRESET: the generation preset workers load")
    configs_dir: Path = Field(description="GENSHOP_CONFIGS: folder of YAML presets and model configs")
    queue: str = Field(description="GENSHOP_QUEUE: the Celery queue for generation tasks")
    score_queue: str = Field(description="GENSHOP_SCORE_QUEUE: the Celery queue for reward scoring tasks")
    reward_model: Path | None = Field(description="GENSHOP_REWARD_MODEL: reward model folder (default: the "
                                                  "bundle's); 'off': no scoring")
    best_of_reward: Path | None = Field(description="GENSHOP_BEST_OF_REWARD: the reward that keeps a best-of-N "
                                                    "brief's top candidates: a CLIP reward model or an attribute "
                                                    "reward folder (default: the bundle's attribute reward "
                                                    "where the reward model and the enrich stage are the "
                                                    "bundle's, else GENSHOP_REWARD_MODEL)")
    enrich_queue: str = Field(description="GENSHOP_ENRICH_QUEUE: the Celery queue for enrich tasks")
    embedding_model: Path | None = Field(description="GENSHOP_EMBEDDING_MODEL: CLIP folder of the enrich stage "
                                                     "(default: the bundle's); 'off': no enrich stage")
    understanding: Path | None = Field(description="GENSHOP_UNDERSTANDING: folder from `genshop understand fit` "
                                                   "(calibration, top-tuned heads; default: the bundle's); 'off': none")
    classifier: str = Field(description="GENSHOP_CLASSIFIER: 'zero-shot' (default) or 'top-tuned'")
    index_dir: Path = Field(description="GENSHOP_INDEX_DIR: the vector index folder (default HOME/index)")
    adapters_dir: Path | None = Field(description="GENSHOP_ADAPTERS: group LoRAs, one folder per group id "
                                                  "(default HOME/adapters when it exists, else the bundle's adapters/); "
                                                  "'off': base model for every group")
    device: str = Field(description="GENSHOP_DEVICE: torch device, 'auto' picks cuda when available")
    soft_time_limit: int = Field(description="GENSHOP_SOFT_TIME_LIMIT: seconds before a task is asked to stop")
    hard_time_limit: int = Field(description="GENSHOP_HARD_TIME_LIMIT: seconds before a task's process is killed")
    visibility_timeout: int = Field(description="GENSHOP_VISIBILITY_TIMEOUT: seconds before an unacked task is redelivered")
    max_attempts: int = Field(description="GENSHOP_MAX_ATTEMPTS: deliveries of one brief before it is failed")
    requeue_after: int = Field(description="GENSHOP_REQUEUE_AFTER: seconds untouched before a worker requeues a brief")
    lease_timeout: int = Field(description="GENSHOP_LEASE_TIMEOUT: seconds without a heartbeat before a running "
                                           "brief's lease lapses and another delivery may take it over")
    gather_window_ms: int = Field(default=0, ge=0, description="GENSHOP_GATHER_WINDOW_MS: the longest a task "
                                  "waits in a worker with a free pool process for others to share its pool job "
                                  "(0: none; tasks that arrive while the pool is busy gather anyway)")
    gather_max: int = Field(default=8, ge=1, le=64, description="GENSHOP_GATHER_MAX: tasks of one queue done "
                            "together (briefs denoised in shared calls, one CLIP forward); 1: one at a time")
    process_start_timeout: int = Field(description="GENSHOP_PROCESS_START_TIMEOUT: seconds a new pool process may "
                                                   "take to load its models before Celery kills it")
    api_tokens: dict[str, SecretStr] = Field(description="designer → API token, from GENSHOP_API_TOKENS_FILE (YAML "
                                                         "mapping) and GENSHOP_API_TOKENS ('alice:TOKEN,bob:TOKEN')")
    api_max_queued: int = Field(description="GENSHOP_API_MAX_QUEUED: queued briefs one designer may have")
    api_max_upload_bytes: int = Field(description="GENSHOP_API_MAX_UPLOAD_BYTES: largest request body (image uploads)")
    api_queue_admins: frozenset[str] = Field(default=frozenset(), description="GENSHOP_API_QUEUE_ADMINS: designers "
                                             "who may pause and resume the whole queue through the API (comma-separated)")
    api_public_docs: bool = Field(default=False, description="GENSHOP_API_PUBLIC_DOCS: 'true' serves /docs and "
                                                             "/openapi.json without a token (default: a token is needed)")
    api_cookie_secure: bool | None = Field(default=None, description="GENSHOP_API_COOKIE_SECURE: 'true'/'false' "
                                           "forces the session cookie's Secure flag; default 'auto': set on https requests")

    @property
    def worker_queues(self) -> list[str]:
        """The queues a worker serves when not told: generate, score and enrich."""
        return [self.queue, self.score_queue, self.enrich_queue]



def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def default_adapters(home: Path) -> Path:
    """HOME/adapters when the user has put LoRAs there, else the bundle's (one per group, tuned on mini)."""
    own = home / "adapters"
    return own if own.is_dir() else BUNDLE_DIR / "adapters"


def _optional_path(name: str, default: Path | None) -> Path | None:
    value = _env(name, str(default) if default else "")
    return None if value in ("", OFF) else Path(value).expanduser().resolve()


def _flag(name: str, default: str) -> bool | None:
    """'true'/'false' (1/0, yes/no, on/off) → bool, 'auto' → None."""
    value = _env(name, default).lower()
    if value == "auto":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: {value!r} is not true, false or auto")


def _api_tokens() -> dict[str, SecretStr]:
    """Designer → token: the YAML file's mapping, then the variable's ``designer:token`` pairs."""
    tokens: dict[str, str] = {}
    if file := _env("GENSHOP_API_TOKENS_FILE", ""):
        loaded = yaml.safe_load(Path(file).expanduser().read_text()) or {}
        if not isinstance(loaded, dict) or not all(isinstance(v, str) and v for v in loaded.values()):
            raise ValueError(f"GENSHOP_API_TOKENS_FILE {file}: expected a mapping of designer → token")
        tokens.update({str(k): v for k, v in loaded.items()})
    for pair in filter(None, (p.strip() for p in _env("GENSHOP_API_TOKENS", "").split(","))):
        designer, sep, token = pair.partition(":")
        if not sep or not designer.strip() or not token.strip():
            raise ValueError(f"GENSHOP_API_TOKENS: {pair.split(':')[0]!r}... is not 'designer:token'")
        tokens[designer.strip()] = token.strip()
    if bad := [d for d in tokens if not re.fullmatch(DESIGNER_NAME, d)]:
        raise ValueError(f"API tokens: designer names must be 1-64 letters, digits, '.', '_' or '-': {bad}")
    return {designer: SecretStr(token) for designer, token in tokens.items()}


@cache
def get_settings() -> Settings:
    """Settings from the environment; cached, so set variables before the first call."""
    home = Path(_env("GENSHOP_HOME", str(Path.home() / ".genshop"))).expanduser().resolve()
    broker = _env("GENSHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
    reward_model = _optional_path("GENSHOP_REWARD_MODEL", BUNDLE_DIR / "reward")
    bundle_models = not any(_env(name, "") for name in ("GENSHOP_REWARD_MODEL", "GENSHOP_EMBEDDING_MODEL",
                                                        "GENSHOP_UNDERSTANDING"))
    # the bundle's attribute reward reads images through the bundle's enrich stage
    best_of_reward = BUNDLE_DIR / "attribute-reward" if bundle_models else reward_model
    hard = int(_env("GENSHOP_HARD_TIME_LIMIT", "1800"))
    visibility = int(_env("GENSHOP_VISIBILITY_TIMEOUT", str(2 * hard)))
    return Settings(
        home=home,
        models_dir=Path(_env("GENSHOP_MODELS", str(home / "models"))).expanduser().resolve(),
        database_url=_env("GENSHOP_DATABASE_URL", f"sqlite:///{home / 'genshop.db'}"),
        images_url=_env("GENSHOP_IMAGES_URL", "") or None,
        index_url=_env("GENSHOP_INDEX_URL", "").rstrip("/") or None,
        broker_url=broker,
        result_backend=_env("GENSHOP_RESULT_BACKEND", broker),
        preset=_env("GENSHOP_PRESET", "mini"),
        configs_dir=Path(_env("GENSHOP_CONFIGS", str(REPO_ROOT / "configs"))).resolve(),
        queue=_env("GENSHOP_QUEUE", "generate"),
        score_queue=_env("GENSHOP_SCORE_QUEUE", "score"),
        reward_model=reward_model,
        best_of_reward=_optional_path("GENSHOP_BEST_OF_REWARD", best_of_reward),
        enrich_queue=_env("GENSHOP_ENRICH_QUEUE", "enrich"),
        embedding_model=_optional_path("GENSHOP_EMBEDDING_MODEL", BUNDLE_DIR / "clip"),
        understanding=_optional_path("GENSHOP_UNDERSTANDING", BUNDLE_DIR / "understanding"),
        classifier=_env("GENSHOP_CLASSIFIER", "zero-shot"),
        index_dir=Path(_env("GENSHOP_INDEX_DIR", str(home / "index"))).expanduser().resolve(),
        adapters_dir=_optional_path("GENSHOP_ADAPTERS", default_adapters(home)),
        device=_env("GENSHOP_DEVICE", "auto"),
        soft_time_limit=int(_env("GENSHOP_SOFT_TIME_LIMIT", str(max(1, hard - min(60, hard // 10))))),
        hard_time_limit=hard,
        visibility_timeout=visibility,
        requeue_after=int(_env("GENSHOP_REQUEUE_AFTER", str(visibility + visibility // 2))),
        max_attempts=int(_env("GENSHOP_MAX_ATTEMPTS", "2")),
        lease_timeout=int(_env("GENSHOP_LEASE_TIMEOUT", str(max(5, min(60, visibility // 3))))),
        process_start_timeout=int(_env("GENSHOP_PROCESS_START_TIMEOUT", "300")),
        gather_window_ms=int(_env("GENSHOP_GATHER_WINDOW_MS", "0")),
        gather_max=int(_env("GENSHOP_GATHER_MAX", "8")),
        api_tokens=_api_tokens(),
        api_max_queued=int(_env("GENSHOP_API_MAX_QUEUED", "10")),
        api_max_upload_bytes=int(_env("GENSHOP_API_MAX_UPLOAD_BYTES", str(10 * 1024 * 1024))),
        api_queue_admins=frozenset(filter(None, (d.strip() for d in _env("GENSHOP_API_QUEUE_ADMINS", "").split(",")))),
        api_public_docs=bool(_flag("GENSHOP_API_PUBLIC_DOCS", "false")),
        api_cookie_secure=_flag("GENSHOP_API_COOKIE_SECURE", "auto"),
    )
