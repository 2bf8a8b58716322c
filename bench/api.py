"""HTTP API throughput and latency under 50 concurrent clients on loopback, side by side in one run.

A real `genshop serve` (uvicorn, one process) with the shipped genshop-mini CLIP embeds
every search query; its index holds ``--items`` catalog vectors (exact search below the
HNSW threshold, like a shop's first catalog). Each endpoint gets ``--requests`` requests
from ``--clients`` concurrent keep-alive clients, or as many as fit in ``--seconds``:

- ``GET /api/briefs/{id}``: a brief's status (auth, one SQLite read);
- ``GET /api/search?q=...``: text → image search (auth, CLIP text tower, index scan,
  ownership check of the hits) over 8 queries that repeat, as a shop's do (their vectors
  come from the cache after the first), and over queries that are all new (every one
  embedded; concurrent ones share a CLIP forward and an index search).

Targets: search p50 <= 100 ms and >= 300 req/s; status as before (438 req/s, issue 21).

The load generator is one asyncio process with a minimal keep-alive HTTP/1.1 client (about
0.1 ms of CPU a request), on the same cores as the server, so the figures are a floor for
a server with the machine to itself.

    python bench/api.py [--clients 50] [--requests 2000] [--seconds 30] [--items 20000]
"""

from __future__ import annotations

import _path  # noqa: F401, I001 - first: keeps bench/ off sys.path

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERIES = ["red kurta for women", "black leather wallet", "men's blue jeans", "white sports shoes",
           "gold watch", "floral summer dress", "navy formal shirt", "brown handbag"]
TOKEN = "bench-token"


def prepare_home(home: Path, items: int) -> str:
    """A catalog index of ``items`` random unit vectors and one queued brief of the designer; returns its id."""
    import json

    import numpy as np

    from genshop.briefs import Brief
    from genshop.embedding import OPEN_CLIP_CONFIG
    from genshop.settings import get_settings
    from genshop.store import open_store
    from genshop.understanding.index import IndexConfig, build_index

    settings = get_settings()
    dim = json.loads((settings.embedding_model / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["embed_dim"]
    vectors = np.random.default_rng(0).standard_normal((items, dim)).astype(np.float32)
    metadata = [{"kind": "catalog", "title": f"product {i}", "image_path": ""} for i in range(items)]
    build_index(IndexConfig(dim=dim), [f"p{i}" for i in range(items)], vectors, metadata).save(settings.index_dir)
    record, _ = open_store().create_brief(Brief(title="Women's red kurta", variants=4, seed=1, steps=4,
                                                guidance_scale=1.0, width=64, height=64, negative_prompt=""),
                                          settings.preset, designer="bench")
    return record.id


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One HTTP/1.1 keep-alive GET on an open connection; returns the status code (the body is read and dropped)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


async def load(url: str, paths: list[str], clients: int, requests: int, seconds: float) -> dict:
    """``clients`` keep-alive connections issuing GETs back to back, ``requests`` in all or until ``seconds``.

    A minimal HTTP/1.1 client on asyncio streams: the load generator shares the cores with the
    server, so it must cost far less per request than the server (httpx costs several ms)."""
    host, port = url.removeprefix("http://").split(":")
    requests_bytes = [f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
                      for path in paths]
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while issued < requests and time.monotonic() < deadline:
            request = requests_bytes[issued % len(requests_bytes)]
            issued += 1
            started = time.perf_counter()
            status = await get(reader, writer, request)
            latencies.append(time.perf_counter() - started)
            errors += status != 200
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)  # the 1st..99th percentiles
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * cuts[49], "p95_ms": 1000 * cuts[94], "p99_ms": 1000 * cuts[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint")
    parser.add_argument("--seconds", type=float, default=30.0, help="per endpoint, at most")
    parser.add_argument("--items", type=int, default=20_000, help="catalog vectors in the index")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="genshop-bench-api-"))
    os.environ.update(GENSHOP_HOME=str(home), GENSHOP_API_TOKENS=f"bench:{TOKEN}", GENSHOP_REWARD_MODEL="off",
                      GENSHOP_TORCH_THREADS="1")
    import httpx
    from rich.console import Console
    from rich.table import Table

    brief_id = prepare_home(home, args.items)
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "genshop.cli", "serve", "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "wb"))
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/api/me", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        warm = httpx.get(f"{url}/api/search", params={"q": "warm up"}, headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=120)  # loads the CLIP and the index once
        assert warm.status_code == 200 and len(warm.json()) == 10, warm.text
        endpoints = {
            "status GET /api/briefs/{id}": [f"/api/briefs/{brief_id}"],
            "search GET /api/search?q=": [str(httpx.URL("/api/search", params={"q": q})) for q in QUERIES],
            "search, every query new": [str(httpx.URL("/api/search", params={"q": f"{q} {n}"}))
                                        for n in range(args.requests) for q in QUERIES[:1]],
        }
        results = {name: asyncio.run(load(url, paths, args.clients, args.requests, args.seconds))
                   for name, paths in endpoints.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)

    table = Table("endpoint", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms",
                  title=f"{args.clients} concurrent clients, loopback, {os.cpu_count()} cores shared with the "
                        f"load generator; index of {args.items:,} items")
    for name, r in results.items():
        table.add_row(name, str(r["requests"]), str(r["errors"]), f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}",
                      f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}")
    Console(width=120).print(table)
    status, search, new = results.values()
    print(f"search against status: {search['rps'] / status['rps']:.1f}x the requests/s, "
          f"{search['p95_ms'] / status['p95_ms']:.1f}x the p95 latency")
    for name, r in (("search (repeating queries)", search), ("search (every query new)", new)):
        print(f"{name}: p50 {r['p50_ms']:.1f} ms [target <= 100: {'PASS' if r['p50_ms'] <= 100 else 'FAIL'}], "
              f"{r['rps']:.0f} req/s [target >= 300: {'PASS' if r['rps'] >= 300 else 'FAIL'}]")
    print(f"status: {status['rps']:.0f} req/s, p50 {status['p50_ms']:.1f} ms [target: unchanged, 438 req/s in issue 21]")


if __name__ == "__main__":
    main()
