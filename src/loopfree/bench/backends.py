"""``loopfree bench --backend``: the whole one pass — token ids and x_T to uint8 images — run by torch (eager),
torch.compile, onnxruntime fp32 and onnxruntime int8 (the graphs ``loopfree export`` and ``--quantize int8``
write), each in a process of its own: seconds per call, images per second as a ratio to eager torch's in the same run,
and the process's peak resident memory::

    loopfree bench --backend all --threads 2 --quality --json    # the bundled toy student, with its demo scores
    loopfree bench --backend all --arch sd21 --resolution 512    # SD2.1's shapes, random weights

``--quality`` (a toy-world student) scores each backend's images of the demo's 64 evaluation prompts × 4 as the demo
and the studies do (alignment, fd, diversity, ...), so a quantised graph's quality is read beside its speed.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopfree.utils.errors import LoopfreeError

BACKENDS = ("torch", "torch-compile", "onnxruntime", "onnxruntime-int8")
ONNX_FILES = {"onnxruntime": "fp32.onnx", "onnxruntime-int8": "int8.onnx"}
QUALITY_BATCH = 16  # images per graph call when scoring


@dataclass
class BackendRow:
    name: str  # the backend
    seconds: float  # median seconds of one call on the batch
    images_per_s: float
    vs_torch: float | None  # images per second ÷ eager torch's, measured in the same run
    peak_rss_gib: float  # the backend process's peak resident memory (imports, weights, activations)
    setup_s: float  # loading (and compiling, or building the session) until the first call has returned
    scores: dict | None = None  # --quality: the demo's scores of this backend's images


def build_graph(model: str | None, arch: str | None, size: tuple[int, int] | None):
    """The sampler graph of a student folder (default: the bundled toy student) or, with ``arch``, of a student of
    that architecture's shapes with random weights (seeded: every process builds the same one); and its pipeline."""
    import torch

    from loopfree.export.graph import SamplerGraph
    from loopfree.pipelines.loading import load_pipeline
    from loopfree.toy.assets import model_folder

    if arch is None:
        pipe = load_pipeline(str(model_folder(model)), dtype=torch.float32)
    else:
        from loopfree.bench.archs import ARCHS
        from loopfree.bench.speed import sd21_scheduler
        from loopfree.pipelines.pipeline import LoopFreePipeline

        spec = ARCHS[arch]
        if spec.pooled_dim is not None:
            raise LoopfreeError(f"--backend --arch {arch}: only single-text-encoder (SD1/SD2) shapes are built for it")
        tokenizer = load_pipeline(str(model_folder(None))).tokenizer  # unused: random token ids go in
        pipe = LoopFreePipeline(spec.build_vae(), spec.build_text_encoders()[0], tokenizer, spec.build(), sd21_scheduler())
        size = size or (spec.resolution, spec.resolution)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = size or (native, native)
    return SamplerGraph.from_pipeline(pipe, height, width).eval(), pipe


def graph_inputs(graph, pipe, prompts: list[str] | None, seeds: list[int]) -> dict[str, np.ndarray]:
    """The graph's inputs: token ids of ``prompts`` (None: random ids of the text encoder's full length) and x_T."""
    import torch

    from loopfree.export.exporter import pipeline_ids
    from loopfree.utils.seeding import initial_noise

    if prompts is None:
        config = graph.text_encoder.config
        ids = torch.randint(0, config.vocab_size, (len(seeds), config.max_position_embeddings), generator=torch.Generator().manual_seed(0))
    else:
        ids = pipeline_ids(pipe.tokenizer, prompts)
    return {"input_ids": ids.numpy(), "x_T": initial_noise(seeds, graph.latent_shape).numpy()}


def _measure(job: dict) -> dict:
    """One backend, in this process: warm up (compile), then time ``repeats`` calls on the saved inputs."""
    start = time.perf_counter()
    feeds = dict(np.load(job["inputs"]))
    if job["backend"] in ("torch", "torch-compile"):
        import torch

        torch.set_num_threads(job["threads"])
        graph, _ = build_graph(job["model"], job["arch"], tuple(job["size"]))
        fn = torch.compile(graph) if job["backend"] == "torch-compile" else graph
        tensors = [torch.from_numpy(feeds[n]) for n in graph.input_names]

        def call():
            with torch.no_grad():
                return fn(*tensors)
    else:
        session = _session(job["graph"], job["threads"])
        call = lambda: session.run(["images"], feeds)  # noqa: E731
    call()
    setup = time.perf_counter() - start
    times = []
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "setup_s": setup, "peak_rss_gib": peak_rss_gib()}


