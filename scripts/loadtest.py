"""Load test of ``loopfree serve`` on the loopback interface: many concurrent clients, with and without batching.

    python scripts/loadtest.py                                   # 200 requests, 32 clients, --max-batch 1 vs 8
    python scripts/loadtest.py --requests 24 --clients 8 --max-batch 1 --max-batch 4

For each ``--max-batch`` it starts ``python -m loopfree serve --port 0`` (the bundled toy student), asks for
every request's image once alone (one request at a time: the reference), then sends the same requests from
``--clients`` concurrent clients and checks that every one was answered and that each image is its own
request's: equal to the lone answer for that prompt and seed — byte for byte, or within 1/255 per pixel
where batched float kernels round differently (docs/serve.md); the references differ from each other by
far more, so a mixed-up image cannot pass. Stops the server with SIGTERM (it must exit 0) and prints
requests/s and p50/p99 latency as a table. Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from loopfree.toy.world import heldout_prompts

TOLERANCE = 1  # largest per-pixel difference (of 255) from the lone answer that still counts as the same image


@dataclass(frozen=True)
class Result:
    """One configuration's run."""

    max_batch: int
    answered: int
    identical: int  # PNG bytes equal to the lone answer
    same: int  # every pixel within TOLERANCE of the lone answer
    seconds: float
    latencies: list[float]
    images_per_call: float

    def row(self, requests: int, clients: int) -> str:
        p50, p99 = np.percentile(self.latencies, [50, 99]) * 1000 if self.latencies else (float("nan"),) * 2
        return (f"| {self.max_batch} | {requests} | {clients} | {self.answered}/{requests} | {self.identical} | "
                f"{self.same}/{requests} | {self.images_per_call:.1f} | {requests / self.seconds:.1f} | {p50:.0f} | {p99:.0f} |")


HEADER = ("| --max-batch | requests | clients | answered | identical PNG | same image | images/call | requests/s | "
          "p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|---|")


def workload(requests: int) -> list[dict]:
    """Request i: a toy-world prompt and seed i (prompts repeat after the held-out set's 216)."""
    prompts = heldout_prompts(min(requests, 216))
    return [{"prompt": prompts[i % len(prompts)], "seed": i} for i in range(requests)]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


async def ask(client: httpx.AsyncClient, url: str, body: dict) -> tuple[bytes | None, float]:
    """One request; (its PNG or None if it failed, latency in seconds)."""
    start = time.perf_counter()
    reply = await client.post(f"{url}/v1/images/generations", json=body, timeout=300)
    latency = time.perf_counter() - start
    if reply.status_code != 200:
        return None, latency
    return base64.b64decode(reply.json()["data"][0]["b64_json"]), latency


async def lone(url: str, bodies: list[dict]) -> list[bytes | None]:
    """Each request alone, one after another: the reference answers."""
    async with httpx.AsyncClient() as client:
        return [(await ask(client, url, body))[0] for body in bodies]


async def hammer(url: str, bodies: list[dict], clients: int) -> tuple[list[bytes | None], list[float], float]:
    """``bodies`` sent by ``clients`` concurrent clients (each its own connection, one request at a time);
    answers in request order, latencies, wall seconds."""
    answers: list[bytes | None] = [None] * len(bodies)
    latencies: list[float] = []
    todo = iter(range(len(bodies)))

    async def client_loop() -> None:
        async with httpx.AsyncClient() as client:
            for i in todo:
                answers[i], latency = await ask(client, url, bodies[i])
                latencies.append(latency)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return answers, latencies, time.perf_counter() - start


def distinct(references: list[bytes]) -> bool:
    """No two reference images within TOLERANCE of each other everywhere (so a swapped image is caught)."""
    images = np.stack([pixels(r) for r in references]).reshape(len(references), -1)
    return all(np.abs(images[i + 1 :] - images[i]).max(axis=1).min() > TOLERANCE for i in range(len(images) - 1))


def compare(answers: list[bytes | None], references: list[bytes]) -> tuple[int, int, int]:
    """(answered, byte-identical to the reference, within TOLERANCE of it)."""
    answered = sum(a is not None for a in answers)
    identical = sum(a == r for a, r in zip(answers, references))
    same = sum(a is not None and np.abs(pixels(a) - pixels(r)).max() <= TOLERANCE for a, r in zip(answers, references))
    return answered, identical, same


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def start_server(max_batch: int, max_queue: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    """``loopfree serve`` on a free loopback port; the process and its URL once it answers."""
    command = [sys.executable, "-m", "loopfree", "serve", "--port", "0", "--max-batch", str(max_batch),
               "--max-queue", str(max_queue), *(["--threads", str(threads)] if threads else [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if match := re.search(r"(http://\S+)", line):
            return process, match.group(1)
    raise RuntimeError(f"the server exited with code {process.wait()} before it served")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def run(max_batch: int, bodies: list[dict], clients: int, references: list[bytes] | None,
        threads: int | None = None) -> tuple[Result, list[bytes]]:
    """One configuration; references are taken from this server if not given."""
    process, url = start_server(max_batch, max(64, clients), threads)
    try:
        references = references or asyncio.run(lone(url, bodies))
        before = health(url)
        answers, latencies, seconds = asyncio.run(hammer(url, bodies, clients))
        after = health(url)
    finally:
        code = stop_server(process)
    if code != 0:
        raise RuntimeError(f"the server exited with code {code} after SIGTERM")
    calls = after["calls"] - before["calls"]
    answered, identical, same = compare(answers, references)
    per_call = (after["images"] - before["images"]) / max(calls, 1)
    return Result(max_batch, answered, identical, same, seconds, latencies, per_call), references


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, action="append", help="repeatable; default: 1 and 8")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    bodies = workload(args.requests)
    references, results = None, []
    for max_batch in args.max_batch or [1, 8]:
        result, references = run(max_batch, bodies, args.clients, references, args.threads)
        results.append(result)
    ok = all(r is not None for r in references) and distinct(references)
    ok = ok and all(r.answered == r.same == args.requests for r in results)
    print(f"python scripts/loadtest.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip())
    print(f"{os.cpu_count()} CPU cores; the bundled toy student (64x64 px, K=4); n=1 per request")
    print(HEADER)
    for result in results:
        print(result.row(args.requests, args.clients))
    print("all answered, none lost or mixed up" if ok else "FAILED: see the table")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
