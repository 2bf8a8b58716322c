"""Shared fixtures: real Redis, real worker subprocesses, real files, real databases.

Every test gets its own GENSHOP_HOME (SQLite database and images) and its own Celery
queue name, so tests never see each other's briefs. The tiny presets' models are built
once per run into one models folder, shared by the pytest-xdist processes (built under a
file lock by the first that needs them).

Torch threads: ``GENSHOP_TEST_TORCH_THREADS`` (default 1) is the intra-op thread count of
the test process (reset before every test) and of every process the tests start (workers,
``--local`` CLI runs, plain-diffusers scripts), so the numeric tolerances can be checked
with 1 and with 2 threads: ``GENSHOP_TEST_TORCH_THREADS=2 tests/run tests/test_reward_model.py``.
"""

from __future__ import annotations

import fcntl
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


TINY_OPEN_CLIP_VIT = {  # open_clip's VisionTransformer image tower: two blocks, 8-pixel patches
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": TINY_OPEN_CLIP["model_cfg"]["text_cfg"],
    },
    "preprocess_cfg": {"size": 32, "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]},
}


def write_tiny_open_clip(folder: Path, config: dict = TINY_OPEN_CLIP, checkpoint: str | None = None):
    """A tiny random open_clip model saved as a folder the embedding interface loads (``open_clip_config.json``
    and a safetensors checkpoint, by default named as open_clip names it); returns the model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from genshop.embedding import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**config["model_cfg"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / (checkpoint or OPEN_CLIP_WEIGHTS)))
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config))
    return model.eval()


TINY_SIGLIP_TEXTS = [  # what the tiny SigLIP's SentencePiece-style vocabulary is trained on
    "women's red cotton kurta", "men's blue denim jeans", "black leather watch", "green running shoes",
    "a photo of a product", "white tshirt", "silver watches", "brown handbag", "yellow saree", "apparel",
    "footwear", "accessories", "topwear", "bottomwear", "casual", "formal", "ethnic", "sports", "summer",
]
TINY_SIGLIP_PREPROCESSOR = {  # a SigLIP preprocessor_config.json as on the hub, for 32-pixel images
    "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
}


def write_tiny_siglip(folder: Path):
    """A tiny random transformers SiglipModel folder: weights, a Unigram (SentencePiece-style) tokenizer trained
    offline on a few catalog strings, and a hand-written SigLIP image processor config; returns the model."""
    import math

    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TINY_SIGLIP_TEXTS, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=16).save_pretrained(folder)
    config = SiglipConfig(
        text_config={"vocab_size": tokenizer.get_vocab_size(), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                     "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():  # SigLIP's initial temperature and bias (post_init zeroes both)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(TINY_SIGLIP_PREPROCESSOR, indent=2))
    return model


TEST_REDIS_URL = os.environ.get("GENSHOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
TORCH_THREADS = int(os.environ.get("GENSHOP_TEST_TORCH_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(TORCH_THREADS)  # torch's default in every process the tests start
if os.environ.get("PYTEST_XDIST_WORKER"):  # an xdist process has COLUMNS=80, which no user's pipe has: the CLI's
    os.environ.pop("COLUMNS", None)  # tables written to a pipe keep their 160 columns, as in a one-process run
TINY_PRESETS = ["tiny-random", "tiny-sdxl", "tiny-sd3", "tiny-flux"]  # SD 1.x, SDXL, SD3, FLUX


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts with GENSHOP_TEST_TORCH_THREADS intra-op threads, whatever an earlier
    in-process command (``tune --threads 1``, ...) set."""
    import torch

    torch.set_num_threads(TORCH_THREADS)


SHARED_SERVICES = {"api_service"}  # session fixtures that start processes: their tests share one xdist worker


def pytest_itemcollected(item):
    """Under pytest-xdist (``--dist loadgroup``), the tests that share a started service run in
    one process, so it is started once: a module's users of its module-scoped fixtures (one
    group per parameter of them, e.g. one per preset's worker), and the users of ``SHARED_SERVICES``.
    (Marked as each test is collected: xdist names the groups in its own collection hook.)"""
    shared = SHARED_SERVICES & set(item.fixturenames)
    if shared:
        item.add_marker(pytest.mark.xdist_group("session:" + ",".join(sorted(shared))))
        return
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures is None:
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    module_fixtures = {name: defs[-1] for name, defs in fixtures.name2fixturedefs.items()
                       if defs[-1].scope == "module" and defs[-1].func.__module__ == item.module.__name__}
    # grouped by the module fixtures that need no other (``store`` and ``celery_app`` go with ``queue_env``)
    roots = sorted(name for name, definition in module_fixtures.items() if not set(definition.argnames) & set(module_fixtures))
    if roots:
        values = [f"{name}={params[name]}" if name in params else name for name in roots]
        item.add_marker(pytest.mark.xdist_group(":".join([item.module.__name__, *values])))  # no brackets: xdist


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """xdist hands out the largest groups first, then single tests in collection order: the
    ``slow`` ones go first, so that no long test starts last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if getattr(config.option, "loadgroup", False):  # an xdist process of a --dist loadgroup run
        from _pytest.nodeid import coerce_node_id

        for item in items:
            group = item.get_closest_marker("xdist_group")
            if group is not None and "@" not in item.nodeid:
                # xdist 3.8 names a test's group in ``_nodeid``, which pytest 9 no longer reads: name it in the
                # node id pytest 9 reports (``_id``), as xdist means to, so its scheduler keeps the group together
                item._id = coerce_node_id(f"{item.nodeid}@{group.args[0]}")


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
def models_dir(tmp_path_factory, worker_id) -> Path:
    """The tiny presets' weights. In one process they are built where first loaded; under
    pytest-xdist the first process builds them all in the run's shared temporary folder under a
    file lock, and the others wait for them instead of building their own."""
    if worker_id == "master":
        return tmp_path_factory.mktemp("models")
    from genshop.pipelines import ensure_weights
    from genshop.presets import load_preset
    from genshop.settings import get_settings

    run_folder = tmp_path_factory.getbasetemp().parent  # shared by this run's xdist processes
    folder = run_folder / "models"
    folder.mkdir(exist_ok=True)
    with open(run_folder / "models.lock", "w") as lock, pytest.MonkeyPatch.context() as patch:
        fcntl.flock(lock, fcntl.LOCK_EX)
        patch.setenv("GENSHOP_MODELS", str(folder))
        get_settings.cache_clear()
        for preset in TINY_PRESETS:
            ensure_weights(load_preset(preset))
    get_settings.cache_clear()
    return folder


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
        "GENSHOP_TORCH_THREADS": str(TORCH_THREADS),  # workers
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


@pytest.fixture(scope="session")
def open_clip_vit_dir(tmp_path_factory) -> Path:
    """A tiny random open_clip ViT: its config and a checkpoint file of its own name, as an open_clip user has them."""
    folder = tmp_path_factory.mktemp("tiny-open-clip-vit")
    write_tiny_open_clip(folder, TINY_OPEN_CLIP_VIT, "tiny-vit-b-8.safetensors")
    return folder


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers SigLIP model folder."""
    folder = tmp_path_factory.mktemp("tiny-siglip")
    write_tiny_siglip(folder)
    return folder


