"""Model families: the small part of every stage that differs between SD 1.x, SDXL, SD3 and FLUX.

Every stage — generation, serving a group's LoRA, tuning — is one code path. What it
needs to know about the architecture it is running on comes from the pipeline's
*family*, chosen from the pipeline's class by ``family_of(pipeline)`` (or
``family_for_class_name``):

========================  ===========  ==============  =========================================
family                    ``name``     denoiser        conditioning
========================  ===========  ==============  =========================================
``StableDiffusion``       ``sd``       ``unet``        one CLIP text encoder (SD 1.x / 2.x)
``StableDiffusionXL``     ``sdxl``     ``unet``        two CLIP encoders, pooled embeds, time ids
``StableDiffusion3``      ``sd3``      ``transformer`` two CLIP + T5, pooled embeds, flow matching
``Flux``                  ``flux``     ``transformer`` CLIP (pooled) + T5, flow matching, guidance
                                                       embedding when the transformer has one
========================  ===========  ==============  =========================================

Each family says:

- which module is the denoiser (``denoiser_attr``, ``denoiser(pipeline)``);
- which of its modules take a LoRA (``lora_targets``, the defaults of diffusers' own
  DreamBooth LoRA trainers for that architecture) and how a trained adapter is saved so
  that plain ``pipe.load_lora_weights(folder)`` of that family loads it
  (``lora_state_dict``, ``save_lora``);
- what differs in a generation call (``generation_kwargs``: negative prompt or not,
  guidance or not, the T5 sequence length), so ``genshop.generation.generate_batch`` is
  one function for every family.

The training side (prompt → conditioning tensors, the network call, the noise process
with its prediction target and timestep sampling, latents to and from images) is mixed
into these same classes from ``genshop.tuning.denoising`` (``UNetTraining``,
``SDXLTraining``, ``SD3Training``, ``FluxTraining``), which ``genshop tune`` and
``bench/dpo.py`` use.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genshop.tuning.denoising import FluxTraining, SD3Training, SDXLTraining, UNetTraining

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # train_dreambooth_lora{,_sdxl}.py
JOINT_ATTENTION = (  # train_dreambooth_lora_sd3.py's default: both streams of the joint attention
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
DIT_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")  # both streams
SD3_ATTENTION_AND_FF = JOINT_ATTENTION + DIT_FEED_FORWARD  # the DiT targets: attention and feed-forward
FLUX_ATTENTION_AND_FF = (  # train_dreambooth_lora_flux.py's default: joint attention plus both feed-forwards
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


class Family:
    """What one architecture's pipelines have in common; subclasses fill in the differences."""

    name: str = ""
    pipeline_class_name: str = ""  # the class whose save_lora_weights / load_lora_weights the adapters use
    class_prefixes: tuple[str, ...] = ()  # pipeline class names of this family start with one of these
    denoiser_attr: str = "unet"
    lora_targets: tuple[str, ...] = UNET_ATTENTION
    lora_layers_keyword: str = "unet_lora_layers"  # save_lora_weights' argument for the denoiser's layers
    lora_keys_in_diffusers_format: bool = True  # peft keys converted as the UNet trainers do
    negative_prompt: bool = True  # the pipeline takes a classic (CFG) negative prompt
    t5_tokenizer_attr: str | None = None  # the T5 tokenizer's attribute, for families that have one
    max_sequence_length: int | None = None  # the pipeline's default T5 length

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- the denoiser and its LoRA -------------------------------------------------------------
    def denoiser(self, pipeline) -> torch.nn.Module:
        return getattr(pipeline, self.denoiser_attr)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def lora_state_dict(self, denoiser, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights as this family's trainer saves them (float32, on the CPU)."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
        if self.lora_keys_in_diffusers_format:
            from diffusers.utils import convert_state_dict_to_diffusers

            state = convert_state_dict_to_diffusers(state)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def save_lora(self, folder: str | Path, state_dict: dict[str, torch.Tensor]) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` with the family pipeline's own ``save_lora_weights``."""
        from genshop.adapters import LORA_WEIGHTS

        folder = Path(folder)
        self.pipeline_class.save_lora_weights(folder, **{self.lora_layers_keyword: state_dict}, safe_serialization=True)
        return folder / LORA_WEIGHTS

    # -- generation ----------------------------------------------------------------------------
    def text_max_length(self, pipeline, requested: int | None = None) -> int | None:
        """The T5 sequence length a call uses: the requested (preset) one, else the pipeline's
        default, never more than the T5 tokenizer's ``model_max_length``; None without T5."""
        if self.t5_tokenizer_attr is None:
            return None
        tokenizer = getattr(pipeline, self.t5_tokenizer_attr, None)
        length = requested or self.max_sequence_length
        limit = getattr(tokenizer, "model_max_length", None)
        return min(length, limit) if limit and limit < 10**6 else length

    def uses_guidance(self, pipeline, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` changes the call (classifier-free guidance above 1)."""
        return guidance_scale > 1

    def generation_kwargs(self, pipeline, prompt: str | list[str], negative_prompt: str, count: int,
                          guidance_scale: float, max_sequence_length: int | None = None) -> dict:
        """The keyword arguments of ``pipeline(...)`` that depend on the family: prompts,
        negative prompt, guidance and text length (steps, size, generators and the step
        callback are the same for every family). ``prompt`` is one prompt for ``count``
        images, or one prompt per image (a batch across briefs)."""
        prompts = prompt if isinstance(prompt, list) else [prompt] * count
        kwargs: dict = {"prompt": prompts, "guidance_scale": guidance_scale}
        if self.negative_prompt and negative_prompt and self.uses_guidance(pipeline, guidance_scale):
            kwargs["negative_prompt"] = [negative_prompt] * count
        if (length := self.text_max_length(pipeline, max_sequence_length)) is not None:
            kwargs["max_sequence_length"] = length
        return kwargs


class StableDiffusion(Family, UNetTraining):
    """SD 1.x / 2.x: one CLIP text encoder, a UNet predicting noise (or v)."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    class_prefixes = ("StableDiffusion",)


class StableDiffusionXL(Family, SDXLTraining):
    """SDXL: two CLIP text encoders (the second's pooled projection), size/crop time ids, a UNet."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    class_prefixes = ("StableDiffusionXL",)


class StableDiffusion3(Family, SD3Training):
    """SD3 / 3.5: MMDiT transformer, two CLIP encoders and T5, rectified flow."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    class_prefixes = ("StableDiffusion3",)
    denoiser_attr = "transformer"
    lora_targets = SD3_ATTENTION_AND_FF
    lora_layers_keyword = "transformer_lora_layers"
    lora_keys_in_diffusers_format = False  # peft keys, as train_dreambooth_lora_sd3.py saves them
    t5_tokenizer_attr = "tokenizer_3"
    max_sequence_length = 256


class Flux(Family, FluxTraining):
    """FLUX.1: a transformer on packed 2x2 latents, CLIP (pooled) and T5, rectified flow; the
    guidance scale is an input of the transformer (dev) or ignored (schnell), never CFG."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    class_prefixes = ("Flux",)
    denoiser_attr = "transformer"
    lora_targets = FLUX_ATTENTION_AND_FF
    lora_layers_keyword = "transformer_lora_layers"
    lora_keys_in_diffusers_format = False  # peft keys, as train_dreambooth_lora_flux.py saves them
    negative_prompt = False  # FluxPipeline's negative prompt is "true CFG", not this project's negative prompt
    t5_tokenizer_attr = "tokenizer_2"
    max_sequence_length = 512

    def has_guidance_embedding(self, pipeline) -> bool:
        return bool(getattr(self.denoiser(pipeline).config, "guidance_embeds", False))

    def uses_guidance(self, pipeline, guidance_scale: float) -> bool:
        return self.has_guidance_embedding(pipeline)

    def generation_kwargs(self, pipeline, prompt: str | list[str], negative_prompt: str, count: int,
                          guidance_scale: float, max_sequence_length: int | None = None) -> dict:
        kwargs = super().generation_kwargs(pipeline, prompt, negative_prompt, count, guidance_scale,
                                           max_sequence_length)
        if not self.has_guidance_embedding(pipeline):
            del kwargs["guidance_scale"]  # schnell-like: the transformer has no guidance input
        return kwargs


FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusionXL(), StableDiffusion3(), Flux(), StableDiffusion())}


def family_for_class_name(class_name: str) -> Family:
    """The family of a diffusers pipeline class name (``StableDiffusionXLImg2ImgPipeline`` → sdxl)."""
    for family in FAMILIES.values():  # most specific prefixes first: StableDiffusionXL before StableDiffusion
        if class_name.startswith(family.class_prefixes):
            return family
    raise ValueError(f"no model family for pipeline class {class_name!r}; known: "
                     + ", ".join(f.pipeline_class_name for f in FAMILIES.values()))


def family_of(pipeline) -> Family:
    """The family of a loaded pipeline (or pipeline class), from its class."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    for klass in cls.__mro__:
        try:
            return family_for_class_name(klass.__name__)
        except ValueError:
            continue
    raise ValueError(f"no model family for pipeline class {cls.__name__!r}")


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
