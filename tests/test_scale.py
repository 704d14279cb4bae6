"""Training at scale, each against the plain run: gradient checkpointing (the same gradients, also through SiD's
scores), gradient accumulation (the update of the whole batch; resumable) and TF32."""

import json

import pytest
import torch
from accelerate import Accelerator

from loopfree.pipelines.loading import load_pipeline
from loopfree.training.data import PromptStream, load_prompts
from loopfree.training.distiller import Batch, Distiller
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.training.trainer import distill
from loopfree.utils.devices import tf32
from tiny import distill_config as config
from tiny import make_teacher_folder

PROMPTS = ["a red cat", "a blue dog", "the green circle", "a red dog"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_folder(tmp_path_factory.mktemp("teacher"))


def distiller(teacher, tmp_path, **kw) -> Distiller:
    """A Distiller on the tiny teacher with a LoRA that changes the fake score (the same for every call)."""
    pipe = load_pipeline(teacher / "pipe")
    d = Distiller(config(teacher, tmp_path, **kw), pipe.unet, pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in d.lora_params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return d


def conditioning(teacher, prompts=PROMPTS):
    pipe = load_pipeline(teacher / "pipe")
    return PromptEncoder(pipe, torch.device("cpu"), 16)(prompts)


def one_step(d: Distiller, batches: list[Batch]) -> dict:
    """One step from the same draws (seed 0): the gradients each optimiser steps on, the LoRA's gradients when the
    student steps, the logs and the updated weights."""
    seen = {}

    def grads(params):
        return [None if p.grad is None else p.grad.clone() for p in params]

    d.opt_student.optimizer.register_step_pre_hook(
        lambda *_: seen.update(student=grads(d.student_params), lora_at_student=grads(d.lora_params)))
    d.opt_fake.optimizer.register_step_pre_hook(lambda *_: seen.update(fake=grads(d.lora_params)))
    torch.manual_seed(0)
    logs = d.step(batches)
    return {**seen, "logs": logs, "student_after": [p.detach().clone() for p in d.student_params],
            "lora_after": [p.detach().clone() for p in d.lora_params]}


def assert_same(a: list, b: list, rtol: float = 1.3e-6) -> None:
    """Equal tensors (or both None), within ``rtol`` of each tensor's largest element: float32 rounding."""
    assert len(a) == len(b) and any(x is not None for x in a)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item())


@pytest.mark.parametrize("objective", ["vsd", "sid"])
@pytest.mark.parametrize("batch_teacher_fake", [True, False])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_step(teacher, tmp_path, objective, batch_teacher_fake):
    """SiD back-propagates through the teacher and fake-score passes: the checkpointed blocks are recomputed during
    backward, after the passes' routing (teacher rows off the LoRA, the LoRA frozen) has been left."""
    cond, uncond = conditioning(teacher, PROMPTS[:2])
    steps = {ckpt: one_step(distiller(teacher, tmp_path, objective=objective, batch_teacher_fake=batch_teacher_fake,
                                      gradient_checkpointing=ckpt), [Batch(cond, uncond)]) for ckpt in (False, True)}
    plain, ckpt = steps[False], steps[True]
    assert_same(ckpt["student"], plain["student"])
    assert_same(ckpt["fake"], plain["fake"])
    assert all(g is None for g in ckpt["lora_at_student"] + plain["lora_at_student"])  # the student's loss trains no LoRA


@pytest.mark.parametrize("objective, kl_reduction, kl_weight", [("vsd", "sum", 0.1), ("sid", "mean", 3.2)])
def test_an_accumulated_step_is_the_step_of_the_whole_batch(teacher, tmp_path, objective, kl_reduction, kl_weight):
    """Batch 2 × 2 micro-batches against batch 4, from the same draws; the regression term on teacher pairs and two
    fake-score updates included. A summed KL sums over all the step's items, as at batch 4."""
    cond, uncond = conditioning(teacher)
    g = torch.Generator().manual_seed(6)
    pair_x_T, pair_x0 = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    options = dict(objective=objective, kl_reduction=kl_reduction, kl_weight=kl_weight, regression_weight=0.5, fake_updates=2,
                   max_grad_norm=1e9)
    whole = one_step(distiller(teacher, tmp_path, batch_size=4, **options), [Batch(cond, uncond, pairs=(cond, pair_x_T, pair_x0))])
    micro = [Batch(cond.rows(i, i + 2), uncond.rows(i, i + 2), pairs=(cond.rows(i, i + 2), pair_x_T[i : i + 2], pair_x0[i : i + 2]))
             for i in (0, 2)]
    accumulated = one_step(distiller(teacher, tmp_path, batch_size=2, gradient_accumulation_steps=2, **options), micro)
    for part in ("student", "fake", "student_after", "lora_after"):  # rounding, through two Adam steps of the LoRA
        assert_same(accumulated[part], whole[part], rtol=1e-4)
    assert accumulated["logs"] == pytest.approx(whole["logs"], rel=1e-5)


def test_a_step_refuses_another_number_of_micro_batches(teacher, tmp_path):
    cond, uncond = conditioning(teacher, PROMPTS[:2])
    d = distiller(teacher, tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="takes 2 micro-batches, got 1"):
        d.step([Batch(cond, uncond)])


def test_accumulating_runs_resume_exactly_at_their_place_in_the_prompts(teacher, tmp_path):
    straight = distill(config(teacher, tmp_path / "a", gradient_accumulation_steps=2))
    distill(config(teacher, tmp_path / "b", gradient_accumulation_steps=2, max_steps=2))
    resumed = distill(config(teacher, tmp_path / "b", gradient_accumulation_steps=2, resume="latest"))
    from safetensors.torch import load_file

    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # each step took two batches of the prompt stream: after 2 steps it stands where 4 batches leave it
    stream = PromptStream(load_prompts(str(teacher / "prompts.txt")).prompts, 2, 0)
    for _ in range(4):
        stream.next_batch()
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert state["stream"] == stream.state_dict()


def test_allow_tf32_turns_tf32_on_for_the_run_and_back_after(teacher, tmp_path):
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    seen = []

    def evaluate(pipe, step):
        seen.append([f.allow_tf32 for f in flags])
        return {}

    distill(config(teacher, tmp_path, max_steps=1, checkpoint_every=0, eval_every=1, allow_tf32=True), evaluate)
    assert seen == [[True, True], [True, True]]  # at step 0 and after step 1
    assert [f.allow_tf32 for f in flags] == before
    with tf32(False):
        assert [f.allow_tf32 for f in flags] == before  # off: torch's own settings
