"""The options beyond the paper's VSD: SiD, guidance per network, the regression term on cached teacher pairs and
learning-rate schedules — each against an independent reference, and resumable like the rest of a run."""


import json

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from loopfree.training.distiller import lr_factor
from loopfree.pipelines.loading import load_pipeline
from loopfree.training.pairs import CHUNK, PairCache, pair_seed, teacher_pairs
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.training.trainer import distill
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.seeding import image_seed, initial_noise
from tiny import distill_config as config
from tiny import make_teacher_folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_folder(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("ours, theirs", [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")])
def test_lr_schedules_equal_diffusers_get_scheduler(ours, theirs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(theirs, opt, num_warmup_steps=5, num_training_steps=40)
    for step in range(40):
        assert lr_factor(ours, step, 5, 40) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        ref.step()


def test_pair_cache_fills_only_what_is_missing_and_loads_in_order(tmp_path):
    calls = []

    def make(indices):
        calls.append(indices)
        x = torch.tensor(indices, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return x, -x

    cache = PairCache(tmp_path, {"teacher": "t"}, count=CHUNK + 3)
    cache.fill(make)
    first = list(calls)
    (cache.path / f"pairs-{CHUNK:08d}.safetensors").unlink()  # an interrupted fill
    cache.fill(make)
    assert first == [list(range(CHUNK)), list(range(CHUNK, CHUNK + 3))] and calls[2:] == [list(range(CHUNK, CHUNK + 3))]
    x_T, x0 = cache.load()
    assert x_T.flatten().tolist() == list(range(CHUNK + 3)) and torch.equal(x0, -x_T)
    PairCache(tmp_path, {"teacher": "t"}, count=CHUNK + 3).fill(make)  # reused: nothing made
    assert len(calls) == 3
    assert PairCache(tmp_path, {"teacher": "u"}, count=CHUNK + 3).path != cache.path
    with pytest.raises(FileNotFoundError, match="incomplete"):
        PairCache(tmp_path, {"teacher": "u"}, count=1).load()


def test_pairs_of_a_teacher_replaced_at_the_same_path_are_made_anew(tmp_path):
    root = make_teacher_folder(tmp_path / "teacher")
    cfg = config(root, tmp_path / "run", regression_weight=0.5, regression_pairs=2, regression_steps=1,
                 regression_cache=str(tmp_path / "pairs"))

    def pairs():
        pipe = load_pipeline(root / "pipe")
        cache = teacher_pairs(cfg, pipe.unet, pipe.scheduler, ["a red cat"], PromptEncoder(pipe, torch.device("cpu"), 16),
                              (4, 8, 8), torch.device("cpu"))
        return cache.path, cache.load()[1]

    first_path, first = pairs()
    assert pairs()[0] == first_path  # the same teacher: reused
    unet = load_pipeline(root / "pipe").unet
    with torch.no_grad():
        for w in unet.parameters():
            w.add_(0.1)
    unet.save_pretrained(root / "pipe" / "unet")  # another teacher saved over the first
    second_path, second = pairs()
    assert second_path != first_path and not torch.equal(first, second)


def test_teacher_pair_noise_comes_from_the_run_seed(tmp_path):
    root = make_teacher_folder(tmp_path / "teacher")
    pipe = load_pipeline(root / "pipe")

    def x_T(seed):
        cfg = config(root, tmp_path / "run", seed=seed, regression_weight=0.5, regression_pairs=3, regression_steps=1,
                     regression_cache=str(tmp_path / "pairs"))
        cache = teacher_pairs(cfg, pipe.unet, pipe.scheduler, ["a red cat", "a blue dog"],
                              PromptEncoder(pipe, torch.device("cpu"), 16), (4, 8, 8), torch.device("cpu"))
        return cache.path, cache.load()[0]

    (path0, a), (path1, b) = x_T(0), x_T(1)
    assert path0 != path1 and not torch.equal(a, b)  # another training seed: other pairs, in a cache of their own
    assert torch.equal(b, initial_noise([pair_seed(1, i) for i in range(3)], (4, 8, 8)))
    images = {image_seed(s, p, i) for s in range(3) for p in range(40) for i in range(40)}
    assert not images & {pair_seed(s, i) for s in range(3) for i in range(1600)}  # never an image's noise


def test_sid_with_regression_and_schedules_trains_resumes_exactly_and_logs(teacher, tmp_path):
    options = dict(objective="sid", guidance=1.0, guidance_fake=0.0, regression_weight=0.5, regression_pairs=6,
                   regression_steps=2, regression_cache=str(tmp_path / "pairs"), lr_schedule="cosine", lr_warmup_steps=1,
                   log_with="tensorboard")
    straight = distill(config(teacher, tmp_path / "a", **options))
    pairs = list((tmp_path / "pairs").glob("*/pairs-*.safetensors"))
    assert len(pairs) == 1 and load_file(pairs[0])["x0"].shape == (6, 4, 8, 8)
    import shutil

    shutil.copytree(straight, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-00000004")  # as if stopped at step 2
    with pytest.raises(LoopfreeError, match="max_steps"):  # the cosine decays to 0 at max_steps: it decides the run
        distill(config(teacher, tmp_path / "b", resume="latest", **{**options, "max_steps": 6}))
    resumed = distill(config(teacher, tmp_path / "b", resume="latest", **options))
    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((straight / "logs").rglob("events.out.*")).parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/sid", "loss/regression", "lr/student"} <= tags
    lrs = [e.value for e in events.Scalars("lr/student")]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-3) and lrs[-1] < lrs[1]  # warm-up, then cosine decay


def test_resume_refuses_another_objective(teacher, tmp_path):
    distill(config(teacher, tmp_path / "a", max_steps=2))
    with pytest.raises(LoopfreeError, match="objective"):
        distill(config(teacher, tmp_path / "a", resume="latest", objective="sid"))


def test_student_init_starts_from_a_student_keeps_its_plan_and_records_it(teacher, tmp_path):
    first = distill(config(teacher, tmp_path / "first", timesteps=[900, 600, 300, 1]))
    init = config(teacher, tmp_path / "again", student_init=str(first), max_steps=1, lr_student=1e-12, lr_fake=1e-12,
                  checkpoint_every=0)
    again = distill(init)
    recorded = json.loads((again / "loopfree.json").read_text())
    assert recorded["decoder_timesteps"] == [900, 600, 300, 1] and recorded["distilled_from"] == str(first)
    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (first, again))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # started from the student, (almost) not moved
    other_k = distill(config(teacher, tmp_path / "k2", student_init=str(first), steps=2, max_steps=1, checkpoint_every=0))
    assert json.loads((other_k / "loopfree.json").read_text())["decoder_timesteps"] == [501, 1]  # fine-tuned to K = 2
    with pytest.raises(LoopfreeError, match="--student-init"):
        distill(config(teacher, tmp_path / "bad", student_init=str(tmp_path / "missing")))
    assert not (tmp_path / "bad").exists()
