"""``loopfree study``: plans load or are refused by name; runs resume, finished ones are skipped, the table and
curves are written, and a grown plan trains only what is new."""

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loopfree.cli import main
from loopfree.demo.lock import lock_path
from loopfree.demo.study import load_plan, markdown_table, run_study
from loopfree.utils.errors import LoopfreeError
from test_distill_transformer import sd3_teacher  # noqa: F401 - a fixture

PLAN = """
max_steps: 2
eval_every: 1
seeds: [0]
num_prompts: 3
curve_prompts: 2
images_per_prompt: 2
teacher_steps: [2]
base: {regression_pairs: 8, regression_steps: 2}
variants:
  vsd: {}
  sid-zero-cfg: {objective: sid, guidance: 1.0, guidance_fake: 0.0}
"""


def test_a_study_trains_scores_and_reruns_only_what_is_new(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    rows = run_study(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml", tmp_path / "s")
    assert [r["name"] for r in rows] == ["teacher 2-step DDIM", "vsd", "sid-zero-cfg"]
    assert all(0 <= r["alignment"] <= 1 and r["fd"] > 0 for r in rows)
    assert rows[1]["train_minutes"] > 0 and rows[0]["train_minutes"] is None
    for name in ("study.json", "table.md", "curves.png", "runs/vsd/seed0/model_index.json", "runs/vsd/seed0/eval.jsonl"):
        assert (tmp_path / "s" / name).is_file(), name
    table = (tmp_path / "s" / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| sid-zero-cfg | 1 |" in table
    (score_file,) = (tmp_path / "s" / "scores").glob("vsd-seed0-*.json")
    assert json.loads(score_file.read_text())["alignment"] == rows[1]["alignment"]
    # --score-only on a grown plan trains nothing and tabulates what is finished
    grown = PLAN.replace("seeds: [0]", "seeds: [0, 1]")
    (tmp_path / "grown.yaml").write_text(grown)
    partial = run_study(load_plan(tmp_path / "grown.yaml"), tmp_path / "plan.lock.yaml", tmp_path / "s", train=False)
    assert [r["runs"] for r in partial[1:]] == [1, 1] and not (tmp_path / "s" / "runs" / "vsd" / "seed1").exists()
    # grown by a seed: the finished run is kept (its files untouched), only the new one trains
    before = (tmp_path / "s" / "runs" / "vsd" / "seed0" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    (tmp_path / "plan.yaml").write_text(PLAN.replace("seeds: [0]", "seeds: [0, 1]").replace("  sid-zero-cfg: {objective: sid, guidance: 1.0, guidance_fake: 0.0}\n", ""))
    rows = run_study(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml", tmp_path / "s")
    after = (tmp_path / "s" / "runs" / "vsd" / "seed0" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert before == after and rows[1]["runs"] == 2 and rows[1]["alignment_std"] is not None
    assert (tmp_path / "s" / "runs" / "vsd" / "seed1" / "model_index.json").is_file()


@pytest.mark.parametrize("text, message", [
    ("variants: {a: {seed: 3}}", "a sets seed, which a variant cannot set"),
    ("variants: {a: {nonsense: 3}}", "a sets nonsense"),
    ("variants: {}", "no variants"),
    ("max_steps: 3", "no `variants:` and no `sampled:`"),
    ("variants: {a: {}}\nbudget: 3", "unknown key(s) budget"),
    ("variants: {a: {}}\nnum_prompts: 65", "at most 64"),
])
def test_bad_plans_are_refused_by_name(tmp_path, text, message):
    (tmp_path / "plan.yaml").write_text(text)
    with pytest.raises(LoopfreeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_plan(tmp_path / "plan.yaml")
    r = CliRunner().invoke(main, ["study", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and message in r.output and not (tmp_path / "s").exists()


def test_markdown_table_by_hand():
    rows = [{"name": "t", "runs": 1, "train_minutes": None, **{k: 0.5 for k in ("alignment", "fd", "diversity", "precision",
                                                                              "recall", "density", "coverage")}},
            {"name": "s", "runs": 3, "train_minutes": 2.25, "alignment": 0.9, "alignment_std": 0.01, "fd": 10.0, "fd_std": 1.0,
             "diversity": 1.5, "diversity_std": 0.1, "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}]
    lines = markdown_table(rows).splitlines()
    assert lines[2] == "| t | 1 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | – |"
    assert lines[3].startswith("| s | 3 | 0.900 ± 0.010 | 10.000 ± 1.000 | 1.500 ± 0.100 | 1.000 |") and lines[3].endswith("| 2.2 |")


def test_a_fine_tuning_plan_sets_its_own_budget_and_scores_an_untrained_student_as_sampled(tmp_path):
    from loopfree.toy.assets import bundled

    plan = PLAN.replace("variants:\n  vsd: {}\n  sid-zero-cfg: {objective: sid, guidance: 1.0, guidance_fake: 0.0}\n", "") + (
        "sampled:\n  bundled-K2: {steps: 2}\n"
        f"variants:\n  finetune-K2: {{student_init: {bundled('student')}, steps: 2, max_steps: 1}}\n")
    (tmp_path / "plan.yaml").write_text(plan)
    rows = run_study(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml", tmp_path / "s")
    assert [r["name"] for r in rows] == ["teacher 2-step DDIM", "bundled-K2", "finetune-K2"]
    run = tmp_path / "s" / "runs" / "finetune-K2" / "seed0"
    assert json.loads((run / "timing.json").read_text())["steps"] == 1
    assert json.loads((run / "loopfree.json").read_text())["decoder_timesteps"] == [501, 1]
    assert len(list((tmp_path / "s" / "scores").glob("finetune-K2-seed0-*.json"))) == 1 and rows[1]["train_minutes"] is None
    (tmp_path / "bad.yaml").write_text("variants: {a: {}}\nsampled: {b: {steps: 0}}")
    with pytest.raises(LoopfreeError, match="sampled b must be"):
        load_plan(tmp_path / "bad.yaml")


def test_a_study_of_an_sd3_teacher_scores_its_euler_rows_and_its_students_sigmas(sd3_teacher, tmp_path):
    plan = PLAN.replace("variants:\n  vsd: {}\n  sid-zero-cfg: {objective: sid, guidance: 1.0, guidance_fake: 0.0}\n", "") + (
        f"teacher: {sd3_teacher / 'pipe'}\nvariants:\n  n1: {{shared_blocks: 1, lora_targets: [to_q, to_v]}}\n")
    (tmp_path / "plan.yaml").write_text(plan)
    rows = run_study(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml", tmp_path / "s")
    assert [r["name"] for r in rows] == ["teacher 2-step Euler", "n1"]
    recorded = json.loads((tmp_path / "s" / "runs" / "n1" / "seed0" / "loopfree.json").read_text())
    assert recorded["shared_blocks"] == 1 and len(recorded["decoder_sigmas"]) == 4  # TOY_DISTILL's K, one pass
    assert all(0 <= r["alignment"] <= 1 and r["fd"] > 0 for r in rows)


def test_a_plan_names_a_bundled_teacher():
    from loopfree.toy.assets import bundled, model_folder

    assert model_folder("teacher-mmdit", "teacher") == bundled("teacher-mmdit")
    assert model_folder(None, "teacher") == bundled("teacher") and model_folder("some/folder") == Path("some/folder")


def test_the_committed_plans_are_locked_and_keep_the_regression_weight_their_tables_were_made_with(tmp_path):
    """TOY_DISTILL's λ_reg has moved (0 → 0.25 → 1.0): each committed plan pins the λ_reg it ran with, and its committed
    lock holds every variant's full settings (probe.yaml's "vsd" had silently become VSD + regression)."""
    from loopfree.demo.lock import load_lock
    from loopfree.demo.study import run_configs

    made_with = {"probe.yaml": {"vsd": 0.0, "vsd-reg": 0.25, "sid": 0.0}, "recipe.yaml": {"tiue": 0.25, "one-step": 0.25},
                 "ablations.yaml": {"tiue-fake2": 0.25, "tiue-no-reg": 0.0}, "fd-probe.yaml": {"tiue-no-kl": 0.25, "tiue-reg1": 1.0},
                 "demo-budget.yaml": {"tiue": 0.25}, "recipe-reg1.yaml": {"tiue-reg1": 1.0, "one-step-reg1": 1.0},
                 "mmdit.yaml": {"tiue-n4": 1.0, "one-step": 1.0}, "student-lora-lr.yaml": {"lr3e-5": 1.0, "lr3e-3": 1.0},
                 "student-lora.yaml": {"lora-r4": 1.0, "lora-r64": 1.0}, "style-lora.yaml": {}}
    studies = Path(__file__).resolve().parents[1] / "studies"
    assert {p.name for p in studies.glob("*.yaml") if not p.name.endswith(".lock.yaml")} == set(made_with) | {"finetune.yaml"}
    for name, weights in made_with.items():
        plan, lock = load_plan(studies / name), load_lock(lock_path(studies / name))
        assert set(lock["variants"]) == set(plan.variants), name
        configs = run_configs(plan, lock, tmp_path, "teacher", tmp_path / "prompts.txt")
        assert {v: configs[v][0].regression_weight for v in weights} == weights, name


def test_a_lock_keeps_a_plan_from_a_later_recipe_change_and_refuses_changed_variants(tmp_path, monkeypatch):
    import loopfree.demo.lock as lock_module
    from loopfree.demo.lock import locked

    (tmp_path / "plan.yaml").write_text(PLAN)
    plan = load_plan(tmp_path / "plan.yaml")
    first = locked(plan, lock_path(tmp_path / "plan.yaml"))
    assert lock_path(tmp_path / "plan.yaml") == tmp_path / "plan.lock.yaml"
    assert first["variants"]["vsd"]["settings"]["lr_student"] == lock_module.TOY_DISTILL["lr_student"]
    monkeypatch.setitem(lock_module.TOY_DISTILL, "lr_student", 1.0)  # the recipe moves on
    again = locked(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml")
    assert again == first  # the locked variants keep their settings
    (tmp_path / "plan.yaml").write_text(PLAN + "  new: {}\n")
    grown = locked(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml")
    assert grown["variants"]["new"]["settings"]["lr_student"] == 1.0 and grown["variants"]["vsd"] == first["variants"]["vsd"]
    (tmp_path / "plan.yaml").write_text(PLAN.replace("  vsd: {}", "  vsd: {kl_weight: 0.5}"))
    with pytest.raises(LoopfreeError, match="variant vsd asks for other settings"):
        locked(load_plan(tmp_path / "plan.yaml"), tmp_path / "plan.lock.yaml")
    r = CliRunner().invoke(main, ["study", str(tmp_path / "plan.yaml"), "--lock-only"])
    assert r.exit_code == 2 and "variant vsd asks for other settings" in r.output


def test_a_sampled_model_is_locked_by_its_weights(tmp_path):
    import shutil

    from loopfree.demo.lock import locked
    from loopfree.toy.assets import bundled

    model = tmp_path / "student"
    shutil.copytree(bundled("student"), model)
    (tmp_path / "plan.yaml").write_text(f"variants: {{a: {{}}}}\nsampled: {{s: {{model: {model}, steps: 4}}}}\n")
    plan = load_plan(tmp_path / "plan.yaml")
    locked(plan, tmp_path / "plan.lock.yaml")
    (model / "loopfree.json").write_text((model / "loopfree.json").read_text().replace("751", "801"))  # another model there
    with pytest.raises(LoopfreeError, match="sampled row s: .* holds other weights than the plan was locked with"):
        locked(plan, tmp_path / "plan.lock.yaml")


def test_sampled_rows_take_lists_of_models_and_loras_and_lock_the_loras_too(tmp_path):
    import shutil

    from loopfree.demo.lock import locked, sampled_items
    from loopfree.toy.assets import bundled

    items = sampled_items({"model": "m", "lora": ["a", "b"], "steps": 4})
    assert [(i["model"], i["lora"]) for i in items] == [(os.path.abspath("m"), os.path.abspath("a")), (os.path.abspath("m"), os.path.abspath("b"))]
    with pytest.raises(LoopfreeError, match="2 models but 3 LoRAs"):
        sampled_items({"model": ["m", "n"], "lora": ["a", "b", "c"], "steps": 4})
    style = tmp_path / "style"
    style.mkdir()
    from safetensors.torch import save_file

    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, style / "pytorch_lora_weights.safetensors")
    models = [tmp_path / "s0", tmp_path / "s1"]
    for m in models:
        shutil.copytree(bundled("student"), m)
    (tmp_path / "plan.yaml").write_text(f"variants: {{a: {{}}}}\nsampled: {{s: {{model: [{models[0]}, {models[1]}], "
                                        f"style_lora: {style}, style_scale: 0.5, steps: 4}}}}\n")
    plan = load_plan(tmp_path / "plan.yaml")
    lock = locked(plan, tmp_path / "plan.lock.yaml")
    assert len(lock["sampled"]["s"]["sha256"]) == 2  # one per model, each with the style LoRA's file
    save_file({"unet.x.lora_A.weight": torch.ones(2, 2)}, style / "pytorch_lora_weights.safetensors")
    with pytest.raises(LoopfreeError, match="sampled row s: .* holds other weights than the plan was locked with"):
        locked(plan, tmp_path / "plan.lock.yaml")
