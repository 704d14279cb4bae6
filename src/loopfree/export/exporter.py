"""``loopfree export``: a student's whole sampler as one graph file — ONNX (``torch.onnx``'s dynamo exporter,
onnxscript) or a ``torch.export`` program (``.pt2``) — with its tokenizers and a manifest::

    loopfree export --model out/student --out exported/student --format onnx

The graph (:class:`~loopfree.export.graph.SamplerGraph`) maps token ids and x_T to uint8 images with a dynamic batch
(1 … ``max_batch``). It is checked before the folder is published: the saved file, run by onnxruntime (or loaded
back by ``torch.export.load``), must give the PyTorch sampler's images within ``tolerance`` levels of 255, and the
saved tokenizers the pipeline's token ids. ``quantize="int8"`` publishes onnxruntime's dynamic int8 of the ONNX graph
instead (:func:`quantize_int8`), checked by its mean difference from PyTorch's images (``INT8_MEAN_LEVELS``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import OutputFolder, write_json
from loopfree.export.graph import SamplerGraph
from loopfree.export.runtime import MANIFEST, encode, require, tokenizer

FORMATS = ("onnx", "pt2")
QUANTIZATIONS = ("int8",)
INT8_MEAN_LEVELS = 4.0  # an int8 graph's images may differ from PyTorch's by this many levels of 255 on average
GRAPH_FILES = {"onnx": "sampler.onnx", "pt2": "sampler.pt2"}
CHECK_PROMPTS = ("a red circle on a white background", "a small blue square in the top left corner of a black background")


def save_tokenizer(pipe_tokenizer, path: Path) -> None:
    """The pipeline's fast tokenizer as ``tokenizers`` JSON with its padding to ``model_max_length`` and truncation
    built in, so ``Tokenizer.from_file(path).encode_batch(prompts)`` gives the pipeline's ids without transformers."""
    from tokenizers import Tokenizer

    backend = getattr(pipe_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoopfreeError(f"{type(pipe_tokenizer).__name__} has no fast (tokenizers) backend to export")
    tok = Tokenizer.from_str(backend.to_str())
    length = pipe_tokenizer.model_max_length
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=pipe_tokenizer.pad_token_id, pad_token=pipe_tokenizer.pad_token)
    tok.save(str(path))


