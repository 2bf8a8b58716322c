"""Export the text tower of an open_clip CLIP as a ``transformers.CLIPTextModelWithProjection``.

Both are the same network: token + position embeddings, pre-LN transformer blocks with
a causal mask, a final LayerNorm, the hidden state at the end-of-text token, and a
linear projection. The export only renames weights (and splits open_clip's packed
q/k/v projection), so ``text_embeds`` equal open_clip's ``encode_text`` and
``last_hidden_state`` is what a Stable Diffusion UNet cross-attends to.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genshop.tokenizer import BOS_TOKEN, EOS_TOKEN, VOCAB_SIZE, write_clip_tokenizer

BOS_ID = VOCAB_SIZE - 2
EOS_ID = VOCAB_SIZE - 1


def text_config_from_open_clip(model_cfg: dict):
    """The ``CLIPTextConfig`` of an open_clip ``model_cfg`` (built-in text transformer only)."""
    from transformers import CLIPTextConfig

    text = model_cfg["text_cfg"]
    if text.get("hf_model_name") or text.get("pool_type", "argmax") != "argmax" or text.get("no_causal_mask"):
        raise ValueError("only open_clip's causal, argmax-pooled text transformer maps onto CLIPTextModel")
    if text.get("ls_init_value") is not None or text.get("proj_bias") or text.get("final_ln_after_pool"):
        raise ValueError("layer scale, projection bias and post-pool LayerNorm have no CLIPTextModel counterpart")
    width = text.get("width", 512)
    return CLIPTextConfig(
        vocab_size=text.get("vocab_size", VOCAB_SIZE),
        hidden_size=width,
        intermediate_size=int(width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=text.get("layers", 12),
        num_attention_heads=text.get("heads", 8),
        max_position_embeddings=text.get("context_length", 77),
        projection_dim=model_cfg["embed_dim"],
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def text_state_dict_from_open_clip(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights → ``CLIPTextModelWithProjection`` weight names."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
    }
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        q_w, k_w, v_w = state[src + "attn.in_proj_weight"].chunk(3)
        q_b, k_b, v_b = state[src + "attn.in_proj_bias"].chunk(3)
        for name, weight, bias in (("q_proj", q_w, q_b), ("k_proj", k_w, k_b), ("v_proj", v_w, v_b)):
            out[dst + f"self_attn.{name}.weight"] = weight.contiguous()
            out[dst + f"self_attn.{name}.bias"] = bias.contiguous()
        pairs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        for hf_name, oc_name in pairs.items():
            out[dst + f"{hf_name}.weight"] = state[src + f"{oc_name}.weight"]
            out[dst + f"{hf_name}.bias"] = state[src + f"{oc_name}.bias"]
    return out


def open_clip_text_to_transformers(model: torch.nn.Module, model_cfg: dict):
    """A ``CLIPTextModelWithProjection`` carrying the text tower of an open_clip ``CLIP`` (weights copied)."""
    from transformers import CLIPTextModelWithProjection

    config = text_config_from_open_clip(model_cfg)
    text_model = CLIPTextModelWithProjection(config)
    weights = text_state_dict_from_open_clip(
        {k: v.detach().float() for k, v in model.state_dict().items()}, config.num_hidden_layers)
    missing, unexpected = text_model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"text export mismatch: missing {missing}, unexpected {unexpected}")
    return text_model.eval()


def export_text_encoder(open_clip_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``text_encoder/`` (CLIPTextModelWithProjection) and ``tokenizer/`` for an open_clip model folder."""
    import open_clip

    from genshop.embedding import read_open_clip_config

    out_dir = Path(out_dir)
    model_cfg = read_open_clip_config(open_clip_dir)["model_cfg"]
    model = open_clip.create_model(f"local-dir:{open_clip_dir}")
    text_model = open_clip_text_to_transformers(model, model_cfg)
    text_model.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    write_clip_tokenizer(out_dir / "tokenizer", model_max_length=text_model.config.max_position_embeddings)
    return out_dir


__all__ = ["BOS_TOKEN", "EOS_TOKEN", "export_text_encoder", "open_clip_text_to_transformers", "text_config_from_open_clip"]