ENCODERS = ["open_clip_vit", "siglip"]  # the image–text encoders besides the tiny ResNet CLIP, by fixture name


@pytest.fixture(params=ENCODERS)
def encoder_dir(request) -> Path:
    """Each of the other encoders' tiny folder in turn (``open_clip_vit_dir``, ``siglip_dir``)."""
    return request.getfixturevalue(f"{request.param}_dir")


ARTIFACTS = REPO / "test-artifacts"  # screenshots of the browser tests (ignored by git)
API_TOKENS = {"alice": "token-alice", "bob": "token-bob", "carol": "token-carol", "dana": "token-dana",
              "erin": "token-erin", "fay": "token-fay"}
QUEUE_ADMIN = "fay"  # may pause the whole queue through the API (GENSHOP_API_QUEUE_ADMINS)


def write_random_group_adapter(folder: Path, preset: str = "tiny-random", group: str = "A", seed: int = 0,
                               std: float = 0.5) -> Path:
    """A LoRA for a tiny preset's denoiser (its family's UNet or transformer, on the family's
    LoRA targets) with random weights, so the tuned images differ from the base ones."""
    import diffusers
    import torch

    from genshop.adapters import add_group_adapter, save_group_adapter
    from genshop.families import family_for_class_name
    from genshop.pipelines import ensure_weights
    from genshop.presets import load_preset

    loaded_preset = load_preset(preset)
    family = family_for_class_name(loaded_preset.pipeline_class)
    location = Path(ensure_weights(loaded_preset))
    _, class_name = json.loads((location / "model_index.json").read_text())[family.denoiser_attr]
    denoiser = getattr(diffusers, class_name).from_pretrained(location / family.denoiser_attr)
    torch.manual_seed(seed)
    for parameter in add_group_adapter(denoiser, group, targets=family.lora_targets):
        torch.nn.init.normal_(parameter, std=std)
    return save_group_adapter(denoiser, group, folder, family)


PLAIN_DIFFUSERS_LORA = """
import inspect, json, sys
import numpy as np, torch, diffusers

pipeline_class, model, adapter = sys.argv[1:4]
pipe = getattr(diffusers, pipeline_class).from_pretrained(model)
pipe.set_progress_bar_config(disable=True)
t5_length = {"max_sequence_length": 32} if "max_sequence_length" in inspect.signature(pipe.__call__).parameters else {}

def draw():
    image = pipe("Women's red kurta", num_inference_steps=2, width=32, height=32, **t5_length,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.float64)

base = draw()
pipe.load_lora_weights(adapter, adapter_name="group_A")
tuned = draw()
print(json.dumps({"difference": float(np.abs(base - tuned).mean()), "adapters": pipe.get_list_adapters(),
                  "genshop_imported": any(m.split(".")[0] == "genshop" for m in sys.modules)}))
"""


def plain_diffusers_lora(pipeline_class: str, model: str | Path, adapter: Path, cwd: Path) -> dict:
    """A saved adapter loaded by plain diffusers (``pipe.load_lora_weights``) in a process that
    never imports genshop (nor has its variables): the mean image difference it makes at seed 0,
    the pipeline's adapters, and whether genshop was imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSHOP_") and k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS_LORA, pipeline_class, str(model), str(adapter)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
                   GENSHOP_API_TOKENS=",".join(f"{d}:{t}" for d, t in API_TOKENS.items()), GENSHOP_API_MAX_QUEUED="2",
                   GENSHOP_API_QUEUE_ADMINS=QUEUE_ADMIN)
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


class S3Server:
    """moto's standalone S3 API server on a free loopback port, with one bucket made."""

    def __init__(self, log: Path, bucket: str = "genshop-test"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        import httpx

        def answers():
            assert self.proc.poll() is None, f"moto server exited: {log.read_text()[-3000:]}"
            try:
                return httpx.get(self.url, timeout=1).status_code < 500
            except httpx.TransportError:
                return False
        wait_for(answers, 30, 0.1, "the S3 server to answer")
        self.client().create_bucket(Bucket=bucket)

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a genshop process needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()
