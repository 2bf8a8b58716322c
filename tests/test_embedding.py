"""The one embedding interface: both backends load from local files and return unit vectors."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from genshop.embedding import EmbeddingConfig, load_embedder
from tests.conftest import write_tiny_open_clip

def images(n: int = 3) -> list[Image.Image]:
    return [Image.new("RGB", (60, 80), color) for color in [(200, 30, 30), (30, 200, 30), (30, 30, 200)][:n]]


def assert_unit_rows(embeddings: np.ndarray, n: int, dim: int) -> None:
    assert embeddings.shape == (n, dim)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.fixture
def open_clip_model_dir(tmp_path):
    return tmp_path, write_tiny_open_clip(tmp_path)


def test_open_clip_backend_loads_a_custom_config_folder(open_clip_model_dir):
    folder, source = open_clip_model_dir
    config = EmbeddingConfig.for_directory(folder, batch_size=2)
    assert config.backend == "open_clip"
    embedder = load_embedder(config)
    image_embeddings = embedder.embed_images(images(3))
    text_embeddings = embedder.embed_texts(["red tshirt", "green shoes", "blue bag"])
    assert_unit_rows(image_embeddings, 3, 16)
    assert_unit_rows(text_embeddings, 3, 16)
    assert embedder.logit_scale == pytest.approx(float(source.logit_scale.exp()), rel=1e-5)
    # the weights really came from the checkpoint: same text embeddings as the source model
    import open_clip

    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(["red tshirt"])
    expected = torch.nn.functional.normalize(source.encode_text(tokens), dim=-1).detach().numpy()
    np.testing.assert_allclose(text_embeddings[:1], expected, atol=1e-5)


def test_open_clip_backend_loads_a_builtin_architecture_from_a_local_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(0)
    source = open_clip.create_model("ViT-S-32-alt").eval()  # a built-in architecture, random weights
    checkpoint = tmp_path / "vit-s-32-alt.safetensors"
    save_file({k: v.half().contiguous() for k, v in source.state_dict().items()}, str(checkpoint))
    embedder = load_embedder(EmbeddingConfig(backend="open_clip", model="ViT-S-32-alt", pretrained=str(checkpoint)))
    text_embeddings = embedder.embed_texts(["a photo of a red dress"])
    image_embeddings = embedder.embed_images(images(1))
    dim = source.text_projection.shape[1]
    assert_unit_rows(text_embeddings, 1, dim)
    assert_unit_rows(image_embeddings, 1, dim)
    tokens = open_clip.get_tokenizer("ViT-S-32-alt")(["a photo of a red dress"])
    expected = torch.nn.functional.normalize(source.encode_text(tokens), dim=-1).detach().numpy()
    np.testing.assert_allclose(text_embeddings, expected, atol=2e-2)  # checkpoint stored in fp16


def test_open_clip_backend_refuses_a_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_embedder(EmbeddingConfig(backend="open_clip", model="ViT-S-32-alt", pretrained=str(tmp_path / "nope.pt")))


def tiny_transformers_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 24, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=12,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


@pytest.mark.parametrize("with_preprocessing_files", [False, True])
def test_transformers_backend_loads_a_local_clip_model(tmp_path, with_preprocessing_files):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from genshop.tokenizer import write_clip_tokenizer

    model = tiny_transformers_clip()
    model.save_pretrained(tmp_path, safe_serialization=True)
    if with_preprocessing_files:
        CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", 24)).save_pretrained(tmp_path)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    config = EmbeddingConfig.for_directory(tmp_path, batch_size=2)
    assert config.backend == "transformers"
    embedder = load_embedder(config)
    assert_unit_rows(embedder.embed_images(images(3)), 3, 12)
    texts = embedder.embed_texts(["red tshirt", "a much longer listing title with many words " * 5])
    assert_unit_rows(texts, 2, 12)
    assert embedder.logit_scale == pytest.approx(float(model.logit_scale.exp()), rel=1e-5)
    assert not np.allclose(texts[0], texts[1])


def test_config_for_a_folder_without_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        EmbeddingConfig.for_directory(tmp_path)


# -------------------------------------------------- open_clip ViT from a checkpoint file, transformers SigLIP

ENCODER_DIMS = {"open_clip_vit": 16, "siglip": 32}


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("encoder", list(ENCODER_DIMS))
def test_other_encoders_embed_images_and_texts_to_unit_vectors_independent_of_the_batch(request, encoder):
    from genshop.embedding import embedder_fingerprint

    folder = request.getfixturevalue(f"{encoder}_dir")
    config = EmbeddingConfig.for_directory(folder, batch_size=4)
    embedder = load_embedder(config)
    dim = ENCODER_DIMS[encoder]
    pictures = noise_images(5) + images(3)
    embeddings = embedder.embed_images(pictures)
    assert_unit_rows(embeddings, 8, dim)
    similarity = embeddings @ embeddings.T
    assert (similarity.argmax(axis=1) == np.arange(8)).all() and (similarity - np.eye(8)).max() < 0.9999
    np.testing.assert_allclose(embedder.embed_images(pictures[5:6])[0], embeddings[5], atol=1e-5)
    texts = embedder.embed_texts(["red kurta", "women's black leather running shoes with a long listing title " * 3,
                                  "green"])
    assert_unit_rows(texts, 3, dim)
    assert not np.allclose(texts[0], texts[2], atol=1e-3)
    # SigLIP pools the last position: its texts are padded to the full length, so a text's embedding never
    # depends on the longest text it is batched with
    np.testing.assert_allclose(embedder.embed_texts(["red kurta"])[0], texts[0], atol=1e-5)
    assert embedder_fingerprint(config) != embedder_fingerprint(EmbeddingConfig.for_directory(
        request.getfixturevalue("open_clip_dir")))


def test_open_clip_vit_loads_its_config_and_its_safetensors_checkpoint_never_a_pickle(tmp_path):
    from tests.conftest import TINY_OPEN_CLIP_VIT

    source = write_tiny_open_clip(tmp_path / "vit", TINY_OPEN_CLIP_VIT, "my-finetune-epoch3.safetensors")
    (tmp_path / "vit" / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")  # open_clip would prefer it
    embedder = load_embedder(EmbeddingConfig.for_directory(tmp_path / "vit"))
    assert type(embedder.model.visual).__name__ == "VisionTransformer"
    pixels = embedder.pixels(images(2))
    expected = torch.nn.functional.normalize(source.encode_image(pixels), dim=-1).detach().numpy()
    np.testing.assert_allclose(embedder.embed_images(images(2)), expected, atol=1e-5)
    assert embedder.logit_scale == pytest.approx(float(source.logit_scale.detach().exp()), rel=1e-5)

    (tmp_path / "vit" / "my-finetune-epoch3.safetensors").rename(tmp_path / "vit.safetensors")
    with pytest.raises(FileNotFoundError, match="no .safetensors checkpoint"):
        load_embedder(EmbeddingConfig.for_directory(tmp_path / "vit"))
    pickle = tmp_path / "vit-b-32.pt"
    pickle.write_bytes(b"")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_embedder(EmbeddingConfig(backend="open_clip", model="ViT-B-32", pretrained=str(pickle)))


def test_siglip_loads_with_its_own_tokenizer_processor_and_temperature(siglip_dir):
    from transformers import SiglipModel

    embedder = load_embedder(EmbeddingConfig(backend="transformers", model=str(siglip_dir)))
    assert type(embedder.model).__name__ == "SiglipModel" and embedder.logit_scale == pytest.approx(10.0)
    source = SiglipModel.from_pretrained(siglip_dir).eval()
    pixels = embedder.pixels(images(2))
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1  # SigLIP's mean = std = 0.5
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    np.testing.assert_allclose(embedder.embed_images(images(2)), expected.numpy(), atol=1e-5)
    tokens = embedder.tokenizer(["red kurta"], padding="max_length", max_length=16)["input_ids"][0]
    assert len(tokens) == 16 and tokens[-1] == 0 and 1 in tokens  # </s> then <pad> up to the model's length


def test_transformers_backend_refuses_a_model_it_cannot_embed_with(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loads clip and siglip models"):
        load_embedder(EmbeddingConfig.for_directory(tmp_path))


@pytest.mark.parametrize("model", ["shipped", "tiny-random"])
def test_open_clip_text_embeddings_skip_the_padding_and_stay_the_same(request, model):
    """The text tower runs on the batch's longest text, not the context length: the embeddings
    of short queries, of one with '!' (token id 0, open_clip's padding id) and of a text
    cut at the context length equal open_clip's own ``encode_text``."""
    import open_clip

    from genshop.embedding import encode_text_trimmed
    from genshop.settings import BUNDLE_DIR

    folder = BUNDLE_DIR / "clip" if model == "shipped" else request.getfixturevalue("open_clip_dir")
    embedder = load_embedder(EmbeddingConfig.for_directory(folder, device="cpu"))
    assert type(embedder.model) is open_clip.CLIP
    batches = [["red kurta", "men's blue denim jeans for summer"], ["wow! red! kurta!", "!"],
               ["a very long description of a dress " * 20, "tee"]]
    for texts in batches:
        tokens = embedder.tokenizer(texts)
        with torch.inference_mode():
            full = embedder.model.encode_text(tokens)
            trimmed = encode_text_trimmed(embedder.model, tokens)
        assert trimmed.shape == full.shape
        assert torch.allclose(trimmed, full, atol=1e-4 * float(full.abs().max()), rtol=0)
        vectors = embedder.embed_texts(texts)
        reference = torch.nn.functional.normalize(full, dim=-1).numpy()
        assert np.allclose(vectors, reference, atol=1e-4)
    short = embedder.tokenizer(["red kurta"])
    assert int(short.argmax(dim=-1)) + 1 < short.shape[1]  # the short batch really ran on fewer positions