def pipeline_ids(pipe_tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids as the pipelines' ``encode_prompt`` makes them."""
    return pipe_tokenizer(prompts, padding="max_length", max_length=pipe_tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids


def trace(graph: SamplerGraph, inputs: tuple[torch.Tensor, ...], max_batch: int) -> torch.export.ExportedProgram:
    """``graph`` traced by ``torch.export`` on ``inputs``, its batch dynamic from 1 to ``max_batch``; static for a
    ``max_batch`` of 1 (no symbolic shapes: an SD2.1-sized graph traces in minutes, not tens of them)."""
    dynamic = None if max_batch == 1 else tuple({0: torch.export.Dim("batch", min=1, max=max_batch)} for _ in inputs)
    with torch.no_grad():
        return torch.export.export(graph, inputs, dynamic_shapes=dynamic)


def save_graph(program: torch.export.ExportedProgram, path: Path, fmt: str, input_names: list[str]) -> None:
    """The traced program as ``.pt2``, or converted to ONNX (onnxscript) with its initialisers over 2 GB in an external
    data file beside it (``path.data``, onnxscript decides)."""
    if fmt == "onnx":
        torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=["images"], verbose=False).save(str(path))
    else:
        torch.export.save(program, str(path))


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 of the ONNX graph ``source``: the weights of its MatMul and Gemm nodes (attention,
    feed-forward, projections, the text encoder) as uint8 with per-tensor scales, activations quantised at run time;
    convolutions stay fp32 (their ConvInteger kernels ran slower than fp32 here). Unsigned weights (U8U8): with
    signed ones (U8S8) the int16 sums saturate on CPUs without VNNI, as onnxruntime's documentation warns
    (docs/deploy.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = source.with_name(source.name + ".data").exists()
    quantize_dynamic(source, target, weight_type=QuantType.QUInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=external)


def _run_saved(fmt: str, path: Path, names: list[str], inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """The saved graph run on ``inputs``: by onnxruntime, or the ``.pt2`` loaded back."""
    if fmt == "pt2":
        with torch.no_grad():
            return torch.export.load(str(path)).module()(*inputs).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["images"], {n: t.numpy() for n, t in zip(names, inputs)})[0]


def export_student(model: str | os.PathLike | None, out: str, *, fmt: str = "onnx", max_batch: int = 16,
                   resolution: tuple[int, int] | None = None, tolerance: int = 1, quantize: str | None = None,
                   overwrite: bool = False) -> Path:
    """Export ``model`` (a loop-free SD/SDXL student folder; default: the bundled toy student) to ``out``, in fp32 or
    (``quantize``) int8; the folder."""
    from loopfree.pipelines.files import denoiser_sha256
    from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
    from loopfree.toy.assets import model_folder
    from loopfree.utils.seeding import image_seed, initial_noise

    if fmt not in FORMATS:
        raise LoopfreeError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime")
    if quantize is not None and (quantize not in QUANTIZATIONS or fmt != "onnx"):
        raise LoopfreeError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, with the onnx format; got {quantize!r} with {fmt}")
    if not 1 <= max_batch <= 63:  # diffusers' upsamplers branch on batches of 64 and more
        raise LoopfreeError(f"max batch must be in 1..63, got {max_batch}")
    model = str(model_folder(model))
    info = inspect_pipeline(model)  # SD/SDXL folders only; nothing loaded or written if it fails
    height, width = resolution or (info.default_size, info.default_size)
    info.check_size(height, width)
    settings = dict(model=os.path.abspath(model), format=fmt, max_batch=max_batch, height=height, width=width, dtype="fp32",
                    quantize=quantize)
    folder = OutputFolder(out, "export", settings, overwrite=overwrite)

    stages = tqdm(total=4 + bool(quantize), desc="export", unit="stage")
    pipe = load_pipeline(model, dtype=torch.float32)
    graph = SamplerGraph.from_pipeline(pipe, height, width).eval()
    tokenizers = {"input_ids": pipe.tokenizer} | ({"input_ids_2": pipe.tokenizer_2} if graph.xl else {})
    batch = min(2, max_batch)
    prompts = list(CHECK_PROMPTS[:batch])
    ids = {name: pipeline_ids(tok, prompts) for name, tok in tokenizers.items()}
    x_T = initial_noise([image_seed(0, 0, i) for i in range(batch)], graph.latent_shape, dtype=pipe.unet.dtype)
    inputs = (ids["input_ids"], x_T) + ((ids["input_ids_2"],) if graph.xl else ())
    with torch.no_grad():
        expected = graph(*inputs).numpy()
    stages.set_postfix_str("torch.export")
    program = trace(graph, inputs, max_batch)
    stages.update()
    with folder:
        path = folder.path / GRAPH_FILES[fmt]
        stages.set_postfix_str("save")
        fp32 = path.with_name("fp32." + path.name) if quantize else path
        save_graph(program, fp32, fmt, graph.input_names)
        stages.update()
        if quantize:
            stages.set_postfix_str("quantize")
            quantize_int8(fp32, path)
            for file in (fp32, fp32.with_name(fp32.name + ".data")):
                file.unlink(missing_ok=True)
            stages.update()
        files = {name: f"tokenizer{name[len('input_ids'):]}.json" for name in tokenizers}
        for name, tok in tokenizers.items():
            save_tokenizer(tok, folder.path / files[name])
            if not np.array_equal(encode(tokenizer(folder.path / files[name]), prompts), ids[name].numpy()):
                raise LoopfreeError(f"the exported {files[name]} does not reproduce the pipeline's token ids")
        stages.update()
        stages.set_postfix_str("check")
        got = _run_saved(fmt, path, graph.input_names, inputs)
        if got.shape != expected.shape:
            raise LoopfreeError(f"the exported graph gives images of shape {got.shape}, PyTorch {expected.shape}: not written")
        levels = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        diff, mean = int(levels.max()), float(levels.mean())
        if quantize and mean > INT8_MEAN_LEVELS:
            raise LoopfreeError(f"the int8 graph's images differ from PyTorch's by {mean:.2f}/255 on average "
                                f"(tolerance {INT8_MEAN_LEVELS}): not written")
        if not quantize and diff > tolerance:
            raise LoopfreeError(f"the exported graph's images differ from PyTorch's by {diff}/255 (tolerance {tolerance}): not written")
        stages.update()
        stages.close()
        write_json(folder.path / MANIFEST, dict(
            settings, graph=GRAPH_FILES[fmt], files=sorted(p.name for p in folder.path.iterdir()), tokenizers=files,
            inputs={n: {"shape": ["batch", *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")} for n, t in zip(graph.input_names, inputs)},
            outputs={"images": {"shape": ["batch", height, width, 3], "dtype": "uint8"}},
            latent_shape=list(graph.latent_shape), x_T_dtype=str(x_T.dtype).removeprefix("torch."),
            decoder_timesteps=graph.timesteps, final_alpha_cumprod=graph.schedule.final_alpha_cumprod,
            source_sha256=denoiser_sha256(model, with_record=True), check_max_diff=diff,
            check_mean_diff=round(mean, 4), torch=torch.__version__,
        ))
    return folder.final
