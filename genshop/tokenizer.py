"""The CLIP BPE tokenizer, built offline from the vocabulary that ships inside open_clip.

``write_clip_tokenizer(dir)`` writes the files that ``transformers.CLIPTokenizer`` reads
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json). The vocabulary
is byte-for-byte the one OpenAI CLIP and Stable Diffusion use (49,408 tokens), so ids
agree with open_clip's ``SimpleTokenizer``. Nothing is downloaded.

``write_t5_tokenizer(texts, dir)`` trains a small T5 vocabulary (Unigram, ``tokenizers``)
for the tiny SD3 and FLUX presets, whose T5 encoders are random anyway: the committed
folders under ``configs/`` were built from the catalog's listing prompts with
``python -m genshop.tokenizer CATALOG.parquet``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77


def open_clip_bpe_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open_clip (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it carries the CLIP BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_merges_and_vocab() -> tuple[list[str], dict[str, int]]:
    """The 48,894 BPE merges and the token→id vocabulary, as CLIP builds them."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return merges, {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer(directory: str | Path, model_max_length: int = CONTEXT_LENGTH) -> Path:
    """Write a ``CLIPTokenizer`` folder (Stable Diffusion's layout) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges, vocab = clip_merges_and_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
T5_VOCAB_SIZE = 384
T5_MAX_LENGTH = 32


def catalog_prompts(paths) -> list[str]:
    """Listing-style prompts from catalog parquet files (the fashion-products format): each
    title followed by its gender, colour, article type and usage, comma-separated as
    ``genshop.generation.build_prompt`` writes them."""
    import pandas as pd

    columns = ["title", "gender", "colour", "article_type", "usage"]
    prompts = []
    for path in paths:
        for row in pd.read_parquet(path, columns=columns).astype(str).itertuples(index=False):
            prompts.append(", ".join(value for value in row if value and value not in ("Unknown", "None", "nan")))
    return prompts


def write_t5_tokenizer(texts, directory: str | Path, vocab_size: int = T5_VOCAB_SIZE,
                       model_max_length: int = T5_MAX_LENGTH) -> Path:
    """Train a small Unigram vocabulary on ``texts`` (offline, with the ``tokenizers`` library)
    and save it as a folder ``T5TokenizerFast.from_pretrained`` loads: T5's special tokens
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), no sentinel ids, ``</s>`` appended.

    The tiny SD3 and FLUX presets' T5 encoders use it (``configs/tiny-sd3/tokenizer_3``,
    ``configs/tiny-flux/tokenizer_2``); rebuild them with ``python -m genshop.tokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    directory = Path(directory)
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trained.train_from_iterator(list(texts), trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>", show_progress=False))
    # scores rounded: training is multi-threaded, and the last digits vary from run to run
    vocab = [(token, round(score, 6)) for token, score in json.loads(trained.to_str())["model"]["vocab"]]
    assert [token for token, _ in vocab[:3]] == list(T5_SPECIAL_TOKENS), vocab[:3]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return directory


if __name__ == "__main__":  # python -m genshop.tokenizer CATALOG.parquet...: rebuild the tiny presets' T5 tokenizers
    import sys

    from genshop.settings import get_settings

    texts = catalog_prompts(sys.argv[1:])
    for folder in ("tiny-sd3/tokenizer_3", "tiny-flux/tokenizer_2"):
        print(write_t5_tokenizer(texts, get_settings().configs_dir / folder))
