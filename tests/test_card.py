"""Model cards: every published student gets a Hub-style README.md, rewritten from the folder's records, and
``loopfree eval --card`` adds its row."""

import pytest
import yaml
from click.testing import CliRunner

from loopfree.cli import main
from loopfree.pipelines.card import add_card_results
from loopfree.training.trainer import distill
from tiny import distill_config as config
from tiny import make_teacher_folder


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    make_teacher_folder(root)
    return distill(config(root, root / "student", max_steps=1, checkpoint_every=0))


def test_a_published_student_has_a_model_card(student):
    text = (student / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image" and meta["base_model"].endswith("pipe")
    assert "loopfree" in meta["tags"] and "load_pipeline" in body and "StableDiffusionPipeline.from_pretrained" in body
    assert "[751, 501, 251, 1]" in body and "| `max_steps` | `1` |" in body and "## Results" not in body


def test_eval_results_are_added_to_the_card_and_replace_their_own_row(student):
    results = {"metrics": {"fd": 12.345, "alignment": 0.5}, "settings": {"prompts": "/p/heldout.txt"}, "images": 64}
    add_card_results(student, "toy", results)
    add_card_results(student, "toy", {**results, "metrics": {"fd": 10.0, "alignment": 0.75}})
    add_card_results(student, "other", results)
    body = (student / "README.md").read_text()
    assert "| toy | heldout.txt | 64 | 10.00 | 0.750 |" in body and "| other | heldout.txt | 64 | 12.3" in body
    assert body.count("| toy |") == 1


def test_eval_refuses_a_card_folder_that_holds_no_model(tmp_path):
    r = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "e"), "--card", str(tmp_path)])
    assert r.exit_code == 2 and "is not a published model folder" in r.output and not (tmp_path / "e").exists()
