"""``results.json`` / ``results.md`` of one evaluation, and ``loopfree eval --report``: several runs as one table
(the paper's Table 1 columns, plus KID, density/coverage and, in the toy world, alignment).

    print(report(["evals/sd21-50", "evals/tiue"]))
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import write_atomic, write_json

RESULTS = "results.json"
#: (metric key, column header, decimals); a column appears when some run has the metric
COLUMNS = (
    ("fid", "FID↓", 2), ("fd", "FD↓", 2), ("kid", "KID↓", 4), ("clip_score", "CLIP↑", 3), ("precision", "Precision↑", 3),
    ("recall", "Recall↑", 3), ("f1", "F1↑", 3), ("density", "Density↑", 3), ("coverage", "Coverage↑", 3),
    ("alignment", "Alignment↑", 3), ("diversity", "Diversity", 2), ("latency_ms", "Time (ms)", 1), ("memory_gb", "Memory (GB)", 2),
)
PACKAGES = ("loopfree", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "scipy", "pillow")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(runs: list[tuple[str, dict]]) -> str:
    """A Markdown table of ``(name, results.json content)`` pairs, one row each."""
    columns = [c for c in COLUMNS if any(c[0] in r["metrics"] for _, r in runs)]
    header = ["run", "model", "mode", "steps", "guidance", "images", *[c[1] for c in columns]]
    rows = []
    for name, r in runs:
        s = r["settings"]
        keys = r["sampling"].get("key_steps")
        mode = f"{s['mode']}, {len(keys)} key steps" if s["mode"] == "propagate" and keys else s["mode"]
        rows.append([name, Path(s["model"]).name, mode, str(r["sampling"]["steps"]), f"{s['guidance']:g}", str(r["images"]),
                     *[_cell(r["metrics"].get(key), digits) if key in r["metrics"] else "" for key, _, digits in columns]])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 6 + ["---:"] * len(columns)) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def write_results(out: Path, results: dict) -> None:
    """``results.json`` and ``results.md`` (the table row and what it was measured against) in ``out``."""
    write_json(out / RESULTS, results)
    s = results["settings"]
    lines = [f"# loopfree eval: {s['model']}", "", table([(out.name, results)]), "",
             f"- prompts: {s['prompts']} ({results['prompts']} prompts × {s['images_per_prompt']} images, seed {s['seed']})",
             f"- features: {results['features']['kind']}, metric resolution {results['features']['resolution']}",
             f"- reference: {results['reference']['what'] if results['reference'] else 'none'}"]
    if results.get("clip"):
        lines.append(f"- CLIP: {results['clip']['path']}")
    write_atomic(out / "results.md", "\n".join(lines) + "\n")


def report(dirs: list[str]) -> str:
    """One table over the ``results.json`` of several evaluation folders."""
    runs = []
    for d in dirs:
        path = Path(d) / RESULTS
        try:
            runs.append((Path(d).name, json.loads(path.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            raise LoopfreeError(f"{path} is missing: {d} holds no finished loopfree eval") from None
        except (OSError, ValueError) as e:
            raise LoopfreeError(f"cannot read {path} ({e.__class__.__name__})") from None
    return table(runs)
