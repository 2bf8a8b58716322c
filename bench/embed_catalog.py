"""The real catalog's image embeddings, for ``bench/index.py --vectors``.

Embeds every product image of the catalog parquet files with a CLIP folder (default: the
bundle's, the one ``genshop catalog import`` uses) and writes a float32 ``(rows, dim)`` .npy
of unit vectors, in file order.

    python bench/embed_catalog.py OUT.npy [--data /work/shared/data/fashion-products/*.parquet] [--model DIR] [--limit N]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first, like every bench script

import argparse
import glob
import time
from pathlib import Path

import numpy as np
import torch

from genshop.catalog_data import embed_catalog_images, read_catalog
from genshop.embedding import EmbeddingConfig, load_embedder
from genshop.settings import BUNDLE_DIR

DEFAULT_DATA = "/work/shared/data/fashion-products/catalog-*.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", nargs="+", default=sorted(glob.glob(DEFAULT_DATA)))
    parser.add_argument("--model", type=Path, default=BUNDLE_DIR / "clip")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--limit", type=int, default=None, help="the first LIMIT rows only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frame = read_catalog(args.data)
    if args.limit is not None:
        frame = frame.iloc[:args.limit]
    embedder = load_embedder(EmbeddingConfig.for_directory(args.model, device="cpu"))
    started = time.perf_counter()
    vectors = embed_catalog_images(embedder, frame, lambda done, total: print(f"\r{done:,}/{total:,}", end="",
                                                                               flush=True))
    seconds = time.perf_counter() - started
    np.save(args.out, vectors.astype(np.float32))
    print(f"\n{len(vectors):,} images of {', '.join(Path(p).name for p in args.data)} embedded "
          f"(dim {vectors.shape[1]}) in {seconds:.0f} s ({len(vectors) / seconds:,.0f}/s) → {args.out}")


if __name__ == "__main__":
    main()
