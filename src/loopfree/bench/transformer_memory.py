"""``loopfree bench --train --memory --arch flux-dev``: what distilling a transformer holds per device, from exact
parameter counts only — its activations are not measured yet (the transformer distillation step doesn't exist).

The parts are the UNet estimate's (:mod:`loopfree.bench.memory`), laid out the same way: the student (fp32 master
weights, AdamW's two moments, the EMA copy, its gradients), the frozen teacher in the weight dtype, the fake score's
LoRA (``DistillConfig``'s rank and targets, on the teacher's attention projections), the frozen text encoders and
VAE (fp32, as the trainer keeps them); with ``processes`` DDP's gradient buckets, or with ``shard`` FSDP2's full
sharding per block — the student's weights, moments, EMA and gradients 1/N each, plus the gathered root and two of
the largest blocks (the one running, the one prefetched) in the compute dtype. Built on the meta device.
"""

from __future__ import annotations

import torch

from loopfree.bench import memory as tables
from loopfree.bench.memory import EMA, FAKE, GIB, HELD, STUDENT, MemoryRow
from loopfree.bench.transformer_archs import TransformerArch
from loopfree.training.config import DistillConfig

PARAMETERS_ONLY = ("From exact parameter counts only: the activations of a transformer distillation step are not measured "
                   "yet, nor are workspaces, the allocator's overhead or the CUDA context.")


def parameter_counts(arch: TransformerArch, cfg: DistillConfig) -> dict[str, int]:
    """Parameters of the transformer (student = teacher shape), its fake-score LoRA, the text encoders, the VAE, the
    largest block and the root (what no block holds)."""
    from peft import inject_adapter_in_model

    from loopfree.method.scores import FAKE as ADAPTER
    from loopfree.training.distiller import fake_lora

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    model = arch.build("meta").requires_grad_(False)
    blocks = [count(b) for b in arch.blocks(model)]
    base = count(model)
    inject_adapter_in_model(fake_lora(cfg), model, ADAPTER)  # PixArt's class has no add_adapter; the LoRA is the same
    return {"transformer": base, "lora": count(model) - base, "text_encoders": sum(map(count, arch.build_text_encoders())),
            "vae": count(arch.build_vae()), "largest_block": max(blocks), "root": base - sum(blocks)}


def memory_rows(arch: TransformerArch, dtype: str = "fp32", processes: int = 1, shard: bool = False) -> list[MemoryRow]:
    """GiB per device of the counted parts of one distillation step, by phase (held throughout; what each update
    adds), and their total: held + the largest phase peak. Activations are not among them."""
    from loopfree.bench.speed import train_config
    from loopfree.training.distiller import WEIGHT_DTYPES

    n = parameter_counts(arch, train_config(1, 4, dtype, False, True))
    fp32, teacher = 4, torch.finfo(WEIGHT_DTYPES.get(dtype, torch.float32)).bits // 8
    shards = processes if shard else 1
    student, lora = n["transformer"] * fp32 / shards, n["lora"] * fp32
    part, half = (f", 1/{shards}" if shard else ""), ("fp32" if teacher == 4 else dtype)
    gathered = (n["root"] + 2 * n["largest_block"]) * teacher if shard else 0
    rows = [
        MemoryRow(f"student weights (fp32{part})", student, HELD, "counted"),
        MemoryRow(f"student AdamW moments (2 × fp32{part})", 2 * student, HELD, "counted"),
        MemoryRow(f"student EMA (fp32{part})", student, HELD, "counted"),
        *([MemoryRow("DDP gradient buckets (fp32)", student, HELD, "counted")] if processes > 1 and not shard else []),
        MemoryRow(f"teacher weights (frozen, {half})", n["transformer"] * teacher, HELD, "counted"),
        MemoryRow("fake-score LoRA: weights + AdamW (3 × fp32)", 3 * lora, HELD, "counted"),
        MemoryRow("text encoders (frozen, fp32)", n["text_encoders"] * fp32, HELD, "counted"),
        MemoryRow("VAE (frozen, fp32)", n["vae"] * fp32, HELD, "counted"),
        MemoryRow(f"gradients (fp32{part}), during backward", student, STUDENT, "counted"),
        *([MemoryRow(f"gathered: root + 2 blocks ({half}, FSDP2)", gathered, STUDENT, "counted")] if shard else []),
        MemoryRow("peak: gradients" + (" + gathered" if shard else "") + ", activations not counted", student + gathered,
                  STUDENT, "peak"),
        MemoryRow(f"a fp32 copy of the student (foreach update{part})", student, EMA, "counted"),
        MemoryRow("peak", student, EMA, "peak"),
        MemoryRow("LoRA gradients (fp32), activations not counted", lora, FAKE, "peak"),
    ]
    held = sum(r.gib for r in rows if r.phase == HELD)
    rows.append(MemoryRow("total: held + the largest peak, without activations",
                          held + max(r.gib for r in rows if r.kind == "peak"), "", "total"))
    return [MemoryRow(r.name, r.gib / GIB, r.phase, r.kind) for r in rows]


def format_memory_table(rows: list[MemoryRow], title: str) -> str:
    """The UNet estimate's table (:func:`loopfree.bench.memory.format_memory_table`) of parameter counts only."""
    return tables.format_memory_table(rows, title, PARAMETERS_ONLY, width=60)
