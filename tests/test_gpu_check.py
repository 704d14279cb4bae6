"""scripts/gpu_check.py, the one-call GPU check, in its CPU form: every row present, the CUDA rows skipped, the
correctness row within fp32 rounding, and the JSON as printed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_on_a_cpu_with_its_cuda_rows_skipped(tmp_path):
    out = tmp_path / "check.json"
    args = ["--arch", "tiny", "--train-arch", "tiny", "--resolution", "64", "--repeats", "1", "--demo-steps", "1",
            "--demo-prompts", "2", "--demo-pairs", "8", "--demo-teacher-steps", "2", "--out", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {x["name"]: x for x in result["rows"]}
    assert not result["cuda"] and r.stdout.startswith("gpu_check on ")
    assert rows["hoisted = plain decoders, fp32 (max |Δ|)"]["value"] < 1e-4
    for name in ("fp16 one pass vs fp32 (relative error)", "bf16 one pass vs fp32 (relative error)",
                 "SDXL VAE fp16 decode at 1024² finite (force_upcast)", "peak memory, measured"):
        assert rows[name]["value"] is None and rows[name]["note"] == "skipped: no CUDA", name
    assert rows["UNet: one pass, K=4"]["unit"] == "ms" and rows["e2e: end-to-end, one pass, K=4, tiny VAE"]["value"] > 0
    assert rows["one iteration"]["value"] > 0 and rows["peak memory, bench --memory estimate"]["value"] > 0
    assert rows["wall time"]["value"] > 0 and any(name.startswith("TiUE:") for name in rows)
    for x in result["rows"]:
        if x["value"] is not None:
            assert f"{x['value']:.4g}" in r.stdout, x["name"]
    assert torch.__version__ == result["torch"]
