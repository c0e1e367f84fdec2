"""Load test of the service: N concurrent clients for T seconds, adaptive batching on vs off, in one run.

    dvc repro package && python -m monitoring.promote && python bench/serve_load.py   # starts both servers itself
    python bench/serve_load.py --clients 64 --seconds 20 --scenario mixed
    python bench/serve_load.py --url http://localhost:3000           # only measure a running service
    python bench/serve_load.py --scenario generate_image --generator diffusion   # the diffusion model's images

Scenarios: `generate_text`, `generate_image` (every client on one endpoint) and `mixed` (a quarter of the
clients on each of text and image, and the other half uploading images to restore, which the service runs
one or two at a time and sheds beyond that). Each client (httpx, async) sends requests back to back; a shed
request (429 / 503 with `Retry-After`) is counted apart from errors, and its client waits as told (at most
5 s). Prints JSON per scenario and endpoint: requests/s, p50/p95/p99 latency (ms) of answered requests,
errors (transport errors and every other non-200), shed; and the throughput ratio batched / unbatched.
The servers serve the promoted models (params.yaml's `promotion.record`) from the BentoML store
($BENTOML_HOME), as `bentoml serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import io
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
SCENARIOS = ("generate_text", "generate_image", "mixed")
BODIES: dict[str, dict[str, Any]] = {}


def upload(side: int = 256) -> bytes:
    """A PNG of `side` x `side` RGB noise, to restore."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def request_bodies(url: str, label: str | None, generator: str | None = None) -> dict[str, dict[str, Any]]:
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
    image = {"label": label, "n": 4, **({"generator": generator} if generator else {})}
    return {"generate_text": {**text, "max_new_tokens": 32}, "generate_image": image}


def clients_of(scenario: str, clients: int) -> list[str]:
    """The endpoint each client calls."""
    if scenario != "mixed":
        return [scenario] * clients
    quarter = max(1, clients // 4)
    return ["generate_text"] * quarter + ["generate_image"] * quarter + ["restore_image"] * max(1, clients - 2 * quarter)


KEEPALIVE_EXPIRY_S = 2.0  # below the server's keep-alive timeout (uvicorn's default, 5 s)


async def load(url: str, scenario: str, clients: int, seconds: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the scenario; per endpoint: answered requests and their latencies, errors, shed."""
    stats: dict[str, dict[str, Any]] = {}
    deadline = time.perf_counter() + seconds
    image = upload()

    async def client(http: httpx.AsyncClient, index: int, endpoint: str) -> None:
        sent = 0
        mine = stats.setdefault(endpoint, {"latencies": [], "errors": 0, "shed": 0, "statuses": {}})
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            wait = 0.0
            try:
                if endpoint == "restore_image":
                    response = await http.post(f"{url}/{endpoint}", files={"image": ("x.png", image, "image/png")})
                else:
                    body = {**BODIES[endpoint], "seed": index * 100_000 + sent}
                    response = await http.post(f"{url}/{endpoint}", json=body)
                status = response.status_code
                if status == 200:
                    mine["latencies"].append((time.perf_counter() - start) * 1000)
                elif status in (429, 503) and response.headers.get("retry-after", "").isdigit():
                    mine["shed"] += 1
                    wait = min(5.0, float(response.headers["retry-after"]))
                else:
                    mine["errors"] += 1
                mine["statuses"][str(status)] = mine["statuses"].get(str(status), 0) + 1
            except httpx.HTTPError as err:
                mine["errors"] += 1
                mine["statuses"][type(err).__name__] = mine["statuses"].get(type(err).__name__, 0) + 1
            sent += 1
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))

    # The server closes a connection idle for 5 s (uvicorn's keep-alive); a client waiting out a 5 s Retry-After
    # and then reusing it races that close and loses its request (a ReadError). So idle connections expire sooner.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, i, e) for i, e in enumerate(clients_of(scenario, clients))))
        elapsed = time.perf_counter() - started

    def summary(mine: dict[str, Any]) -> dict[str, Any]:
        latencies = sorted(mine["latencies"])

        def pct(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else float("nan")

        return {"requests": len(latencies), "errors": mine["errors"], "shed": mine["shed"],
                "requests_per_s": round(len(latencies) / elapsed, 2), "p50_ms": pct(0.50), "p95_ms": pct(0.95),
                "p99_ms": pct(0.99), "statuses": mine["statuses"]}  # fmt: skip

    return {endpoint: summary(mine) for endpoint, mine in sorted(stats.items())}


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
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--url", default=None, help="measure this running service instead of starting two")
    parser.add_argument("--label", default=None, help="image label to request (default: the model's first)")
    parser.add_argument("--generator", choices=["gan", "diffusion"], default=None, help="default: the service's choice")
    args = parser.parse_args()
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    headers = {"authorization": f"Bearer {os.environ['AIGC_API_KEY']}"} if os.environ.get("AIGC_API_KEY") else None
    results: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds, "generator": args.generator or "default"}
    if args.url:
        BODIES.update(request_bodies(args.url, args.label, args.generator))
        for scenario in scenarios:
            results[scenario] = asyncio.run(load(args.url, scenario, args.clients, args.seconds, headers))
        print(json.dumps(results, indent=2))
        return
    for batching in (False, True):
        process, url = serve(batching)
        try:
            BODIES.update(request_bodies(url, args.label, args.generator))
            for scenario in scenarios:
                if scenario == "mixed" and not batching:
                    continue  # the mixed workload is about isolation, measured on the served configuration
                asyncio.run(load(url, scenario, 2, 2, headers))  # warm-up, not reported
                measured = asyncio.run(load(url, scenario, args.clients, args.seconds, headers))
                if scenario == "mixed":
                    results[scenario] = measured
                else:
                    results.setdefault(scenario, {})["batched" if batching else "unbatched"] = measured[scenario]
        finally:
            process.terminate()
            process.wait(timeout=30)
    for scenario in scenarios:
        if scenario != "mixed":
            r = results[scenario]
            r["throughput_ratio"] = round(r["batched"]["requests_per_s"] / max(r["unbatched"]["requests_per_s"], 1e-9), 2)
    results["goal"] = {"throughput_ratio": 3.0, "errors": 0, "device": "GPU, 32 clients"}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
