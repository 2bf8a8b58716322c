"""The vector index at catalog scale: the exact index (IndexFlatIP) and HNSW, side by side.

For each size: seeded random unit vectors (dim 512, the hard case: real CLIP embeddings
cluster), each item with a ``colour`` out of 50 values; seeded random unit queries.
Both kinds are built through ``VectorIndex`` (``build_index``, batches of 50,000), so the
numbers include our id and metadata bookkeeping:

- build time;
- single-query latency p50 / p95 over ``--queries`` queries, k = 10, one call per query;
- the same with a filter matching ~2% of the items (one colour);
- batch throughput: all queries in one call;
- recall@10 against ground truth from a plain ``faiss.IndexFlatIP`` over the same vectors;
- add throughput: 2,000 further items added 100 per call, as the enrich queue does.

Data, one of:

- ``--clustered`` (the target's data): unit vectors drawn around ``--centres`` (2,000) random
  cluster centres, each point's cosine to its centre about 0.8 (``0.8 c + 0.6 n``, ``n`` a random
  unit vector, nearly orthogonal to ``c`` in 512 dimensions), queries drawn the same way. Real
  embeddings cluster like this; uniform noise does not.
- ``--vectors FILE.npy``: real embeddings (``bench/embed_catalog.py`` writes the catalog's), the
  last ``--queries`` rows as queries and the first rows as the indexed items.
- neither: uniformly random unit vectors, the worst case for any approximate index (every
  point is about as far as every other; see ``IndexConfig``), kept for comparison only.

Target (at 1M, ``--clustered``, 2 cores): HNSW single-query p50 <= 2 ms with recall@10 >= 0.95.
``--ef-search`` takes several values: the first makes the table, every one is then measured on
the same built HNSW graph (p50, p95, recall), so one build shows the trade-off. ``--no-exact``
skips the exact VectorIndex column (ground truth still comes from a plain IndexFlatIP).

    python bench/index.py --clustered [--sizes 1000000] [--queries 1000] [--threads N] [--ef-search 64 128 256]
    python bench/index.py --vectors catalog.npy --sizes 43000
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first, like every bench script

import argparse
import gc
import os
import statistics
import time

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from genshop.understanding.index import IndexConfig, build_index

DIM = 512
K = 10
COLOURS = [f"colour-{n:02d}" for n in range(50)]
ADDED = 2_000  # items added after the build, 100 per call


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def clustered_vectors(count: int, seed: int, centres: np.ndarray, cosine: float = 0.8,
                      chunk: int = 100_000) -> np.ndarray:
    """``count`` unit vectors, each ``cosine`` from a centre picked at random (``cosine·c + sin·n``)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, centres.shape[1]), dtype=np.float32)
    sine = float(np.sqrt(1 - cosine ** 2))
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        noise = rng.standard_normal((stop - start, centres.shape[1]), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        rows = cosine * centres[rng.integers(0, len(centres), stop - start)] + sine * noise
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def ef_sweep(index, queries: np.ndarray, truth: np.ndarray, values: list[int]) -> list[dict[str, float]]:
    """p50 / p95 / recall@10 of the built HNSW ``index`` at each efSearch."""
    graph = faiss.downcast_index(index._faiss.index).hnsw
    results = []
    for ef in values:
        graph.efSearch = ef
        index.search(queries[:10], K)
        timings, found = [], []
        for query in queries:
            started = time.perf_counter()
            found.append([h.id for h in index.search(query, K)[0]])
            timings.append((time.perf_counter() - started) * 1000)
        results.append({"ef": ef, "p50_ms": statistics.median(timings), "p95_ms": percentile(timings, 0.95),
                        "recall": recall_at_k(found, truth)})
    return results


def normalised(rows: np.ndarray) -> np.ndarray:
    rows = np.array(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def ground_truth(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row numbers of the exact top-K per query, from a plain IndexFlatIP."""
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    return exact.search(queries, K)[1]


def recall_at_k(found: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len({int(i) for i in row} & set(t.tolist())) / K for row, t in zip(found, truth)]))


def measure(config: IndexConfig, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            keep: list | None = None) -> dict[str, float]:
    size = len(vectors)
    ids = [str(n) for n in range(size + ADDED)]  # row numbers, so recall needs no lookup
    metadata = [{"colour": COLOURS[n % len(COLOURS)]} for n in range(size + ADDED)]

    started = time.perf_counter()
    index = build_index(config, ids[:size], vectors, metadata[:size])
    build_s = time.perf_counter() - started

    def latencies(filters: dict | None) -> list[float]:
        timings = []
        for query in queries:
            started = time.perf_counter()
            index.search(query, K, filters=filters)
            timings.append((time.perf_counter() - started) * 1000)
        return timings

    index.search(queries[:10], K)  # warm-up
    single = latencies(None)
    filtered = latencies({"colour": COLOURS[0]})
    started = time.perf_counter()
    found = index.search(queries, K)
    batch_per_s = len(queries) / (time.perf_counter() - started)

    if keep is not None:  # the caller sweeps efSearch on this graph before the adds below change it
        keep.append(index)
        return {"kind": index.kind, "build_s": build_s, "p50_ms": statistics.median(single),
                "p95_ms": percentile(single, 0.95), "filtered_p50_ms": statistics.median(filtered),
                "filtered_p95_ms": percentile(filtered, 0.95), "batch_per_s": batch_per_s,
                "recall": recall_at_k([[h.id for h in row] for row in found], truth), "index": index}
    extra = unit_vectors(ADDED, seed=3)  # last, so the searches above ran on exactly the measured data
    started = time.perf_counter()
    for start in range(0, ADDED, 100):
        stop = size + start + 100
        index.add(ids[size + start:stop], extra[start:start + 100], metadata[size + start:stop])
    add_per_s = ADDED / (time.perf_counter() - started)
    result = {"kind": index.kind, "build_s": build_s, "add_per_s": add_per_s,
              "p50_ms": statistics.median(single), "p95_ms": percentile(single, 0.95),
              "filtered_p50_ms": statistics.median(filtered), "filtered_p95_ms": percentile(filtered, 0.95),
              "batch_per_s": batch_per_s, "recall": recall_at_k([[h.id for h in row] for row in found], truth)}
    return result


def main() -> None:
    global DIM
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="faiss (OpenMP) threads: building and batch queries use them; one query uses one")
    defaults = IndexConfig(dim=DIM)
    parser.add_argument("--m", type=int, default=defaults.hnsw_m, help="HNSW neighbours per node")
    parser.add_argument("--ef-construction", type=int, default=defaults.ef_construction)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[defaults.ef_search],
                        help="HNSW efSearch; several values: each measured on the same graph")
    parser.add_argument("--vectors", help="a (rows, 512) .npy of real embeddings to index instead of random vectors")
    parser.add_argument("--clustered", action="store_true",
                        help="vectors around --centres cluster centres (cosine ~0.8 to their centre)")
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--no-exact", action="store_true", help="skip the exact VectorIndex column")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    console = Console()
    hnsw_config = IndexConfig(dim=DIM, exact_below=0, hnsw_m=args.m, ef_construction=args.ef_construction,
                              ef_search=args.ef_search[0])
    rows = [("build time (s)", "build_s", "{:.1f}"), ("add throughput, 100 per call (vectors/s)", "add_per_s", "{:,.0f}"),
            ("single query p50 (ms)", "p50_ms", "{:.2f}"), ("single query p95 (ms)", "p95_ms", "{:.2f}"),
            ("filtered to ~2%: p50 (ms)", "filtered_p50_ms", "{:.2f}"),
            ("filtered to ~2%: p95 (ms)", "filtered_p95_ms", "{:.2f}"),
            ("batch throughput (queries/s)", "batch_per_s", "{:,.0f}"), ("recall@10 vs IndexFlatIP", "recall", "{:.4f}")]
    largest: dict[str, float] = {}
    stored = np.load(args.vectors, mmap_mode="r") if args.vectors else None
    if stored is not None and (stored.ndim != 2 or max(args.sizes) + args.queries > len(stored)):
        parser.error(f"--vectors: need {max(args.sizes) + args.queries} rows at least, got {stored.shape}")
    if stored is not None:  # real embeddings have their model's dimension (the bundle's CLIP: 256)
        DIM = stored.shape[1]
        hnsw_config = hnsw_config.model_copy(update={"dim": DIM})
    if args.clustered and args.vectors:
        parser.error("--clustered and --vectors are two kinds of data: give one")
    for size in args.sizes:
        if args.clustered:
            centres = unit_vectors(args.centres, seed=100)
            vectors, queries = clustered_vectors(size, 1, centres), clustered_vectors(args.queries, 2, centres)
        elif stored is None:
            vectors, queries = unit_vectors(size, seed=1), unit_vectors(args.queries, seed=2)
        else:
            vectors, queries = normalised(stored[:size]), normalised(stored[len(stored) - args.queries:])
        started = time.perf_counter()
        truth = ground_truth(vectors, queries)
        console.print(f"{size:,}: ground truth in {time.perf_counter() - started:.1f} s", highlight=False)
        kept: list = []
        hnsw = measure(hnsw_config, vectors, queries, truth, keep=kept)
        console.print(f"{size:,}: HNSW built in {hnsw['build_s']:.1f} s", highlight=False)
        sweep = ef_sweep(kept[0], queries, truth, args.ef_search)
        # the added items of the exact column below are random vectors of the data's dimension
        kept.clear()
        hnsw.pop("index")
        hnsw["add_per_s"] = float("nan")
        if args.no_exact:
            exact = {key: float("nan") for key in hnsw} | {"kind": "flat"}
        else:
            exact = measure(IndexConfig(dim=DIM, exact_below=size + ADDED + 1), vectors, queries, truth)
        assert (exact["kind"], hnsw["kind"]) == ("flat", "hnsw")

        data = "clustered" if args.clustered else (args.vectors or "random")
        table = Table(title=f"bench/index.py — {size:,} {data} vectors, dim {DIM}, {args.queries} queries, k={K}, "
                            f"threads={args.threads}; HNSW M={args.m} efConstruction={args.ef_construction} "
                            f"efSearch={args.ef_search}")
        table.add_column("measure")
        table.add_column("exact (IndexFlatIP)", justify="right")
        table.add_column("HNSW", justify="right")
        table.add_column("HNSW / exact", justify="right")
        for label, key, form in rows:
            table.add_row(label, form.format(exact[key]), form.format(hnsw[key]), f"{hnsw[key] / exact[key]:.3g}x")
        console.print(table)
        efs = Table(title=f"HNSW efSearch sweep — {size:,} {data} vectors, single queries, k={K}")
        for column in ("efSearch", "p50 (ms)", "p95 (ms)", "recall@10"):
            efs.add_column(column, justify="right")
        for row in sweep:
            efs.add_row(str(row["ef"]), f"{row['p50_ms']:.2f}", f"{row['p95_ms']:.2f}", f"{row['recall']:.4f}")
        console.print(efs)
        meeting = [row for row in sweep if row["recall"] >= 0.95]
        best = min(meeting, key=lambda row: row["p50_ms"]) if meeting else max(sweep, key=lambda row: row["recall"])
        largest = {"size": size, **hnsw, "p50_ms": best["p50_ms"], "recall": best["recall"], "ef": best["ef"]}
        del vectors
        gc.collect()

    at = f"at {largest['size']:,}" + ("" if largest["size"] >= 1_000_000 else " (the targets are for 1M: not measured)")
    at += f", efSearch {largest['ef']} (the fastest with recall >= 0.95, else the best recall)"
    for target, met, value in (("HNSW p50 <= 2 ms", largest["p50_ms"] <= 2, f"{largest['p50_ms']:.2f} ms"),
                               ("HNSW recall@10 >= 0.95", largest["recall"] >= 0.95, f"{largest['recall']:.4f}")):
        console.print(f"{target} {at}: {value} — {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
