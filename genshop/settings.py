"""Process-wide settings, read from the environment once.

Every knob a deployment turns lives here, with the default that makes a fresh
checkout work offline: a home folder for images, models and the SQLite database,
the Redis URLs for Celery, and the preset the workers load.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    home: Path = Field(description="GENSHOP_HOME: images, built models, the default SQLite database")
    models_dir: Path = Field(description="GENSHOP_MODELS: where presets with random_init are built (default HOME/models)")
    database_url: str = Field(description="GENSHOP_DATABASE_URL: any SQLAlchemy URL (sqlite, postgresql+psycopg)")
    broker_url: str = Field(description="GENSHOP_BROKER_URL: Celery broker (Redis)")
    result_backend: str = Field(description="GENSHOP_RESULT_BACKEND: Celery result backend, defaults to the broker URL")
    preset: str = Field(description="GENSHOP_PRESET: the generation preset workers load")
    configs_dir: Path = Field(description="GENSHOP_CONFIGS: folder of YAML presets and model configs")
    queue: str = Field(description="GENSHOP_QUEUE: the Celery queue for generation tasks")
    score_queue: str = Field(description="GENSHOP_SCORE_QUEUE: the Celery queue for reward scoring tasks")
    reward_model: Path | None = Field(description="GENSHOP_REWARD_MODEL: reward model folder; empty: no scoring")
    device: str = Field(description="GENSHOP_DEVICE: torch device, 'auto' picks cuda when available")
    soft_time_limit: int = Field(description="GENSHOP_SOFT_TIME_LIMIT: seconds before a task is asked to stop")
    hard_time_limit: int = Field(description="GENSHOP_HARD_TIME_LIMIT: seconds before a task's process is killed")
    visibility_timeout: int = Field(description="GENSHOP_VISIBILITY_TIMEOUT: seconds before an unacked task is redelivered")
    max_attempts: int = Field(description="GENSHOP_MAX_ATTEMPTS: deliveries of one brief before it is failed")
    requeue_after: int = Field(description="GENSHOP_REQUEUE_AFTER: seconds untouched before a worker requeues a brief")


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


@cache
def get_settings() -> Settings:
    """Settings from the environment; cached, so set variables before the first call."""
    home = Path(_env("GENSHOP_HOME", str(Path.home() / ".genshop"))).expanduser().resolve()
    broker = _env("GENSHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
    hard = int(_env("GENSHOP_HARD_TIME_LIMIT", "1800"))
    visibility = int(_env("GENSHOP_VISIBILITY_TIMEOUT", str(2 * hard)))
    return Settings(
        home=home,
        models_dir=Path(_env("GENSHOP_MODELS", str(home / "models"))).expanduser().resolve(),
        database_url=_env("GENSHOP_DATABASE_URL", f"sqlite:///{home / 'genshop.db'}"),
        broker_url=broker,
        result_backend=_env("GENSHOP_RESULT_BACKEND", broker),
        preset=_env("GENSHOP_PRESET", "mini"),
        configs_dir=Path(_env("GENSHOP_CONFIGS", str(REPO_ROOT / "configs"))).resolve(),
        queue=_env("GENSHOP_QUEUE", "generate"),
        score_queue=_env("GENSHOP_SCORE_QUEUE", "score"),
        reward_model=Path(os.environ["GENSHOP_REWARD_MODEL"]).resolve() if os.environ.get("GENSHOP_REWARD_MODEL") else None,
        device=_env("GENSHOP_DEVICE", "auto"),
        soft_time_limit=int(_env("GENSHOP_SOFT_TIME_LIMIT", str(max(1, hard - min(60, hard // 10))))),
        hard_time_limit=hard,
        visibility_timeout=visibility,
        requeue_after=int(_env("GENSHOP_REQUEUE_AFTER", str(visibility + visibility // 2))),
        max_attempts=int(_env("GENSHOP_MAX_ATTEMPTS", "2")),
    )