def _session(path: str | Path, threads: int):
    """An onnxruntime CPU session of the graph at ``path`` on ``threads`` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def peak_rss_gib() -> float:
    """This process's peak resident memory: Linux's VmHWM (ru_maxrss would count the parent's memory at the fork)."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def backend_rows(backends: list[str], model: str | None = None, arch: str | None = None, size: tuple[int, int] | None = None,
                 batch: int = 1, repeats: int = 3, threads: int = 2, scorer=None,
                 progress=lambda stage: None) -> tuple[list[BackendRow], dict]:
    """The rows of ``backends`` (in the order given) and the run's facts (export and
    quantisation seconds, graph sizes). ``scorer`` (the demo's ``RowScorer``: ``jobs`` and ``scores(images)``)
    scores each backend's images of its jobs."""
    import torch

    from loopfree.export.exporter import quantize_int8, save_graph, trace

    graph, pipe = build_graph(model, arch, size)
    height, width = size = graph.latent_shape[1] * pipe.vae_scale_factor, graph.latent_shape[2] * pipe.vae_scale_factor
    facts: dict = {"height": height, "width": width, "batch_size": batch, "threads": threads, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="loopfree-bench-") as tmp:
        root = Path(tmp)
        prompts = None if arch else [f"prompt {i}" for i in range(batch)]
        np.savez(root / "inputs.npz", **graph_inputs(graph, pipe, prompts, list(range(batch))))
        onnx = [b for b in backends if b in ONNX_FILES]
        if onnx:
            progress("export")
            start = time.perf_counter()
            largest = max(batch, QUALITY_BATCH if scorer else 1)  # 1: a static graph
            seeds = list(range(min(2, largest)))
            example = tuple(torch.from_numpy(v) for v in graph_inputs(graph, pipe, None if arch else ["a", "b"][:len(seeds)], seeds).values())
            save_graph(trace(graph, example, largest), root / ONNX_FILES["onnxruntime"], "onnx", graph.input_names)
            facts["export_s"] = time.perf_counter() - start
            if "onnxruntime-int8" in onnx:
                progress("quantize")
                start = time.perf_counter()
                quantize_int8(root / ONNX_FILES["onnxruntime"], root / ONNX_FILES["onnxruntime-int8"])
                facts["quantize_s"] = time.perf_counter() - start
            facts["graph_mib"] = {b: sum(p.stat().st_size for p in root.glob(ONNX_FILES[b] + "*")) / 2**20 for b in onnx}
        rows = []
        for backend in backends:
            progress(backend)
            job = dict(backend=backend, model=model, arch=arch, size=list(size), threads=threads, repeats=repeats,
                       inputs=str(root / "inputs.npz"), graph=str(root / ONNX_FILES.get(backend, "")))
            done = subprocess.run([sys.executable, "-m", "loopfree.bench.backends", json.dumps(job)], capture_output=True, text=True)
            if done.returncode != 0:
                raise LoopfreeError(f"the {backend} backend failed: {done.stderr.strip().splitlines()[-1:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(BackendRow(backend, got["seconds"], batch / got["seconds"], None, got["peak_rss_gib"], got["setup_s"]))
        eager = next((r for r in rows if r.name == "torch"), None)
        for row in rows:
            row.vs_torch = row.images_per_s / eager.images_per_s if eager else None
        if scorer is not None:
            progress("quality")
            _score(rows, graph, pipe, root, threads, scorer)
    return rows, facts


def _score(rows: list[BackendRow], graph, pipe, root: Path, threads: int, scorer) -> None:
    """``scorer``'s scores of each backend's images of its jobs, QUALITY_BATCH per call (torch-compile: torch's
    computation, not scored again)."""
    import torch

    jobs = scorer.jobs
    feeds = [graph_inputs(graph, pipe, [j.prompt for j in jobs[i:i + QUALITY_BATCH]], [j.seed for j in jobs[i:i + QUALITY_BATCH]])
             for i in range(0, len(jobs), QUALITY_BATCH)]
    for row in rows:
        if row.name == "torch":
            run = torch.no_grad()(lambda feed: graph(*(torch.from_numpy(feed[n]) for n in graph.input_names)).numpy())
        elif row.name in ONNX_FILES:
            run = lambda feed, s=_session(root / ONNX_FILES[row.name], threads): s.run(["images"], feed)[0]  # noqa: E731
        else:
            continue
        row.scores = scorer.scores(np.concatenate([run(feed) for feed in feeds]))


def format_backend_table(rows: list[BackendRow], title: str) -> str:
    """The rows as an aligned text table (scores' alignment, fd and diversity where measured)."""
    scored = any(r.scores for r in rows)
    head = ["backend", "s / call", "images/s", "× torch", "peak RSS GiB", "setup s"] + (["alignment", "fd", "diversity"] if scored else [])
    lines = [head]
    for r in rows:
        line = [r.name, f"{r.seconds:.3f}", f"{r.images_per_s:.2f}", "" if r.vs_torch is None else f"{r.vs_torch:.2f}",
                f"{r.peak_rss_gib:.2f}", f"{r.setup_s:.1f}"]
        if scored:
            line += [f"{r.scores[k]:.3f}" if r.scores else "" for k in ("alignment", "fd", "diversity")]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join([title] + ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))) for line in lines])


if __name__ == "__main__":  # one backend's measurement, in its own process (backend_rows starts it)
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
