"""``loopfree export``: a student's whole sampler — tokens and x_T to uint8 pixels — as one ONNX or ``.pt2`` graph.

    loopfree export --out exported/student                       # the bundled toy student, ONNX
    loopfree export --model runs/tiue --out exported/tiue --format pt2 --resolution 512
    loopfree export --out exported/student-int8 --quantize int8   # onnxruntime's dynamic int8 (MatMul/Gemm weights)
"""

from __future__ import annotations

import click

from loopfree.cli import options


@click.command()
@options.model()
@options.out(help="Output folder for the graph, its tokenizers and export.json.")
@options.overwrite()
@click.option("--format", "fmt", type=click.Choice(("onnx", "pt2")), default="onnx", show_default=True,
              help="onnx: run by onnxruntime (or any ONNX runtime); pt2: a torch.export program (torch.export.load).")
@options.resolution("Image size the graph is fixed at: N (square) or WIDTHxHEIGHT (default: the model's).")
@click.option("--max-batch", type=click.IntRange(1, 63), default=16, show_default=True,
              help="Largest batch the graph takes (its batch is dynamic from 1 to this).")
@click.option("--quantize", type=click.Choice(("int8",)), default=None,
              help="With --format onnx: onnxruntime's dynamic int8 of the graph's MatMul/Gemm weights (convolutions fp32).")
def export(model, out, overwrite, fmt, resolution, max_batch, quantize) -> None:
    """Export a loop-free student (default: the bundled toy student) as one fp32 (or int8) graph, checked against PyTorch."""
    from loopfree.export.exporter import export_student

    folder = export_student(model, out, fmt=fmt, max_batch=max_batch, resolution=resolution, quantize=quantize,
                            overwrite=overwrite)
    click.echo(f"wrote the {fmt} graph to {folder}")
