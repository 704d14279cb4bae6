"""Several gloo processes: FSDP2 sharding (`distill --shard`) gives the same student as data parallel within fp32
rounding, resumes exactly from its torch.distributed.checkpoint shards and publishes a folder plain diffusers loads;
it validates and scores with the sharded student itself (never a whole fp32 copy) as data parallel does; a
checkpoint resumes with another process count, its state loaded bit for bit; and the teacher pairs the processes
make together equal one process's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from distill_hooks import evaluate
from loopfree.pipelines.loading import load_pipeline
from loopfree.training.config import load_config
from loopfree.training.data import load_prompts
from loopfree.training.pairs import teacher_pairs
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.utils.errors import LoopfreeError
from test_distill_transformer import sd3_teacher  # noqa: F401 - a fixture
from tiny import distill_config, make_teacher_folder

HOOKS = Path(__file__).parent / "distill_hooks.py"


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


def test_a_sharded_sd3_student_equals_data_parallel_and_loads_in_plain_diffusers(sd3_teacher, tmp_path):
    """FSDP2 per joint block: the SD3 student of two sharded processes is the data-parallel one within fp32 rounding."""
    from diffusers import StableDiffusion3Pipeline

    runs = {name: tmp_path / name for name in ("dp", "sharded")}
    for name, extra in [("dp", []), ("sharded", ["--shard"])]:
        p = launch(sd3_teacher, runs[name], 2, "--max-steps", "2", "--shared-blocks", "1", "--steps", "2", *extra)
        assert p.returncode == 0, p.stderr[-3000:]
    dp, sharded = (load_file(runs[n] / "transformer" / "diffusion_pytorch_model.safetensors") for n in ("dp", "sharded"))
    teacher = load_file(sd3_teacher / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert dp.keys() == sharded.keys() == teacher.keys() and max((dp[k] - teacher[k]).abs().max().item() for k in dp) > 1e-3
    assert max((dp[k] - sharded[k]).abs().max().item() for k in dp) < 1e-4
    pipe = StableDiffusion3Pipeline.from_pretrained(runs["sharded"], text_encoder_3=None, tokenizer_3=None)
    assert all(torch.equal(v, sharded[k]) for k, v in pipe.transformer.state_dict().items())


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


def launch_hooked(teacher, processes, hooks, **options):
    """``distill`` with ``options`` on ``processes`` gloo processes through tests/distill_hooks.py."""
    config = {**dict(teacher=str(teacher / "pipe"), prompts=str(teacher / "prompts.txt"), batch_size=2, lora_rank=4,
                     log_with="none", lr_student=1e-3), **options}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), str(HOOKS),
           json.dumps(config), json.dumps(hooks)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_sharded_validation_and_scores_equal_data_parallel_without_a_whole_student(teacher, tmp_path):
    """Every process samples with the sharded student (EMA swapped in for scores); full_weights raises until the
    final publish, so no whole fp32 copy is ever built for them."""
    options = dict(max_steps=2, checkpoint_every=0, validate_every=1, eval_every=1)
    launch_hooked(teacher, 2, {"evaluate": True}, out=str(tmp_path / "dp"), **options)
    launch_hooked(teacher, 2, {"evaluate": True, "no_gathers": True}, out=str(tmp_path / "sharded"), shard=True, **options)
    dp, sharded = ([json.loads(line) for line in (tmp_path / run / "eval.jsonl").read_text().splitlines()]
                   for run in ("dp", "sharded"))
    assert [r["step"] for r in sharded] == [0, 1, 2] and len(dp) == 3
    assert max(abs(a[k] - b[k]) for a, b in zip(dp, sharded) for k in a) < 1e-5  # fp32 rounding
    assert abs(dp[2]["p7"] - dp[1]["p7"]) > 1e-3  # a training step moves the scores far more
    published = evaluate(load_pipeline(tmp_path / "sharded"), 2)  # the EMA student of step 2, as published
    assert max(abs(published[k] - sharded[2][k]) for k in published) < 1e-5
    for step in (1, 2):
        grids = [np.asarray(Image.open(tmp_path / run / "validation" / f"step-{step:08d}.png"), dtype=int) for run in ("dp", "sharded")]
        assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1  # 8-bit rounding of fp32 noise


def same_state(a, b, where=""):
    """Tensors equal bit for bit and everything else equal, through nested dicts and lists; the tensors compared."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(same_state(a[k], b[k], f"{where}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(same_state(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, where
    return 0


def checkpoint_state(folder, scratch):
    """A checkpoint's student, optimiser, EMA and LoRA states, whole (torch.distributed.checkpoint shards gathered)."""
    state = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            state[name] = load_file(path)
        elif path.suffix == ".bin":
            state[name] = torch.load(path, weights_only=True)
    if (folder / "sharded").is_dir():
        dcp_to_torch_save(folder / "sharded", scratch)
        state["sharded"] = torch.load(scratch, weights_only=True)
    return state


@pytest.mark.parametrize("mode", ["data-parallel", "sharded"])
def test_a_checkpoint_of_two_processes_resumes_on_three_exactly(teacher, tmp_path, mode):
    options = dict(batch_size=1, checkpoint_every=2, shard=mode == "sharded")  # 3 processes × 1 of the 5 prompts
    launch_hooked(teacher, 2, {}, out=str(tmp_path / "two"), max_steps=2, **options)
    shutil.copytree(tmp_path / "two", tmp_path / "three")
    # teardown: DDP's reducers are gone before the process group is destroyed (else a deadlock at exit, see trainer.py)
    p = launch_hooked(teacher, 3, {"loaded": str(tmp_path / "loaded"), "teardown": True}, out=str(tmp_path / "three"),
                      max_steps=3, resume="latest", **options)
    saved = checkpoint_state(tmp_path / "two" / "checkpoints" / "checkpoint-00000002", tmp_path / "saved.pt")
    loaded = checkpoint_state(tmp_path / "loaded" / "checkpoints" / "checkpoint-00000000", tmp_path / "loaded.pt")
    assert same_state(saved, loaded) > 100  # student, Adam moments, EMA and LoRA as the two processes left them
    assert "resuming checkpoint-00000002 of 2 processes with 3" in p.stderr
    # the global prompt stream went on, 3 prompts a step: the 5th prompt of epoch 0 skipped, epoch 1 begun
    state = json.loads((tmp_path / "three" / "checkpoints" / "checkpoint-00000003" / "trainer_state.json").read_text())
    assert state["num_processes"] == 3 and (state["stream"]["epoch"], state["stream"]["position"]) == (1, 3)
    assert json.loads((tmp_path / "three" / "resumes.jsonl").read_text())["changed"]["num_processes"] == [2, 3]
    assert "3 processes hold identical" in p.stdout
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path / "three" / "unet"), UNet2DConditionModel)


def test_teacher_pairs_made_by_two_processes_equal_a_one_process_fill(teacher, tmp_path):
    regression = dict(regression_weight=0.5, regression_pairs=40, regression_steps=2)  # 2 chunks, one each
    launch_hooked(teacher, 2, {}, out=str(tmp_path / "run"), max_steps=1, checkpoint_every=0,
                  regression_cache=str(tmp_path / "two"), **regression)
    cfg = distill_config(teacher, tmp_path / "unused", regression_cache=str(tmp_path / "one"), **regression)
    pipe = load_pipeline(teacher / "pipe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs: the same arithmetic, bit for bit
    try:
        teacher_pairs(cfg, pipe.unet, pipe.scheduler, load_prompts(teacher / "prompts.txt").prompts,
                      PromptEncoder(pipe, torch.device("cpu"), 16), (4, 8, 8), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    one, two = (sorted((tmp_path / root).glob("*/pairs-*.safetensors")) for root in ("one", "two"))
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "two") for p in two] and len(one) == 2
    assert all(same_state(load_file(a), load_file(b)) == 2 for a, b in zip(one, two))
