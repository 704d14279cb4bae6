"""The memory of TiUE as a LoRA beside the full student's (docs/benchmark.md, issue 31): ``loopfree bench --train
--memory`` for SD2.1 (512², 8 prompts per device) and SDXL (1024², 1 prompt per device), the activations measured at
256² and scaled by the pixel count (a CPU measures bf16 slowly), bf16 with gradient checkpointing, K = 4, on 1 device and 8 data parallel (the full student
also FSDP2-sharded over 8) — an estimate (exact parameter counts, activations measured on this CPU), one measurement
per (arch, student). Writes the rows as JSON and prints them as Markdown.

    python scripts/lora_memory.py docs/bench/memory/student-lora.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loopfree.bench.archs import ARCHS
from loopfree.bench.memory import HELD, measure_activations, memory_rows
from loopfree.utils.outputs import write_json

# (arch, size, measured at, batch, LoRA rank or None: the full student), in the order measured; the file is rewritten
# after each, so a stopped run keeps what it measured
SETUPS = [("sd21", 512, 256, 8, None), ("sd21", 512, 256, 8, 16), ("sdxl", 1024, 256, 1, None), ("sdxl", 1024, 256, 1, 16),
          ("sd21", 512, 256, 8, 4), ("sd21", 512, 256, 8, 64), ("sdxl", 1024, 256, 1, 64)]
DEVICES = [(1, False, "1 device"), (8, False, "8 DDP"), (8, True, "8 FSDP2")]


def main(out: str) -> int:
    records = []
    for name, size, at, batch, rank in SETUPS:
        measured = {}  # the process count doesn't change the measurement: once per (arch, student)

        def once(arch, cfg, latent, measured=measured):
            if "a" not in measured:
                measured["a"] = measure_activations(arch, cfg, latent)
            return measured["a"]

        for processes, shard, label in DEVICES:
            if shard and rank is not None:
                continue  # distill --shard refuses a LoRA student
            rows = memory_rows(ARCHS[name], (size, size), "bf16", batch, 4, True, measure_size=(at, at), measured=once,
                               processes=processes, shard=shard, student_lora_rank=rank)
            trained = [r for r in rows if r.phase == HELD and r.name.startswith(("student weights", "student AdamW",
                                                                                  "student EMA", "student LoRA", "DDP"))]
            frozen = [r for r in rows if r.phase == HELD and ("teacher" in r.name)]
            student = "full student" if rank is None else f"LoRA r {rank}"
            records.append({
                "name": f"{name}, {size}², {student}, {label}",
                "trained_state_gib": round(sum(r.gib for r in trained), 2),  # fp32 weights, AdamW, EMA, DDP buckets
                "frozen_unets_gib": round(sum(r.gib for r in frozen), 2),  # the teacher, a LoRA student's base
                "total_gib": round(next(r.gib for r in rows if r.kind == "total"), 1),
                "batch": batch, "arch": name, "student_lora_rank": rank, "processes": processes, "shard": shard,
                "rows": [r.__dict__ for r in rows],
            })
        print(f"measured {name} {student}", file=sys.stderr)
        write_json(Path(out), {"name": "student-lora-memory", "dtype": "bf16", "gradient_checkpointing": True,
                               "decoders": 4, "estimate": True, "measured_at": "256x256", "rows": records})
    print("| arch, student, launch | trained state (fp32) | frozen UNets (bf16) | total |\n| --- | ---: | ---: | ---: |")
    for r in records:
        print(f"| {r['name']} | {r['trained_state_gib']:.2f} | {r['frozen_unets_gib']:.2f} | **{r['total_gib']:.1f}** |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/lora_memory.py OUT.json")
    sys.exit(main(sys.argv[1]))
