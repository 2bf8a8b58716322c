"""Shared fixtures: real Redis, real worker subprocesses, real files, real databases.

Every test gets its own GENSHOP_HOME (SQLite database and images) and its own Celery
queue name, so tests never see each other's briefs. The tiny-random model is built once
per session into a shared models folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]

TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "longest",
                       "fill_color": 255},
}


def write_tiny_open_clip(folder: Path):
    """A tiny random open_clip model saved as a folder the embedding interface loads; returns the model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from genshop.embedding import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / OPEN_CLIP_WEIGHTS))
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(TINY_OPEN_CLIP))
    return model.eval()
TEST_REDIS_URL = os.environ.get("GENSHOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def make_env(home: Path, models_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSHOP_")}
    env.update({
        "GENSHOP_HOME": str(home),
        "GENSHOP_MODELS": str(models_dir),
        "GENSHOP_PRESET": "tiny-random",
        "GENSHOP_QUEUE": f"test-{uuid.uuid4().hex[:10]}",
        "GENSHOP_ENRICH_QUEUE": f"test-enrich-{uuid.uuid4().hex[:10]}",
        "GENSHOP_EMBEDDING_MODEL": "off",
        "GENSHOP_REWARD_MODEL": "off",
        "GENSHOP_BROKER_URL": TEST_REDIS_URL,
        "GENSHOP_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(overrides)
    return env


@pytest.fixture
def env(tmp_path, models_dir, monkeypatch) -> dict[str, str]:
    """Environment for subprocesses, also applied to this process's settings."""
    from genshop.settings import get_settings

    values = make_env(tmp_path / "home", models_dir)
    for key, value in values.items():
        if key.startswith("GENSHOP_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield values
    get_settings.cache_clear()


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genshop.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def invoke_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The real click command run in this process (no interpreter start, no torch import per
    call), with ``env`` as the environment and fresh settings: for checks of input errors."""
    from click.testing import CliRunner

    from genshop.cli import main
    from genshop.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, args, env=env)
    finally:
        get_settings.cache_clear()
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def cli_json_here(args: list[str], env: dict[str, str], expect_rc: int = 0):
    """``cli_json`` run in this process (``invoke_cli``): for commands that use no Celery app
    (search, catalog import, A/B export, import and report), where a new interpreter per call
    costs seconds of start-up for nothing."""
    proc = invoke_cli(args, env)
    assert proc.returncode == expect_rc, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return json.loads(proc.stdout)


def cli_json(args: list[str], env: dict[str, str], expect_rc: int = 0) -> dict:
    proc = run_cli(args, env)
    assert proc.returncode == expect_rc, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return json.loads(proc.stdout)


def write_brief(path: Path, **fields) -> Path:
    path.write_text(json.dumps({"title": "Women's red kurta", **fields}))
    return path


class WorkerProcess:
    """``genshop worker`` in its own process group, with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, concurrency: int = 1, name: str | None = None,
                 queues: str | None = None):
        self.log = log
        args = [sys.executable, "-m", "genshop.cli", "worker", f"--concurrency={concurrency}", "--loglevel=info",
                f"--hostname={name or 'w-' + uuid.uuid4().hex[:6]}@%h", *([f"--queues={queues}"] if queues else [])]
        self.proc = subprocess.Popen(args, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> "WorkerProcess":
        def ready():
            assert self.proc.poll() is None, f"worker exited: {self.log.read_text()[-3000:]}"
            return " ready." in self.log.read_text(errors="replace")
        wait_for(ready, timeout, 0.2, "the worker to be ready")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass


def child_pids(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, read from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.add(int(stat.parent.name))
    return children


def pool_pids(worker: WorkerProcess) -> set[int]:
    """The prefork pool processes of a ``genshop worker``: children of the Celery main
    process, which is the child of the supervising ``genshop worker`` process."""
    return {pid for main in child_pids(worker.proc.pid) for pid in child_pids(main)}


@pytest.fixture
def start_worker(tmp_path):
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], concurrency: int = 1, ready: bool = True, name: str | None = None,
              queues: str | None = None) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log", concurrency, name, queues)
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.ping()
    return client


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory) -> Path:
    """A tiny random open_clip model folder, shared by the tests that need an embedder."""
    folder = tmp_path_factory.mktemp("tiny-open-clip")
    write_tiny_open_clip(folder)
    return folder


ARTIFACTS = REPO / "test-artifacts"  # screenshots of the browser tests (ignored by git)
API_TOKENS = {"alice": "token-alice", "bob": "token-bob", "carol": "token-carol", "dana": "token-dana"}


def write_random_group_adapter(folder: Path) -> Path:
    """A LoRA for the tiny-random model's UNet with random weights, so the tuned images differ from the base ones."""
    import torch
    from diffusers import UNet2DConditionModel

    from genshop.adapters import add_group_adapter, save_group_adapter
    from genshop.pipelines import ensure_weights
    from genshop.presets import load_preset

    unet = UNet2DConditionModel.from_pretrained(Path(ensure_weights(load_preset("tiny-random"))) / "unet")
    torch.manual_seed(0)
    for parameter in add_group_adapter(unet, "A"):
        torch.nn.init.normal_(parameter, std=0.5)
    return save_group_adapter(unet, "A", folder)


class ApiServer:
    """``genshop serve`` on a free port, in its own process group, with its log in a file."""

    def __init__(self, env: dict[str, str], log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "genshop.cli", "serve", "--port", self.url.rsplit(":", 1)[1]],
                                     env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> "ApiServer":
        import httpx

        def answers():
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/api/me", timeout=2).status_code == 401
            except httpx.TransportError:
                return False
        wait_for(answers, timeout, 0.2, "the API server to answer")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)


@pytest.fixture(scope="session")
def api_service(tmp_path_factory, models_dir, open_clip_dir):
    """The whole service for API and browser tests: a worker with every stage (generate, a tiny
    reward model scoring groups A and B, enrich with the tiny CLIP, a random LoRA for group A)
    and ``genshop serve``, with four designers' tokens and a limit of 2 queued briefs each."""
    from genshop.embedding import EmbeddingConfig
    from tests.test_reward_model import tiny_model

    home = tmp_path_factory.mktemp("api-home")
    reward_dir = tiny_model(embedding=EmbeddingConfig(backend="open_clip", model=str(open_clip_dir))).save_pretrained(
        home / "reward")
    env = make_env(home, models_dir, GENSHOP_REWARD_MODEL=str(reward_dir), GENSHOP_EMBEDDING_MODEL=str(open_clip_dir),
                   GENSHOP_UNDERSTANDING="off", GENSHOP_SCORE_QUEUE=f"test-score-{uuid.uuid4().hex[:10]}",
                   GENSHOP_API_TOKENS=",".join(f"{d}:{t}" for d, t in API_TOKENS.items()), GENSHOP_API_MAX_QUEUED="2")
    from genshop.settings import get_settings

    with pytest.MonkeyPatch.context() as patch:  # the tiny-random weights are built in models_dir
        patch.setenv("GENSHOP_MODELS", str(models_dir))
        get_settings.cache_clear()
        write_random_group_adapter(home / "adapters" / "A")
    get_settings.cache_clear()
    worker = WorkerProcess(env, home / "worker.log")
    server = ApiServer(env, home / "server.log").wait_ready()
    worker.wait_ready()
    yield server, env
    server.stop()
    worker.stop()
