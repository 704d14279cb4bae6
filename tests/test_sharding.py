"""FSDP2 sharding (`distill --shard`) on two gloo processes: the same student as data parallel within fp32 rounding,
exact resume from its torch.distributed.checkpoint shards, a published folder plain diffusers loads, and a resume
with another process count refused."""

import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from loopfree.training.config import load_config
from loopfree.utils.errors import LoopfreeError
from tiny import make_teacher_folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_folder(tmp_path_factory.mktemp("teacher"))


def launch(teacher, out, processes=2, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "loopfree", "distill", "--teacher", str(teacher / "pipe"), "--prompts", str(teacher / "prompts.txt"),
           "--out", str(out), "--batch-size", "2", "--lora-rank", "4", "--log-with", "none", "--lr-student", "1e-3",
           "--checkpoint-every", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def weights(run):
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_sharded_run_equals_data_parallel_and_resumes_exactly(teacher, tmp_path):
    runs = {name: tmp_path / name for name in ("dp", "sharded", "resumed")}
    for name, args in [("dp", ["--max-steps", "3"]), ("sharded", ["--max-steps", "3", "--shard"]),
                       ("resumed", ["--max-steps", "2", "--shard"]), ("resumed", ["--max-steps", "3", "--shard", "--resume", "latest"])]:
        p = launch(teacher, runs[name], 2, *args)
        assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes hold identical fake-score weights" in p.stdout
    ckpt = runs["sharded"] / "checkpoints" / "checkpoint-00000002"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "student").exists()  # no whole copy per checkpoint
    dp, sharded, resumed = weights(runs["dp"]), weights(runs["sharded"]), weights(runs["resumed"])
    teacher_unet = load_file(teacher / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    moved = max((dp[k] - teacher_unet[k]).abs().max().item() for k in dp)
    assert dp.keys() == sharded.keys() and moved > 1e-3
    assert max((dp[k] - sharded[k]).abs().max().item() for k in dp) < 1e-4  # fp32 rounding, far below a step
    assert all(torch.equal(sharded[k], resumed[k]) for k in sharded)
    # the published folder is a whole student that plain diffusers loads
    pipe = StableDiffusionPipeline.from_pretrained(runs["sharded"])
    assert all(torch.equal(v, sharded[k]) for k, v in pipe.unet.state_dict().items())
    assert isinstance(UNet2DConditionModel.from_pretrained(runs["sharded"] / "unet"), UNet2DConditionModel)
    # a different process count is refused in one line, before anything is loaded
    p = launch(teacher, runs["sharded"], 3, "--max-steps", "4", "--shard", "--resume", "latest")
    assert p.returncode != 0 and "was written by 2 processes; resume it with the same number (now 3)" in p.stderr
    assert "site-packages/loopfree" not in p.stderr and "/src/loopfree/" not in p.stderr  # torchrun's own report aside


def test_shard_needs_several_processes_and_no_fp16(teacher, tmp_path):
    p = subprocess.run([sys.executable, "-m", "loopfree", "distill", "--teacher", str(teacher / "pipe"), "--prompts",
                        str(teacher / "prompts.txt"), "--out", str(tmp_path / "one"), "--shard", "--log-with", "none"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--shard splits the student across processes" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(LoopfreeError, match="use --dtype bf16"):
        load_config(None, dict(teacher="t", prompts="p", out="o", shard=True, dtype="fp16"))


def test_sharded_bf16_with_checkpointing_publishes_a_finite_student(teacher, tmp_path):
    """The documented large-model setting: blocks gathered in bf16, activations recomputed, fp32 master shards."""
    p = launch(teacher, tmp_path / "bf16", 2, "--max-steps", "1", "--shard", "--dtype", "bf16", "--gradient-checkpointing")
    assert p.returncode == 0, p.stderr[-3000:]
    student = weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.values())
    assert student.keys() == weights(teacher / "pipe").keys()
