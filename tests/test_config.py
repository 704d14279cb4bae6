"""Distillation config: YAML loading and saving, precedence, validation and the click options."""

from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from loopfree.cli.config_options import config_options
from loopfree.training.config import DistillConfig, load_config, save_config
from loopfree.utils.errors import LoopfreeError

REQUIRED = {"teacher": "teacher_dir", "prompts": "prompts.txt", "out": "out_dir"}


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    with pytest.raises(LoopfreeError) as info:
        load_config(_yaml(tmp_path, text), overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_defaults_are_the_papers():
    cfg = DistillConfig(**REQUIRED)
    assert (cfg.steps, cfg.guidance, cfg.kl_weight, cfg.kl_reduction) == (4, 4.5, 0.1, "sum")
    assert (cfg.t_min, cfg.t_max, cfg.fake_cfg_dropout) == (20, 980, 0.1)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (64, 108.0, ["to_q", "to_v"])
    assert (cfg.lr_student, cfg.lr_fake, cfg.ema_decay, cfg.max_grad_norm) == (1e-6, 1e-3, 0.9999, 1.0)


def test_yaml_round_trip(tmp_path):
    cfg = DistillConfig(
        **REQUIRED,
        timesteps=[900, 600, 300, 1],
        lora_targets=["to_q", "to_k", "to_v"],
        validation_prompts=["a cat, sitting", "no"],
        kl_reduction="mean",
        kl_weight=3.2,
        lr_student=2e-6,
        resolution=256,
        save_ema=False,
    )
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(tmp_path / "sub" / "config.yaml", {}) == cfg
    assert yaml.safe_load((tmp_path / "sub" / "config.yaml").read_text())["dtype"] == "fp32"


def test_kl_weight_follows_the_student_unless_given():
    assert DistillConfig(**REQUIRED).kl_weight == 0.1  # paper, TiUE
    assert DistillConfig(**REQUIRED, student="one-step").kl_weight == 0.0  # SwiftBrush has no KL term
    assert DistillConfig(**REQUIRED, student="one-step", kl_weight=0.05).kl_weight == 0.05


def test_yaml_spellings_are_accepted(tmp_path):
    text = "teacher: t\nprompts: p\nout: o\nlr-student: 1e-6\nguidance: 5\n"
    cfg = load_config(_yaml(tmp_path, text), {})
    assert cfg.lr_student == 1e-6  # YAML 1.1 reads 1e-6 as a string
    assert cfg.guidance == 5.0 and isinstance(cfg.guidance, float)


@pytest.mark.parametrize("key", ["decoder_steps", "mixed_precision", "vsd_t_min"])
def test_pre_release_key_names_are_unknown(tmp_path, key):
    with pytest.raises(LoopfreeError, match=f"unknown config key `{key}`"):
        load_config(_yaml(tmp_path, f"teacher: t\nprompts: p\nout: o\n{key}: 3\n"), {})


def test_given_overrides_beat_yaml_and_none_does_not(tmp_path):
    path = _yaml(tmp_path, "teacher: t\nprompts: p\nout: o\nbatch_size: 4\nguidance: 6.0\n")
    cfg = load_config(path, {"batch_size": 2, "guidance": None, "out": "elsewhere"})
    assert (cfg.batch_size, cfg.guidance, cfg.out) == (2, 6.0, "elsewhere")
    assert load_config(None, REQUIRED) == DistillConfig(**REQUIRED)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    message = _error(tmp_path, "teacher: t\nprompts: p\nout: o\nkl_wieght: 0.2\n")
    assert "kl_wieght" in message and "kl_weight" in message
    with pytest.raises(LoopfreeError, match="no_such_option"):
        load_config(None, {**REQUIRED, "no_such_option": 1})


def test_malformed_yaml_files(tmp_path):
    assert "mapping" in _error(tmp_path, "- a\n- b\n")
    assert "line 2" in _error(tmp_path, "teacher: t\nprompts: a: b\nout: o\n")
    assert "--teacher" in _error(tmp_path, "prompts: p\nout: o\n")
    with pytest.raises(LoopfreeError, match="not found"):
        load_config(tmp_path / "missing.yaml", {})


@pytest.mark.parametrize(
    "line, fragments",
    [
        ("batch_size: four", ["batch_size", "integer"]),
        ("batch_size: 2.5", ["batch_size", "integer"]),
        ("save_ema: maybe", ["save_ema", "true or false"]),
        ("guidance: true", ["guidance", "number"]),
        ("lora_targets: to_q", ["lora_targets", "list"]),
        ("timesteps: [900, 1.5, 300, 1]", ["timesteps[1]", "integer"]),
        ("student: two-step", ["student", "tiue, one-step"]),
        ("dtype: fp8", ["dtype", "fp32, fp16, bf16"]),
        ("batch_size: 0", ["batch_size", "≥ 1"]),
        ("steps: 0", ["steps", "≥ 1"]),
        ("steps: 1", ["steps = 1", "one-step"]),
        ("t_max: 1000", ["t_max", "[0, 999]"]),
        ("t_min: 500\nt_max: 400", ["t_min", "t_max"]),
        ("timesteps: [900, 600, 1]", ["timesteps", "3 entries"]),
        ("timesteps: [900, 300, 600, 1]", ["timesteps", "decreasing"]),
        ("fake_cfg_dropout: 1.5", ["fake_cfg_dropout", "[0, 1]"]),
        ("resolution: 0", ["resolution", "≥ 1"]),
    ],
)
def test_invalid_values_are_named(tmp_path, line, fragments):
    message = _error(tmp_path, f"teacher: t\nprompts: p\nout: o\n{line}\n")
    for fragment in fragments:
        assert fragment in message


def test_resolution_is_checked_against_the_model_not_a_fixed_factor():
    """Defect 8: the toy VAE's factor is 4, so 60 px is a valid size; the model decides (distill's check_inputs)."""
    assert DistillConfig(**REQUIRED, resolution=60).resolution == 60


def test_single_decoder_step_is_fine_for_the_one_step_student():
    assert DistillConfig(**REQUIRED, student="one-step", steps=1).steps == 1


@click.command()
@config_options(DistillConfig)
def _command(**options):
    return options


def _invoke(*args: str, standalone_mode: bool = True):
    return CliRunner().invoke(_command, list(args), standalone_mode=standalone_mode)


def test_click_options_parse_into_overrides():
    result = _invoke(
        "--teacher", "t", "--prompts", "p.jsonl", "--out", "o",
        "--batch-size", "2", "--kl-weight", "3.2", "--kl-reduction", "mean",
        "--no-save-ema", "--gradient-checkpointing",
        "--timesteps", "900, 600,300,1", "--lora-targets", "to_q,to_k,to_v",
        "--validation-prompts", "a cat, sitting", "--validation-prompts", "a dog",
        standalone_mode=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    options = result.return_value
    assert options["batch_size"] == 2 and options["kl_weight"] == 3.2 and options["kl_reduction"] == "mean"
    assert options["save_ema"] is False and options["gradient_checkpointing"] is True
    assert options["timesteps"] == [900, 600, 300, 1]
    assert options["lora_targets"] == ["to_q", "to_k", "to_v"]
    assert options["validation_prompts"] == ["a cat, sitting", "a dog"]
    not_given = {name for name, value in options.items() if value is None}
    assert "guidance" in not_given and "max_steps" in not_given and "cache_prompt_embeds" in not_given
    cfg = load_config(None, options)
    assert (cfg.batch_size, cfg.guidance, cfg.save_ema, cfg.lora_targets[1]) == (2, 4.5, False, "to_k")


def test_click_rejects_bad_flag_values_with_exit_code_2():
    assert _invoke("--student", "two-step").exit_code == 2
    assert _invoke("--timesteps", "900,x").exit_code == 2
    assert _invoke("--batch-size", "many").exit_code == 2


def test_click_help_shows_paper_defaults():
    result = _invoke("--help")
    assert "--kl-weight" in result.output and "--no-save-ema" in result.output
    assert "paper: 4.5" in " ".join(result.output.split())
