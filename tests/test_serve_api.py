"""The image API with the official ``openai`` client and raw HTTP, against the bundled toy student and teacher
served in-process: images equal ``loopfree generate``'s files for the same seed; seeds reproduce; every bad
request → 4xx with a one-line reason and the server answers afterwards; concurrent requests get the images of
lone ones (the load test's short version); a full queue → 429; a request the model fails on fails alone."""

import asyncio
import base64
import importlib.util
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from loopfree.pipelines.generate import generate_images
from loopfree.serve.app import create_app
from loopfree.serve.batcher import Batcher
from loopfree.toy.assets import bundled
from serving import running, toy_engine

PROMPT = "a small red circle in the left of a white image"
spec = importlib.util.spec_from_file_location("loadtest", Path(__file__).parents[1] / "scripts" / "loadtest.py")
loadtest = sys.modules["loadtest"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loadtest)


@pytest.fixture(scope="module")
def server():
    engine = toy_engine()
    with running(create_app(engine, Batcher(engine.render, max_batch=8, max_queue=64))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-checked", max_retries=0)


def pngs(response) -> list[bytes]:
    return [base64.b64decode(image.b64_json) for image in response.data]


def post(url: str, body) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    return httpx.post(f"{url}/v1/images/generations", headers={"content-type": "application/json"}, timeout=60, **kwargs)


@pytest.mark.parametrize("asked, generate", [
    (dict(model="student", n=3, size="64x64", extra_body={"seed": 3}), dict(images_per_prompt=3, seed=3)),
    (dict(model="teacher", n=2, extra_body={"seed": 5, "steps": 4, "guidance": 2.0}),
     dict(model="teacher", images_per_prompt=2, seed=5, steps=4, guidance=2.0, mode="loop")),
])
def test_openai_client_images_equal_generate_files(client, tmp_path, asked, generate):
    response = client.images.generate(prompt=PROMPT, response_format="b64_json", **asked)
    images = pngs(response)
    assert len(images) == asked["n"] and response.seed == asked["extra_body"]["seed"]
    assert all(Image.open(io.BytesIO(png)).size == (64, 64) for png in images)
    if "model" in generate:
        generate["model"] = str(bundled(generate["model"]))
    out = generate_images(PROMPT, out=str(tmp_path / "generated"), device="cpu", **generate)
    assert images == [(out / f"{i:03d}.png").read_bytes() for i in range(asked["n"])]


def test_seeds_reproduce_and_a_drawn_seed_is_returned(client):
    def image(**extra) -> bytes:
        return pngs(client.images.generate(prompt=PROMPT, extra_body=extra))[0]

    assert image(seed=7) == image(seed=7) != image(seed=8)
    drawn = client.images.generate(prompt=PROMPT)
    assert isinstance(drawn.seed, int) and pngs(drawn)[0] == image(seed=drawn.seed)


def test_the_official_clients_optional_fields_are_accepted_and_change_nothing(client):
    """Issue 22: client code that sets quality, style or user keeps working (it was answered 422)."""
    plain = pngs(client.images.generate(prompt=PROMPT, extra_body={"seed": 4}))
    dressed = pngs(client.images.generate(prompt=PROMPT, quality="hd", style="vivid", user="u-1", extra_body={"seed": 4}))
    assert dressed == plain


def test_models_lists_the_student_then_the_teacher(client):
    assert [m.id for m in client.models.list()] == ["student", "teacher"]


@pytest.mark.parametrize("body, status, reason", [
    ({}, 422, "prompt: Field required"),
    ({"prompt": "   "}, 400, "prompt is empty"),
    ({"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ({"prompt": "x" * 2001}, 400, "at most 2000"),
    ({"prompt": PROMPT, "n": 0}, 400, "n must be in 1..10, got 0"),
    ({"prompt": PROMPT, "n": 11}, 400, "n must be in 1..10, got 11"),
    ({"prompt": PROMPT, "n": "three"}, 422, "n: Input should be a valid integer"),
    ({"prompt": PROMPT, "size": "big"}, 400, "size must be WIDTHxHEIGHT"),
    ({"prompt": PROMPT, "size": "63x64"}, 400, "width must be a positive multiple of 4"),
    ({"prompt": PROMPT, "size": "64x4096"}, 400, "height 4096 is over this model's limit"),
    ({"prompt": PROMPT, "response_format": "url"}, 400, "keeps no files"),
    ({"prompt": PROMPT, "model": "dall-e-3"}, 400, "'dall-e-3' is not served here"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed must be in 0..2^64-1"),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "seed must be in 0..2^64-1"),
    ({"prompt": PROMPT, "steps": 0}, 400, "steps must be in 1..1000"),
    ({"prompt": PROMPT, "mode": "fast"}, 400, "mode must be one of loop_free, loop"),
    ({"prompt": PROMPT, "guidance": 1000}, 400, "guidance must be a finite number"),
    ({"prompt": PROMPT, "guidance": "high"}, 422, "guidance: Input should be a valid number"),
    ({"prompt": PROMPT, "sede": 3}, 422, "sede: Extra inputs are not permitted"),
    ("{not json", 422, "JSON decode error"),
    ([PROMPT], 422, "Input should be a valid dictionary"),
])
def test_bad_requests_get_a_one_line_reason_and_the_server_goes_on(server, body, status, reason):
    reply = post(server, body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert reason in error["message"] and "\n" not in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert post(server, {"prompt": PROMPT}).status_code == 200


def test_the_openai_client_raises_with_the_reason(client):
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.images.generate(prompt="")


@pytest.mark.parametrize("max_batch", [1, 8])
def test_concurrent_requests_get_the_images_of_lone_requests(max_batch):
    engine = toy_engine()
    with running(create_app(engine, Batcher(engine.render, max_batch=max_batch, max_queue=64))) as url:
        bodies = loadtest.workload(24)
        references = asyncio.run(loadtest.lone(url, bodies))
        before = httpx.get(f"{url}/health").json()
        answers, latencies, _ = asyncio.run(loadtest.hammer(url, bodies, clients=8))
        after = httpx.get(f"{url}/health").json()
    answered, identical, same = loadtest.compare(answers, references)
    assert loadtest.distinct(references) and answered == same == len(bodies) == len(latencies)
    calls, images = after["calls"] - before["calls"], after["images"] - before["images"]
    assert images == len(bodies)
    if max_batch == 1:
        assert identical == len(bodies) and calls == images
    else:
        assert calls < images  # requests shared calls


class Gate:
    """The engine's render held until ``open`` is set; a prompt "explode" fails the call, as a model error would."""

    def __init__(self, engine):
        self.engine, self.open, self.entered = engine, threading.Event(), threading.Event()

    def __call__(self, settings, items):
        self.entered.set()
        assert self.open.wait(60)
        if any(item.prompt == "explode" for item in items):
            raise RuntimeError("out of memory (simulated)\nsecond line")
        return self.engine.render(settings, items)


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_full_queue_answers_429_and_a_failing_request_fails_alone(server):
    engine = toy_engine()
    gate = Gate(engine)
    with running(create_app(engine, Batcher(gate, max_batch=4, max_queue=3))) as url, ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, url, {"prompt": PROMPT, "seed": 0})
        wait_for(gate.entered.is_set)
        bodies = [{"prompt": PROMPT, "seed": 1}, {"prompt": "explode", "seed": 2}, {"prompt": PROMPT, "seed": 3}]
        queued = [pool.submit(post, url, body) for body in bodies]
        wait_for(lambda: httpx.get(f"{url}/health").json()["queued"] == 3)
        full = post(url, {"prompt": PROMPT})
        assert full.status_code == 429 and "queue is full (3 requests waiting)" in full.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0).images.generate(prompt=PROMPT)
        gate.open.set()
        replies = [f.result(60) for f in [first, *queued]]
        assert [r.status_code for r in replies] == [200, 200, 500, 200]
        assert replies[2].json()["error"] == {"message": "generation failed: out of memory (simulated)",
                                              "type": "server_error", "param": None, "code": None}
        assert post(url, {"prompt": PROMPT}).status_code == 200
    # the requests that shared the failed call were answered alone: the same bytes as lone requests
    for reply, body in zip([replies[1], replies[3]], [bodies[0], bodies[2]]):
        assert reply.json()["data"] == post(server, body).json()["data"]
