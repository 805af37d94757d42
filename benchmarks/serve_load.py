"""`hovle-edge serve` under load, measured from the outside with the real `openai` client: N
concurrent clients (1, 4, 16) each asking about a fresh shapes scene (a data: URL) and streaming the
answer, for a bounded time per level; requests/s, p50/p99 time to first token and total latency,
errors. Then the server's RSS before and after 500 more requests, and the prefix cache's effect:
time to first token of a second question about the same image vs the first.

    python benchmarks/serve_load.py --model /tmp/serve-demo/model [--seconds 20] [--clients 1,4,16]

The server runs as its own process (`hovle-edge serve`), so its RSS is its own."""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

import openai

from hovle_edge.shapes.world import questions, sample

MODEL = "demo"


def scene_request(seed: int) -> tuple[str, list[str]]:
    """A fresh scene as a PNG data URL, and questions about it."""
    things, image = sample(seed)
    out = io.BytesIO()
    image.save(out, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    return url, [q for q, _ in questions(things, random.Random(seed))]


def ask(client, url: str, question: str, max_tokens: int) -> tuple[float, float, dict]:
    """(time to first token, total) in seconds for one streamed answer, and the server's own timings."""
    started = time.perf_counter()
    first, timings = None, {}
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        timings = (chunk.model_extra or {}).get("timings") or timings
    total = time.perf_counter() - started
    return (total if first is None else first), total, timings


def load(base_url: str, clients: int, seconds: float, max_tokens: int, seeds) -> dict:
    ttft, totals, errors = [], [], []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop():
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        while time.perf_counter() < deadline:
            with lock:
                seed = next(seeds)
            url, asked = scene_request(seed)
            try:
                first, total, _ = ask(client, url, asked[0], max_tokens)
            except openai.APIError as e:
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                ttft.append(first)
                totals.append(total)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": len(totals), "errors": len(errors), "rps": len(totals) / elapsed,
            "ttft": ttft, "total": totals, "first_error": errors[0] if errors else ""}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cache_effect(base_url: str, images: int, max_tokens: int, seeds) -> dict:
    """Medians over fresh images of the first question about an image and of a second question about
    the same image: TTFT seen by the client, and the server's time for the prompt (cache, vision, prefill)."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    runs = {"first": [], "second": []}
    for _ in range(images):
        url, asked = scene_request(next(seeds))
        runs["first"].append(ask(client, url, asked[0], max_tokens))
        runs["second"].append(ask(client, url, asked[-1] if len(asked) > 1 else asked[0] + " ", max_tokens))
    return {which: {"ttft": statistics.median(r[0] for r in done),
                    "prompt_ms": statistics.median(r[2]["prompt_ms"] for r in done),
                    "first_token_ms": statistics.median(r[2]["first_token_ms"] for r in done)}
            for which, done in runs.items()}


def health(base_url: str) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health") as response:
        state = json.load(response)
    return ", ".join(f"{name} {state[name]['entries']} entries {state[name]['mb']} MB"
                     for name in ("prefix_cache", "image_cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, threads: int | None, cache_mb: float,
                 image_cache_mb: float) -> subprocess.Popen:
    command = ["hovle-edge", "serve", "--model", model_dir, "--port", str(port), "--model-name", MODEL,
               "--cache-mb", str(cache_mb), "--image-cache-mb", str(image_cache_mb), "--max-queue", "256"]
    if threads:
        command += ["--threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit("the server did not start within 120 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/serve-demo/model", help="An exported model folder (the demo's).")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="Load time per client count.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rss-requests", type=int, default=500)
    parser.add_argument("--cache-images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="The server's ONNX Runtime threads.")
    # Small budgets, so that both caches are full before RSS is first read: growth after that is a leak.
    parser.add_argument("--cache-mb", type=float, default=32)
    parser.add_argument("--image-cache-mb", type=float, default=4)
    args = parser.parse_args()

    port = free_port()
    server = start_server(args.model, port, args.threads, args.cache_mb, args.image_cache_mb)
    base_url = f"http://127.0.0.1:{port}/v1"
    seeds = iter(range(10_000_000, 20_000_000))
    try:
        load(base_url, 1, 2.0, args.max_tokens, seeds)  # warm up: first graph runs, allocator
        print(f"model {args.model}, {os.cpu_count()} CPUs, {args.seconds:.0f} s per level, streamed answers of "
              f"at most {args.max_tokens} tokens, a fresh scene image per request\n")
        print(" clients  requests  req/s  TTFT p50 ms  TTFT p99 ms  total p50 ms  total p99 ms  errors")
        for clients in [int(c) for c in args.clients.split(",")]:
            r = load(base_url, clients, args.seconds, args.max_tokens, seeds)
            print(f"{clients:8d}  {r['requests']:8d}  {r['rps']:5.2f}  {1000 * percentile(r['ttft'], 50):11.0f}  "
                  f"{1000 * percentile(r['ttft'], 99):11.0f}  {1000 * percentile(r['total'], 50):12.0f}  "
                  f"{1000 * percentile(r['total'], 99):12.0f}  {r['errors']:6d}  {r['first_error']}")

        before, caches = rss_mib(server.pid), health(base_url)
        done = errors = 0
        while done < args.rss_requests:
            r = load(base_url, 4, 5.0, args.max_tokens, seeds)
            done, errors = done + r["requests"], errors + r["errors"]
        after = rss_mib(server.pid)
        print(f"\nserver RSS before {before:.0f} MiB, after {done} more requests {after:.0f} MiB "
              f"({after - before:+.0f} MiB), errors {errors}; caches before {caches}, after {health(base_url)}")

        effect = cache_effect(base_url, args.cache_images, args.max_tokens, seeds)
        print(f"\nprefix + image cache, medians over {args.cache_images} fresh images (1 client):")
        print("                       client TTFT ms  server prompt ms  server first token ms")
        for which, label in (("first", "first question"), ("second", "same image, 2nd q")):
            e = effect[which]
            print(f"{label:<22} {1000 * e['ttft']:14.1f}  {e['prompt_ms']:16.2f}  {e['first_token_ms']:21.2f}")
        first, second = effect["first"], effect["second"]
        print(f"second / first: client TTFT {first['ttft'] / second['ttft']:.1f}x lower, server prompt "
              f"{first['prompt_ms'] / second['prompt_ms']:.1f}x lower")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
