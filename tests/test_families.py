"""Every model family through generation and serving: tiny SD 1.x, SDXL, SD3 and FLUX presets on a real
worker (real Redis, the real CLI), each with two group LoRAs switched in on the one loaded
pipeline, and the saved adapters loaded by plain diffusers in a process that never imports genshop.

One worker per preset serves all of that preset's tests (a module-scoped, parametrized fixture).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from celery import Celery
from celery.result import AsyncResult
from PIL import Image

from genshop.families import (Flux, StableDiffusion, StableDiffusion3, StableDiffusionXL, family_for_class_name,
                              family_of)
from genshop.presets import load_preset
from genshop.briefs import parse_brief
from genshop.service import cancel_brief, enqueue_brief, submit_brief
from genshop.store import Store
from tests.conftest import (TINY_PRESETS, WorkerProcess, cli_json_here, make_env, plain_diffusers_lora, wait_for,
                            write_brief, write_random_group_adapter)

DESIGN = {"title": "Women's red kurta", "colour": "Red", "seed": 7, "steps": 4}
LONG = {"variants": 8, "steps": 100, "width": 64, "height": 64}  # seconds of denoising for any tiny family


@dataclass
class FamilyService:
    preset: str
    env: dict[str, str]
    home: Path
    store: Store
    celery: Celery

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    def submit(self, **fields) -> AsyncResult:
        """A brief stored and queued by the service functions the CLI and the API call (no
        interpreter start per brief); the worker takes it from the real queue."""
        record, _ = submit_brief(self.store, parse_brief({"title": "Women's red kurta", **fields}), self.preset)
        record = enqueue_brief(self.store, record.id, lambda brief_id, priority: self.celery.send_task(
            "genshop.generate_brief", args=[brief_id], task_id=f"generate-{brief_id}",
            queue=self.env["GENSHOP_QUEUE"], priority=priority).id)
        return AsyncResult(record.task_id, app=self.celery)

    def submit_wait(self, **fields) -> dict:
        result = self.submit(**fields).get(timeout=120)
        assert result["status"] == "succeeded", result
        return result

    def image(self, item) -> np.ndarray:
        return np.asarray(Image.open(self.store.images.path(item.image_path)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module", params=TINY_PRESETS)
def service(request, tmp_path_factory, models_dir):
    """A real ``genshop worker`` on the preset, with random LoRAs for groups A and B."""
    from genshop.settings import get_settings

    preset = request.param
    home = tmp_path_factory.mktemp(f"{preset}-home")
    env = make_env(home, models_dir, GENSHOP_PRESET=preset)
    with pytest.MonkeyPatch.context() as patch:  # build the tiny model into the shared models folder
        patch.setenv("GENSHOP_MODELS", str(models_dir))
        get_settings.cache_clear()
        for seed, group in enumerate(("A", "B"), start=1):
            write_random_group_adapter(home / "adapters" / group, preset, group, seed)
    get_settings.cache_clear()
    worker = WorkerProcess(env, home / "worker.log").wait_ready()
    store = Store(f"sqlite:///{home / 'genshop.db'}", home)
    yield FamilyService(preset, env, home, store,
                        Celery(broker=env["GENSHOP_BROKER_URL"], backend=env["GENSHOP_BROKER_URL"]))
    worker.stop()
    store.engine.dispose()


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_generation_through_the_queue_and_local_gives_the_same_images(service, tmp_path):
    queued = service.submit_wait(**DESIGN, variants=3)
    # `genshop submit --local` run in this process (the same click command and in-process worker)
    local = cli_json_here(["submit", str(write_brief(tmp_path / "local.json", **DESIGN, variants=3)), "--local",
                           "--json"], service.env)
    assert local["status"] == "succeeded" and local["items_count"] == 3
    queued_items = service.store.list_items(queued["brief_id"])
    local_items = service.store.list_items(local["brief_id"])
    assert [(i.variant, i.seed) for i in queued_items] == [(v, 7 + v) for v in range(3)]
    queued_images, local_images = [service.image(i) for i in queued_items], [service.image(i) for i in local_items]
    between_variants = min(mean_difference(queued_images[v], queued_images[(v + 1) % 3]) for v in range(3))
    assert between_variants > 3.0  # one seed per variant
    # the same images up to float differences (thread counts differ: a random UNet amplifies them)
    assert max(mean_difference(q, l) for q, l in zip(queued_images, local_images)) < 0.25 * between_variants
    preset = load_preset(service.preset)
    for item in queued_items:
        assert item.model_id.startswith(f"genshop/{preset.random_init}-") and "+lora:" not in item.model_id
        assert Image.open(service.store.images.path(item.image_path)).size == (preset.defaults.width,
                                                                              preset.defaults.height)


def test_a_brief_for_two_groups_gets_each_groups_lora_switched_in_on_one_pipeline(service, tmp_path):
    both = service.submit_wait(**DESIGN, variants=4, groups=["A", "B"])
    swapped = service.submit_wait(**DESIGN, variants=2, groups=["B", "A"])
    base = service.submit_wait(**DESIGN, variants=1)
    alone = service.submit_wait(**DESIGN, variants=1, groups=["A"])
    assert {r["pipeline_loads"] for r in (both, swapped, base, alone)} == {1}  # never reloaded to switch LoRAs
    assert len({r["worker_pid"] for r in (both, swapped, base, alone)}) == 1

    items = service.store.list_items(both["brief_id"])
    [base_item] = service.store.list_items(base["brief_id"])
    assert [i.model_id.split("+lora:")[-1] for i in items] == ["A", "B", "A", "B"]
    assert {i.model_id.split("+lora:")[0] for i in items} == {base_item.model_id}
    assert all(i.model_revision.startswith(base_item.model_revision + "+") for i in items)

    # variant 0 (seed 7) made by A (first brief), by B (second brief) and by the base model: three images
    by_a, by_b, by_base = service.image(items[0]), service.image(service.store.list_items(swapped["brief_id"])[0]), \
        service.image(base_item)
    apart = min(mean_difference(by_a, by_base), mean_difference(by_b, by_base), mean_difference(by_a, by_b))
    assert apart > 3.0
    # per-variant determinism: A's variant 0 made alone equals the one made in a batch with variant 2, up to
    # the float differences of another batch size (a random UNet amplifies them; the transformers give 0)
    [a_alone] = service.store.list_items(alone["brief_id"])
    assert a_alone.model_id == items[0].model_id and a_alone.seed == items[0].seed
    assert mean_difference(service.image(a_alone), by_a) < 0.25 * apart


def test_progress_is_reported_and_cancelling_stops_at_the_next_step(service):
    task = service.submit(**DESIGN | LONG)
    brief_id = task.id.removeprefix("generate-")
    meta = wait_for(lambda: task.state == "RUNNING" and task.info.get("step") and task.info, 60, what="RUNNING meta")
    assert meta["brief_id"] == brief_id and meta["steps"] == 100 and meta["variants_total"] == 8
    progress = wait_for(lambda: (p := service.store.get_brief(brief_id).progress).get("step", 0) >= 2 and p, 60,
                        what="denoising")
    assert 2 <= progress["step"] < 100
    cancel_brief(service.store, brief_id)  # what `genshop cancel` and the API call
    record = wait_for(lambda: (r := service.store.get_brief(brief_id)).is_terminal and r, 30, what="cancelled")
    assert record.status == "cancelled" and service.store.list_items(record.id) == []  # one batch of 8, stopped
    wait_for(lambda: task.state == "REVOKED", 10, what="REVOKED state")


def test_a_saved_adapter_loads_with_plain_diffusers_of_its_family(service, tmp_path):
    from genshop.presets import model_location
    from genshop.settings import get_settings

    preset = load_preset(service.preset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENSHOP_MODELS", service.env["GENSHOP_MODELS"])
        get_settings.cache_clear()
        model = model_location(preset)
    get_settings.cache_clear()
    result = plain_diffusers_lora(preset.pipeline_class, model, service.adapters / "A", tmp_path)
    assert result["genshop_imported"] is False
    denoiser = family_for_class_name(preset.pipeline_class).denoiser_attr
    assert denoiser in result["adapters"] and len(result["adapters"][denoiser]) == 1, result
    assert result["difference"] > 3.0


# -- the family module itself (no worker) ---------------------------------------------------------

def test_each_pipeline_class_has_its_family():
    import diffusers

    expected = {"StableDiffusionPipeline": StableDiffusion, "StableDiffusionImg2ImgPipeline": StableDiffusion,
                "StableDiffusionXLPipeline": StableDiffusionXL, "StableDiffusionXLImg2ImgPipeline": StableDiffusionXL,
                "StableDiffusion3Pipeline": StableDiffusion3, "FluxPipeline": Flux, "FluxImg2ImgPipeline": Flux}
    for name, family in expected.items():
        assert isinstance(family_for_class_name(name), family), name
        assert isinstance(family_of(getattr(diffusers, name)), family), name
    assert {family_for_class_name(load_preset(p).pipeline_class).name for p in
            ("tiny-random", "sd15", "sdxl", "sdxl-turbo", "tiny-sdxl", "sd35-medium", "tiny-sd3", "flux-schnell",
             "tiny-flux")} == {"sd", "sdxl", "sd3", "flux"}
    with pytest.raises(ValueError, match="no model family"):
        family_for_class_name("KandinskyPipeline")


def test_flux_takes_no_negative_prompt_and_guidance_only_with_a_guidance_embedding():
    def flux(guidance_embeds: bool):
        return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance_embeds)),
                               tokenizer_2=SimpleNamespace(model_max_length=512))

    schnell = Flux().generation_kwargs(flux(False), "a kurta", "blurry", 2, 3.5)
    dev = Flux().generation_kwargs(flux(True), "a kurta", "blurry", 2, 3.5, max_sequence_length=256)
    assert schnell == {"prompt": ["a kurta"] * 2, "max_sequence_length": 512}
    assert dev == {"prompt": ["a kurta"] * 2, "guidance_scale": 3.5, "max_sequence_length": 256}
    sd3 = SimpleNamespace(tokenizer_3=SimpleNamespace(model_max_length=32))
    assert StableDiffusion3().generation_kwargs(sd3, "a kurta", "blurry", 1, 5.0) == {
        "prompt": ["a kurta"], "guidance_scale": 5.0, "negative_prompt": ["blurry"], "max_sequence_length": 32}
    assert StableDiffusionXL().generation_kwargs(None, "a kurta", "blurry", 1, 1.0) == {
        "prompt": ["a kurta"], "guidance_scale": 1.0}  # no CFG: the negative prompt would do nothing


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_lora_target_names_modules_of_the_tiny_denoiser(env, preset):
    import diffusers

    from genshop.pipelines import ensure_weights

    family = family_for_class_name(load_preset(preset).pipeline_class)
    location = Path(ensure_weights(load_preset(preset)))
    _, class_name = json.loads((location / "model_index.json").read_text())[family.denoiser_attr]
    names = [name for name, _ in getattr(diffusers, class_name).from_pretrained(location / family.denoiser_attr)
             .named_modules()]
    for target in family.lora_targets:
        assert any(name == target or name.endswith("." + target) for name in names), (preset, target)


def test_tiny_flux_uses_the_guidance_scale_only_when_its_transformer_has_a_guidance_embedding(env):
    """tiny-flux is schnell-like (no guidance embedding: the scale changes nothing); the same
    pipeline with a guidance-embedding transformer (dev-like) draws differently per scale."""
    import dataclasses

    import torch
    from diffusers import FluxTransformer2DModel

    from genshop.briefs import resolve_brief
    from genshop.generation import generate_batch
    from genshop.pipelines import load_pipeline

    loaded = load_pipeline("tiny-flux")
    preset = load_preset("tiny-flux")

    def draw(loaded, guidance: float) -> np.ndarray:
        brief = resolve_brief(parse_brief({**DESIGN, "variants": 1, "guidance_scale": guidance}), preset)
        return np.asarray(generate_batch(loaded, brief, [0])[0].image, dtype=np.float64)

    assert mean_difference(draw(loaded, 1.0), draw(loaded, 6.0)) == 0.0
    torch.manual_seed(0)
    config = {**loaded.pipeline.transformer.config, "guidance_embeds": True}
    pipe = loaded.pipeline
    pipe.register_modules(transformer=FluxTransformer2DModel.from_config(config).eval())
    dev_like = dataclasses.replace(loaded, pipeline=pipe)
    assert mean_difference(draw(dev_like, 1.0), draw(dev_like, 6.0)) > 1.0
