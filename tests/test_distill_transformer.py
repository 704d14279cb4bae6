"""The Distiller on an SD3 (rectified-flow) teacher: its student's decoder σ's, one step that trains only the
student and the fake score's LoRA, and its checkpointed weights loading back."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler

from loopfree.method import flow
from loopfree.training.config import load_config
from loopfree.training.distiller import Batch, Distiller
from loopfree.utils.errors import LoopfreeError
from test_flow_objective import conditioning, tiny_sd3

SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def config(tmp_path, **kw):
    base = dict(teacher=str(tmp_path / "teacher"), prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "out"),
                batch_size=2, steps=2, lora_rank=4, lora_targets=["to_q", "to_k", "to_v", "to_out.0"], log_with="none",
                lr_student=1e-3, shared_blocks=1)
    return load_config(None, {**base, **kw})


def distiller(tmp_path, **kw) -> Distiller:
    return Distiller(config(tmp_path, **kw), tiny_sd3(), SCHEDULER, Accelerator(cpu=True), latent_size=8)


def test_the_students_plan_is_the_schedulers_decoder_sigmas(tmp_path):
    assert distiller(tmp_path).timesteps == flow.decoder_sigmas(SCHEDULER.config, 2)
    assert distiller(tmp_path, student="one-step").timesteps == [1.0]
    with pytest.raises(LoopfreeError, match="not --timesteps"):
        distiller(tmp_path, timesteps=[751, 1])


@pytest.mark.parametrize("objective", ["vsd", "sid"])
def test_one_step_trains_the_student_and_the_lora_and_leaves_the_teacher(tmp_path, objective):
    torch.manual_seed(0)
    d = distiller(tmp_path, objective=objective)
    base = {n: p.detach().clone() for n, p in d.scores.base.named_parameters() if "lora" not in n}
    student = [p.detach().clone() for p in d.student_params]
    lora = [p.detach().clone() for p in d.lora_params]
    batch = Batch(conditioning(2, 1), conditioning(2, 2))
    logs = d.step([batch])
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert all(torch.equal(p, base[n]) for n, p in d.scores.base.named_parameters() if "lora" not in n)
    assert any(not torch.equal(a, b) for a, b in zip(student, d.student_params))
    assert any(not torch.equal(a, b) for a, b in zip(lora, d.lora_params))


def test_checkpointed_weights_load_back(tmp_path):
    torch.manual_seed(0)
    d = distiller(tmp_path)
    d.step([Batch(conditioning(2, 1), conditioning(2, 2))])
    d.save_weights(tmp_path)
    fresh = distiller(tmp_path)
    fresh.load_weights(tmp_path, ema_step=1)
    assert all(torch.equal(a, b) for a, b in zip(d.student_params, fresh.student_params))
    assert all(torch.equal(a, b) for a, b in zip(d.lora_params, fresh.lora_params))
    assert all(torch.equal(a, b) for a, b in zip(d.ema.shadow_params, fresh.ema.shadow_params))


def test_a_sharded_transformer_student_is_refused(tmp_path):
    with pytest.raises(LoopfreeError, match="data parallel for now"):
        distiller(tmp_path, shard=True)


