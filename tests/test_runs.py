"""A distillation's folder and checkpoints: resumed only as asked and with the same settings, verified, never mixed.

Each test here failed before the fix it names (issue "Correctness and coherence" defects 2, 3, 5, 6 and the
checkpoint part of "Reliability").
"""

import json
import signal

import pytest
import torch
import yaml
from accelerate import Accelerator
from click.testing import CliRunner
from safetensors.torch import load_file

from loopfree.training.checkpoint import MANIFEST, complete_checkpoints
from loopfree.cli import main
from loopfree.training.distiller import Distiller
from loopfree.utils.errors import LoopfreeError
from loopfree.pipelines.loading import load_pipeline
from loopfree.training.trainer import distill, student_pipeline, validate
from tiny import distill_config as config
from tiny import make_teacher_folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_folder(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def two_steps(teacher, tmp_path_factory):
    """A finished 2-step run (checkpoint at step 2); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "run"
    distill(config(teacher, out, max_steps=2))
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_sharded_student_checkpoint_loads_back(teacher, tmp_path):
    """Defect 2: an SDXL-sized student is written in shards; resuming must read them (diffusers' loading)."""
    pipe = load_pipeline(teacher / "pipe")
    d = Distiller(config(teacher, tmp_path), pipe.unet, pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    with torch.no_grad():
        for p in d.student_params:
            p.add_(torch.randn_like(p))
    d.save_weights(tmp_path, max_shard_size="20KB")
    shards = list((tmp_path / "student").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "student" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    fresh_pipe = load_pipeline(teacher / "pipe")
    fresh = Distiller(config(teacher, tmp_path), fresh_pipe.unet, fresh_pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    fresh.load_weights(tmp_path, ema_step=0)
    assert all(torch.equal(a, b) for a, b in zip(d.student_params, fresh.student_params))


def test_distill_gives_back_signal_handlers_and_random_state(teacher, tmp_path):
    """Defect 3: after distill() returns, Ctrl-C works again (and the caller's RNG stream is untouched)."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill(config(teacher, tmp_path / "run", max_steps=1, checkpoint_every=0))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert torch.equal(torch.rand(3), expected)


def test_validation_samples_at_the_training_resolution_and_logs_the_given_step(teacher, tmp_path):
    """Defect 5: the grid is at the training size (not the UNet's native 16 px) and the step is passed, not parsed."""
    out = distill(config(teacher, tmp_path / "run", max_steps=1, checkpoint_every=0, resolution=24, validate_every=1,
                         validation_prompts=["a red cat"]))
    from PIL import Image

    assert Image.open(out / "validation" / "step-00000001.png").size == (4 * 24, 24)
    acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    acc.init_trackers("t")
    pipe = load_pipeline(teacher / "pipe")
    d = Distiller(config(teacher, tmp_path), pipe.unet, pipe.scheduler, acc, latent_size=12)
    validate(student_pipeline(pipe, d, d.full_student(ema=False)), ["a red cat"], tmp_path / "grid.png", 7, 24, acc)  # a name that holds no step
    acc.end_training()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Images("validation")] == [7]


def test_resume_refuses_a_setting_that_alters_the_run_and_records_harmless_ones(teacher, two_steps, tmp_path):
    """Defect 6: resuming compares the configuration with the checkpoint's."""
    out = _copy(two_steps, tmp_path / "run")
    saved = (out / "distill_config.yaml").read_text()
    with pytest.raises(LoopfreeError, match="lr_student"):
        distill(config(teacher, out, max_steps=4, resume="latest", lr_student=2e-3))
    assert (out / "distill_config.yaml").read_text() == saved
    distill(config(teacher, out, max_steps=4, resume="latest", checkpoint_every=1))
    record = json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["changed"] == {"max_steps": [2, 4], "checkpoint_every": [2, 1]}
    assert yaml.safe_load((out / "distill_config.yaml").read_text())["max_steps"] == 4


def test_resume_latest_needs_a_checkpoint(teacher, tmp_path):
    with pytest.raises(LoopfreeError, match="no complete checkpoint"):
        distill(config(teacher, tmp_path / "run", resume="latest"))
    assert not (tmp_path / "run").exists()
    assert distill(config(teacher, tmp_path / "auto", max_steps=1, resume="auto")).is_dir()  # auto: start if there is none


def test_an_out_holding_a_run_needs_resume_or_overwrite(teacher, two_steps, tmp_path):
    out = _copy(two_steps, tmp_path / "run")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(LoopfreeError, match="pass --resume latest"):
        distill(config(teacher, out, max_steps=2))
    with pytest.raises(LoopfreeError, match=r"other settings \(lr_student"):
        distill(config(teacher, out, max_steps=2, lr_student=5e-4))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    distill(config(teacher, out, max_steps=1, checkpoint_every=1, overwrite=True))  # starts again: no stale checkpoint
    assert [json.loads((c / "trainer_state.json").read_text())["step"] for c in complete_checkpoints(out)] == [1]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "fake_lora.safetensors has"),
    ("delete", "random_states_0.pkl is missing"),
    ("unlist", "lacks random_states_0.pkl"),
    ("flip", "ema.safetensors does not match its hash"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(teacher, two_steps, tmp_path, damage, message):
    out = _copy(two_steps, tmp_path / "run")
    ckpt = out / "checkpoints" / "checkpoint-00000002"
    if damage == "truncate":
        data = (ckpt / "fake_lora.safetensors").read_bytes()
        (ckpt / "fake_lora.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (ckpt / "random_states_0.pkl").unlink()
    elif damage == "unlist":
        manifest = json.loads((ckpt / MANIFEST).read_text())
        del manifest["random_states_0.pkl"]
        (ckpt / MANIFEST).write_text(json.dumps(manifest))
    else:
        data = bytearray((ckpt / "ema.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ckpt / "ema.safetensors").write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["distill", "--teacher", str(teacher / "pipe"), "--prompts", str(teacher / "prompts.txt"),
                                  "--out", str(out), "--batch-size", "2", "--lora-rank", "4", "--log-with", "none",
                                  "--checkpoint-every", "2", "--max-steps", "4", "--lr-student", "1e-3", "--resume", "latest"])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert load_file(ckpt / "student" / "diffusion_pytorch_model.safetensors")  # nothing was overwritten


def test_learning_curve_scores_the_ema_student_on_schedule_without_touching_training(teacher, tmp_path):
    seen = []

    def evaluate(student, step):
        seen.append((step, student.decoder_timesteps))
        torch.randn(100)  # an evaluation draws random numbers of its own
        return {"mean_pixel": float(student("a red cat", output_type="pt", generator=torch.Generator().manual_seed(0)).images.mean())}

    plain = distill(config(teacher, tmp_path / "plain", max_steps=4))
    scored = distill(config(teacher, tmp_path / "scored", max_steps=4, eval_every=2), evaluate)
    assert [s for s, _ in seen] == [0, 2, 4] and seen[0][1] == [751, 501, 251, 1]
    lines = [json.loads(line) for line in (scored / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2, 4] and all("mean_pixel" in r for r in lines)
    a = load_file(plain / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(scored / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring along the way changes nothing in the run
    distill(config(teacher, scored, max_steps=6, eval_every=2, resume="latest"), evaluate)
    assert [json.loads(line)["step"] for line in (scored / "eval.jsonl").read_text().splitlines()] == [0, 2, 4, 6]


def test_a_run_record_lacking_a_setting_is_refused_by_name(teacher, two_steps, tmp_path):
    """No fallbacks for records of older versions (0.1.0 was never released): a missing setting is a change."""
    out = _copy(two_steps, tmp_path / "run")
    for path in (out / "loopfree-run.json", out / "checkpoints" / "checkpoint-00000002" / "trainer_state.json"):
        saved = json.loads(path.read_text())
        settings = saved["settings"] if "settings" in saved else saved["identity"]
        del settings["fake_updates"]
        path.write_text(json.dumps(saved))
    manifest = json.loads((out / "checkpoints" / "checkpoint-00000002" / MANIFEST).read_text())
    from loopfree.training.checkpoint import file_digest

    state = out / "checkpoints" / "checkpoint-00000002" / "trainer_state.json"
    manifest["trainer_state.json"] = {"size": state.stat().st_size, "blake2b": file_digest(state)}
    (out / "checkpoints" / "checkpoint-00000002" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LoopfreeError, match=r"fake_updates: None → 1"):
        distill(config(teacher, out, max_steps=3, resume="latest"))
