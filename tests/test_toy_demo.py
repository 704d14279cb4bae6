"""The bundled toy teacher and student, and ``loopfree demo`` end to end in a shortened run."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from PIL import Image

from loopfree.cli import main
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.images import LINE
from loopfree.pipelines.loading import load_pipeline
from loopfree.toy.assets import bundled
from loopfree.demo.curves import seed_curves
from loopfree.demo.demo import METRICS, DemoConfig, format_table, run_demo, summarise
from loopfree.toy.world import heldout_prompts, parse_prompt


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_bundled_pipelines_are_small_safetensors_and_load_in_plain_diffusers(name):
    folder = bundled(name)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30e6
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_bundled_student_records_its_decoder_timesteps():
    student = load_pipeline(bundled("student"))
    assert len(student.decoder_timesteps) == 4
    assert student.decoder_timesteps == sorted(student.decoder_timesteps, reverse=True)


def test_generate_without_model_uses_the_bundled_student(tmp_path):
    out = tmp_path / "images"
    r = run("generate", "a red circle on a white background", "--out", out, "--images-per-prompt", 2)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "generate.json").read_text())
    assert settings["model"] == str(bundled("student")) and settings["timesteps"] == load_pipeline(bundled("student")).decoder_timesteps
    assert Image.open(out / "001.png").size == (64, 64)


def test_summarise_gives_mean_and_sample_spread():
    runs = [{**{k: float(i) for k in METRICS}, "unet_ms_per_image": 10.0 * i, "accuracy_shape": i / 4} for i in (1, 2, 4)]
    row = summarise("x", runs)
    assert row["alignment"] == pytest.approx(7 / 3) and row["alignment_std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert row["unet_ms_per_image"] == pytest.approx(70 / 3) and row["per_attribute_accuracy"] == {"shape": pytest.approx(7 / 12)}
    single = summarise("y", runs[:1])
    assert single["fd_std"] is None and single["runs"] == 1
    table = format_table([row, single]).splitlines()
    assert len(table) == 3 and "2.333 ± 1.528" in table[1] and "±" not in table[2]


FEW_PAIRS = {"regression_pairs": 8, "regression_steps": 2}  # the recipe's regression term, cheaply


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    cfg = DemoConfig(out=str(tmp_path_factory.mktemp("demo") / "run"), max_steps=2, num_prompts=3, images_per_prompt=2, teacher_steps=3,
                     distill_prompts=40, eval_every=1, distill=FEW_PAIRS)
    return cfg, run_demo(cfg)


def test_demo_writes_grid_metrics_and_students(short_demo):
    cfg, rows = short_demo
    out = Path(cfg.out)
    report = json.loads((out / "metrics.json").read_text())
    names = ["teacher 3-step DDIM", "teacher 3-step propagate", "teacher 4-step DDIM", "one-step VSD", "TiUE"]
    assert [r["name"] for r in report["rows"]] == names and report["rows"] == rows
    for row in rows:
        assert 0 <= row["alignment"] <= 1 and math.isfinite(row["fd"]) and row["unet_ms_per_image"] > 0
        assert set(METRICS) <= set(row)
    for row, kind in zip(rows[3:], ("one-step", "tiue")):  # the students' training seconds, from their runs
        saved = json.loads((out / "students" / f"{kind}-seed0" / "timing.json").read_text())
        assert row["train_seconds"] == saved["train_seconds"] > 0 and row["train_seconds_std"] is None
    assert "train_seconds" not in rows[0]
    timing = report["timing"]
    assert timing["wall_s"] > timing["pairs_s"] > 0 and timing["trained"] == 2 and timing["threads"] >= 1
    # the evaluation prompts' attribute combinations were kept out of distillation
    train = (out / "distill_prompts-40-seed0.txt").read_text().splitlines()
    assert len(train) == 40 and not {parse_prompt(p) for p in train} & {parse_prompt(p) for p in heldout_prompts(64, seed=0)}
    assert report["prompts"] == heldout_prompts(3, seed=0) == heldout_prompts(64, seed=0)[:3]
    grid = Image.open(out / "grid.png")
    assert grid.height == LINE + 5 * 3 * 64 and grid.width > 3 * 3 * 64  # a line of column labels, 5 rows of 3× images
    for kind in ("one-step", "tiue"):
        student = StableDiffusionPipeline.from_pretrained(out / "students" / f"{kind}-seed0", safety_checker=None)
        assert student.unet.config.sample_size == 16


def test_the_mmdit_demo_distils_the_bundled_transformer_teacher(tmp_path):
    """``--teacher-arch mmdit``: the bundled SD3-shaped teacher, its Euler rows (no propagate row), students with the
    translated recipe (LoRA on the joint blocks' attention and MLP projections) sharing --shared-blocks."""
    from diffusers import StableDiffusion3Pipeline

    from loopfree.toy.settings import MMDIT_DISTILL

    out = tmp_path / "run"
    r = run("demo", "--teacher-arch", "mmdit", "--out", out, "--max-steps", "2", "--num-prompts", "3", "--images-per-prompt",
            "2", "--teacher-steps", "3", "--shared-blocks", "2", "--regression-pairs", "8", "--regression-steps", "2",
            "--threads", "1")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "metrics.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["teacher 3-step Euler", "teacher 4-step Euler", "one-step VSD", "TiUE"]
    assert report["settings"]["teacher"] == str(bundled("teacher-mmdit"))
    tiue = out / "students" / "tiue-seed0"
    assert json.loads((tiue / "loopfree.json").read_text())["shared_blocks"] == 2
    assert yaml.safe_load((tiue / "distill_config.yaml").read_text())["lora_targets"] == MMDIT_DISTILL["lora_targets"]
    assert StableDiffusion3Pipeline.from_pretrained(tiue, text_encoder_3=None, tokenizer_3=None).transformer.config.num_layers == 8


def test_learning_curves_end_at_the_rows_scores(short_demo):
    """Each student's curve is scored on the rows' prompts and x_T: its last point is the finished student's row."""
    cfg, rows = short_demo
    report = json.loads((Path(cfg.out) / "curves.json").read_text())
    assert report["eval_every"] == 1 and list(report["students"]) == ["one-step VSD", "TiUE"]
    for name, curve in report["students"].items():
        row = next(r for r in rows if r["name"] == name)
        assert curve["alignment"]["steps"] == [0, 1, 2]
        for metric in ("alignment", "fd", "diversity"):
            assert curve[metric]["mean"][-1] == row[metric] and curve[metric]["std"] == [0, 0, 0]
        assert curve["accuracy"]["mean"][-1] == pytest.approx(np.mean(list(row["per_attribute_accuracy"].values())))
    assert Image.open(Path(cfg.out) / "curves.png").format == "PNG"


def test_seed_curves_by_hand(tmp_path):
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    rec = lambda step, v: json.dumps({"step": step, "alignment": v, "fd": 10 * v, "diversity": v + 1, "accuracy_colour": v,
                                      "accuracy_shape": 1 - v})
    logs[0].write_text("\n".join([rec(0, 0.1), rec(5, 0.9), rec(5, 0.3), rec(10, 0.5)]) + "\n")  # step 5 again: a resume
    logs[1].write_text("\n".join([rec(0, 0.3), rec(5, 0.5)]) + "\n")
    curves = seed_curves(logs)
    assert curves["alignment"]["steps"] == [0, 5]  # the steps every run scored
    assert curves["alignment"]["mean"] == pytest.approx([0.2, 0.4]) and curves["fd"]["mean"] == pytest.approx([2.0, 4.0])
    assert curves["alignment"]["std"] == pytest.approx([2**0.5 * 0.1] * 2)
    assert curves["accuracy"]["mean"] == pytest.approx([0.5, 0.5]) and curves["accuracy_shape"]["mean"] == pytest.approx([0.8, 0.6])


def test_demo_reuses_finished_students_and_refuses_other_settings(short_demo):
    cfg, rows = short_demo
    unet = Path(cfg.out) / "students" / "tiue-seed0" / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.stat().st_mtime_ns
    again = run_demo(DemoConfig(**{**cfg.__dict__, "students": ("tiue",)}))
    assert unet.stat().st_mtime_ns == before
    assert again[3]["alignment"] == rows[4]["alignment"] and again[3]["fd"] == rows[4]["fd"]
    r = run("demo", "--out", cfg.out, "--max-steps", 2, "--num-prompts", 3, "--images-per-prompt", 2, "--teacher-steps", 3, "--students", "tiue")
    assert r.exit_code == 2 and "other settings" in r.output, r.output  # its prompt file differs (CLI default length)
    assert not (Path(cfg.out) / "distill_prompts-4000-seed0.txt").exists()
    # the same folder given relatively is the same run (the saved settings hold what paths mean, not how they were spelt)
    relative = run_demo(DemoConfig(**{**cfg.__dict__, "out": os.path.relpath(cfg.out), "students": ("tiue",)}))
    assert unet.stat().st_mtime_ns == before and relative[3]["fd"] == rows[4]["fd"]
    with pytest.raises(LoopfreeError, match="trained for 2 steps, more than --max-steps 1"):
        run_demo(DemoConfig(**{**cfg.__dict__, "max_steps": 1}))
    log = Path(cfg.out) / "students" / "tiue-seed0" / "eval.jsonl"
    kept = log.read_bytes()
    log.unlink()
    try:  # curves asked of a student trained without them: refused before anything is written
        with pytest.raises(LoopfreeError, match="tiue-seed0 was trained without --eval-every"):
            run_demo(DemoConfig(**{**cfg.__dict__, "students": ("tiue",)}))
    finally:
        log.write_bytes(kept)


def test_eval_toy_backend_reproduces_the_demo_rows(short_demo, tmp_path):
    """`loopfree eval --features toy` on the demo's teacher and student gives the demo's figures exactly."""
    cfg, rows = short_demo
    common = ["eval", "--features", "toy", "--num-prompts", 3, "--images-per-prompt", 2, "--batch-size", 64, "--threads", 1,
              "--metrics", "alignment,fid,pr,dc"]
    runs = [(rows[0], ["--model", bundled("teacher"), "--mode", "loop", "--steps", 3, "--guidance", 4.5]),
            (rows[1], ["--model", bundled("teacher"), "--mode", "propagate", "--steps", 3, "--guidance", 4.5]),
            (rows[4], ["--model", Path(cfg.out) / "students" / "tiue-seed0"])]
    for k, (row, args) in enumerate(runs):
        r = run(*common, *args, "--out", tmp_path / str(k))
        assert r.exit_code == 0, r.output
        got = json.loads((tmp_path / str(k) / "results.json").read_text())["metrics"]
        assert {key: got[key] for key in METRICS} == {key: row[key] for key in METRICS}, row["name"]
        assert {a: got[f"accuracy_{a}"] for a in row["per_attribute_accuracy"]} == row["per_attribute_accuracy"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--students", "tiue,nope"], "--students must name some of"),
        (["--num-prompts", "65"], "--num-prompts must be in 1..64"),
        (["--max-steps", "0"], "'--max-steps'"),
        (["--images-per-prompt", "1"], "--images-per-prompt must be at least 2"),
        (["--num-prompts", "2", "--images-per-prompt", "2"], "must exceed 5"),
        (["--teacher", "{missing}"], "does not exist"),
    ],
)
def test_demo_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    r = run("demo", "--out", out, *[str(tmp_path / "nope") if a == "{missing}" else a for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_demo_takes_every_distillation_setting_as_a_flag(tmp_path):
    """Issue 10: each ablation row must be reproducible from the command line; the flags reach the students."""
    from loopfree.cli.demo import demo as command
    from loopfree.demo.demo import student_config
    from loopfree.toy.settings import DEMO_DISTILL_KEYS

    flags = {p.name for p in command.params}
    assert set(DEMO_DISTILL_KEYS) <= flags
    cfg = DemoConfig(out=str(tmp_path), distill={"kl_weight": 0.3, "guidance": 2.0, "lr_student": 1e-4})
    tiue = student_config(cfg, "tiue", 0, "t", tmp_path / "p.txt")
    no_kl = student_config(cfg, "tiue-no-kl", 0, "t", tmp_path / "p.txt")
    assert (tiue.kl_weight, tiue.guidance, tiue.lr_student, tiue.lora_rank) == (0.3, 2.0, 1e-4, 16)
    assert no_kl.kl_weight == 0.0  # the student kind decides what it is
    one_step = student_config(cfg, "one-step", 0, "t", tmp_path / "p.txt")
    assert one_step.kl_weight == 0.0 and one_step.student == "one-step"  # SwiftBrush: no KL term, whatever --kl-weight says
    recipe = student_config(DemoConfig(out=str(tmp_path)), "tiue", 0, "t", tmp_path / "p.txt")
    assert (recipe.kl_weight, recipe.kl_reduction, recipe.lr_fake, recipe.guidance) == (1.0, "sum", 3e-3, 4.5)  # the studies' recipe
    assert (recipe.lr_student, recipe.regression_steps, recipe.regression_weight, DemoConfig().max_steps) == (6e-5, 8, 0.25, 175)  # the demo's budget
    r = run("demo", "--out", tmp_path / "x", "--lora-rnk", "3")
    assert r.exit_code == 2 and "No such option" in r.output


def test_rows_made_in_worker_processes_equal_those_made_one_after_another(tmp_path):
    """The demo's fast path (one worker process per row, one thread each) gives the sequential path's students,
    learning curves and rows, bit for bit."""
    from safetensors.torch import load_file

    from loopfree.utils.devices import cpu_threads
    from loopfree.demo.demo import RowScorer, Sampling, side_by_side, student_config, student_row, teacher_row

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(heldout_prompts(64, seed=1)[:20]) + "\n")
    scorer = RowScorer(heldout_prompts(64, seed=0), 3, 2, 0, 64)
    made = {}
    for path, threads in (("sequential", 1), ("parallel", 2)):
        cfg = DemoConfig(out=str(tmp_path / path), max_steps=2, eval_every=1, distill=FEW_PAIRS)
        todo = [student_config(cfg, kind, 0, str(bundled("teacher")), prompts) for kind in ("tiue", "one-step")]
        calls = [(student_row, (c, True, scorer, scorer)) for c in todo]
        calls.append((teacher_row, (str(bundled("teacher")), Sampling(64, 64, "loop", 3, None, 4.5), scorer)))
        with cpu_threads(threads):
            rows = side_by_side(calls)
        made[path] = rows, [(load_file(Path(c.out) / "unet" / "diffusion_pytorch_model.safetensors"),
                             [json.loads(line) for line in (Path(c.out) / "eval.jsonl").read_text().splitlines()]) for c in todo]
    (rows_a, runs_a), (rows_b, runs_b) = made["sequential"], made["parallel"]
    for (scores_a, images_a), (scores_b, images_b) in zip(rows_a, rows_b):
        assert np.array_equal(images_a, images_b) and scores_a.keys() == scores_b.keys()
        assert all(scores_a[k] == scores_b[k] for k in scores_a if k not in ("unet_ms_per_image", "train_seconds"))
    for (weights_a, curve_a), (weights_b, curve_b) in zip(runs_a, runs_b):
        assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
        assert curve_a == curve_b and [r["step"] for r in curve_a] == [0, 1, 2]


def test_the_table_shows_knn_scores_only_where_they_discriminate():
    """Issue 20: at 16 × 4 images precision/recall/density/coverage read 1.000 in every row; the table then shows
    the per-attribute accuracies that do differ, and the k-NN scores from 256 images on."""
    from loopfree.demo.demo import format_table

    row = {"name": "TiUE", "runs": 1, "unet_ms_per_image": 9.0, "per_attribute_accuracy": {"colour": 0.875, "shape": 0.75},
           **{k: 1.0 for k in ("alignment", "fd", "precision", "recall", "density", "coverage", "diversity")}}
    small, large = format_table([row], 64).splitlines(), format_table([row], 256).splitlines()
    assert "precision" not in small[0] and "colour" in small[0] and "0.875" in small[1] and "0.750" in small[1]
    assert "precision" in large[0] and "coverage" in large[0] and "colour" not in large[0]


@pytest.mark.parametrize("threads", [1, 2])
def test_side_by_side_returns_results_in_call_order_and_raises_a_failure(threads):
    from loopfree.demo.demo import side_by_side
    from loopfree.utils.devices import cpu_threads

    with cpu_threads(threads):
        assert side_by_side([(divmod, (7, 2)), (pow, (2, 10)), (divmod, (9, 4))]) == [(3, 1), 1024, (2, 1)]
        with pytest.raises(ZeroDivisionError):
            side_by_side([(divmod, (1, 0)), (pow, (2, 3))])
