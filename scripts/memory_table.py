"""The README's memory table at scale: ``loopfree bench --train --memory`` for SD2.1 (512²) and SDXL (1024²), K = 4,
bf16 with and without gradient checkpointing, batch 1 and 8 per device, on 1 device, 8 data parallel, and 8 and 16
FSDP2-sharded — an estimate (exact parameter counts, activations measured on the CPU), one measurement per
(arch, checkpointing), printed as Markdown.

    python scripts/memory_table.py > docs/memory-at-scale.md      # ~15 GB of RAM for SDXL's measurement
"""

from __future__ import annotations

import sys

from loopfree.bench.archs import ARCHS
from loopfree.bench.memory import measure_activations, memory_rows

SETUPS = [("sd21", 512, 512), ("sdxl", 1024, 512)]  # arch, resolution, measured at (pixels; scaled by the pixel count)
DEVICES = [(1, False, "1"), (8, False, "8 DDP"), (8, True, "8 FSDP2"), (16, True, "16 FSDP2")]


def main() -> int:
    head = "| arch, resolution | checkpointing | batch / device | " + " | ".join(label for *_, label in DEVICES) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(DEVICES)]
    for name, resolution, at in SETUPS:
        for checkpointing in (False, True):
            acts = {}  # batch and process count scale the measurement, they don't change it: measure once

            def once(arch, cfg, latent, acts=acts):
                if "a" not in acts:
                    acts["a"] = measure_activations(arch, cfg, latent)
                return acts["a"]

            for batch in (1, 8):
                cells = []
                for processes, shard, _ in DEVICES:
                    rows = memory_rows(ARCHS[name], (resolution, resolution), "bf16", batch, 4, checkpointing,
                                       measure_size=(at, at), measured=once, processes=processes, shard=shard)
                    cells.append(f"{next(r.gib for r in rows if r.kind == 'total'):.1f}")
                lines.append(f"| {name}, {resolution}² | {'on' if checkpointing else 'off'} | {batch} | " + " | ".join(cells) + " |")
            print(f"measured {name} checkpointing {'on' if checkpointing else 'off'}", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
