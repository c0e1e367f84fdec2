"""Load test of the service: N concurrent clients for T seconds, adaptive batching on vs off, in one run.

    dvc repro package && python -m monitoring.promote && python bench/serve_load.py   # starts both servers itself
    python bench/serve_load.py --clients 32 --seconds 20 --endpoint generate_text
    python bench/serve_load.py --url http://localhost:3000           # only measure a running service

Each client (httpx, async) sends requests back to back. Prints JSON: requests/s, p50/p95/p99 latency (ms),
errors, per configuration, and the throughput ratio batched / unbatched. The servers serve the promoted
models (params.yaml's `promotion.record`) from the BentoML store ($BENTOML_HOME), as `bentoml serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENDPOINTS = ("generate_text", "generate_image")
BODIES: dict[str, dict[str, Any]] = {}


def request_bodies(url: str, label: str | None) -> dict[str, dict[str, Any]]:
    """A request per endpoint for the served models: a `record` of the schema's first three fields (their
    most common training value, or a short text) or a `prompt`; a trained label (`label`, or the first)."""
    spec = httpx.get(f"{url}/docs.json", timeout=30).json()
    record = spec["components"]["schemas"].get("TextRecord")
    if record:
        fields = list(record["properties"].items())[:3]
        text: dict[str, Any] = {"record": {name: (field.get("examples") or ["a test value"])[0] for name, field in fields}}
    else:
        text = {"prompt": "Write one sentence."}
    if label is None:
        import bentoml

        sys.path.insert(0, str(ROOT))
        from monitoring.promote import record_path
        from serving.promoted import FAMILIES, RECORD_ENV, served_tags

        record = Path(os.environ.get(RECORD_ENV) or record_path(ROOT))
        tag = os.environ.get("AIGC_IMAGE_MODEL") or served_tags(record, FAMILIES)["image"]
        folder = Path(bentoml.models.get(tag).path)
        label = json.loads((folder / "config.json").read_text(encoding="utf-8"))["label_names"][0]
    return {"generate_text": {**text, "max_new_tokens": 32}, "generate_image": {"label": label, "n": 4}}


async def load(url: str, endpoint: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, index: int) -> None:
        nonlocal errors
        sent = 0
        while time.perf_counter() < deadline:
            body = {**BODIES[endpoint], "seed": index * 100_000 + sent}
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/{endpoint}", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors += 1
            sent += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else float("nan")

    return {"requests": len(latencies), "errors": errors, "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(batching: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AIGC_BATCHING": "1" if batching else "0", "AIGC_REQUEST_LOG": "/tmp/aigc-bench-log"}
    bentoml = str(Path(sys.executable).parent / "bentoml")
    process = subprocess.Popen(
        [bentoml, "serve", "serving.service:Gateway", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            sys.exit("bentoml serve exited: run `dvc repro package` and `python -m monitoring.promote` first")
        time.sleep(0.5)
    process.kill()
    sys.exit("bentoml serve did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--endpoint", choices=[*ENDPOINTS, "both"], default="both")
    parser.add_argument("--url", default=None, help="measure this running service instead of starting two")
    parser.add_argument("--label", default=None, help="image label to request (default: the model's first)")
    args = parser.parse_args()
    endpoints = list(ENDPOINTS) if args.endpoint == "both" else [args.endpoint]
    results: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds}
    if args.url:
        BODIES.update(request_bodies(args.url, args.label))
        for endpoint in endpoints:
            results[endpoint] = asyncio.run(load(args.url, endpoint, args.clients, args.seconds))
        print(json.dumps(results, indent=2))
        return
    for batching in (False, True):
        process, url = serve(batching)
        try:
            BODIES.update(request_bodies(url, args.label))
            for endpoint in endpoints:
                asyncio.run(load(url, endpoint, 2, 2))  # warm-up, not reported
                results.setdefault(endpoint, {})["batched" if batching else "unbatched"] = asyncio.run(
                    load(url, endpoint, args.clients, args.seconds)
                )
        finally:
            process.terminate()
            process.wait(timeout=30)
    for endpoint in endpoints:
        r = results[endpoint]
        r["throughput_ratio"] = round(r["batched"]["requests_per_s"] / max(r["unbatched"]["requests_per_s"], 1e-9), 2)
    results["goal"] = {"throughput_ratio": 3.0, "errors": 0, "device": "GPU, 32 clients"}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
