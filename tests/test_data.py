"""Prompt loading (every format and error case) and the resumable, sharded prompt stream."""

import json
import sys
from pathlib import Path

import pytest

from loopfree.training.data import PromptSet, PromptStream, load_prompts
from loopfree.utils.errors import LoopfreeError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _raises(path: Path, *fragments: str, field: str | None = None) -> None:
    with pytest.raises(LoopfreeError) as info:
        load_prompts(path, field)
    message = str(info.value)
    assert "\n" not in message
    for fragment in (path.name, *fragments):
        assert fragment in message


# ---- formats ----------------------------------------------------------------------------------


def test_txt_strips_dedups_and_counts_blanks(tmp_path):
    path = _write(tmp_path / "p.txt", "\ufeff a cat \n\nA dog\na cat\n   \nan owl\n")
    assert load_prompts(path) == PromptSet(prompts=["a cat", "A dog", "an owl"], n_blank=2, n_duplicates=1)


def test_jsonl_dotted_field(tmp_path):
    records = [
        {"Task2": {"Caption": "a cat"}},
        {"Task2": {"Caption": "  "}},
        {"Task2": {"Caption": None}},
        {"Task2": {"Caption": "a dog"}, "other": 1},
        {"Task2": {"Caption": "a cat"}},
    ]
    lines = [json.dumps(r) for r in records]
    path = _write(tmp_path / "j.jsonl", "\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    assert load_prompts(path, "Task2.Caption") == PromptSet(["a cat", "a dog"], n_blank=3, n_duplicates=1)


def test_jsonl_default_field_and_bare_strings(tmp_path):
    path = _write(tmp_path / "j.jsonl", '{"prompt": "a cat"}\n"a dog"\n"a cat"\n')
    assert load_prompts(path) == PromptSet(["a cat", "a dog"], n_blank=0, n_duplicates=1)


def test_csv_column(tmp_path):
    text = 'id,prompt\n1,"a cat, sitting"\n2,\n\n3,a dog\n4,"a cat, sitting"\n'
    path = _write(tmp_path / "c.csv", text)
    assert load_prompts(path) == PromptSet(["a cat, sitting", "a dog"], n_blank=2, n_duplicates=1)
    assert load_prompts(path, "id").prompts == ["1", "2", "3", "4"]


def test_drawbench_csv_and_partiprompts_tsv_find_their_prompt_column(tmp_path):
    drawbench = _write(tmp_path / "drawbench.csv", 'Prompts,Category\n"A red colored car.",Colors\nA cat.,Simple\n')
    assert load_prompts(drawbench).prompts == ["A red colored car.", "A cat."]
    parti = _write(tmp_path / "PartiPrompts.tsv", "Prompt\tCategory\tChallenge\tNote\nbond, james\tPeople\tBasic\t\nan owl\tAnimals\tBasic\tx\n")
    assert load_prompts(parti).prompts == ["bond, james", "an owl"]
    assert load_prompts(parti, "Category").prompts == ["People", "Animals"]
    _raises(_write(tmp_path / "other.tsv", "text\tn\na\t1\n"), "no column 'prompt'")


def test_coco_captions_one_per_image_lowest_id_first(tmp_path):
    annotations = [
        {"image_id": 42, "id": 9, "caption": "a dog on a sofa. "},
        {"image_id": 7, "id": 5, "caption": "second of seven"},
        {"image_id": 7, "id": 3, "caption": "first of seven"},
        {"image_id": 42, "id": 12, "caption": "another dog"},
        {"image_id": 8, "id": 1, "caption": "first of seven"},  # the same words as image 7: a duplicate
    ]
    path = _write(tmp_path / "captions_val2014.json", json.dumps({"images": [], "annotations": annotations}))
    assert load_prompts(path) == PromptSet(["first of seven", "a dog on a sofa."], n_blank=0, n_duplicates=1)
    _raises(_write(tmp_path / "list.json", "[1, 2]"), "not a COCO captions file")
    _raises(_write(tmp_path / "broken.json", "{"), "not valid JSON")
    _raises(_write(tmp_path / "record.json", '{"annotations": [{"id": 1}]}'), "annotation 0", "image_id and caption")


def test_parquet_column_and_nested_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "prompt": ["a cat", None, "a dog", "a cat"],
            "meta": [{"caption": "x"}, {"caption": "y"}, {"caption": ""}, {"caption": "x"}],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet") == PromptSet(["a cat", "a dog"], n_blank=1, n_duplicates=1)
    assert load_prompts(tmp_path / "p.parquet", "meta.caption") == PromptSet(["x", "y"], n_blank=1, n_duplicates=1)
    _raises(tmp_path / "p.parquet", "no column 'caption'", field="caption")
    _raises(_write(tmp_path / "bad.parquet", "not parquet"), "cannot read")


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a cat", "", "a dog", "a cat"], "n": [1, 2, 3, 4]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", "text") == PromptSet(["a cat", "a dog"], n_blank=1, n_duplicates=1)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd", "text").prompts == ["a cat", "a dog"]
    _raises(tmp_path / "ds", "row 1", "int", field="n")


# ---- errors -----------------------------------------------------------------------------------


def test_missing_unknown_and_empty_sources(tmp_path):
    _raises(tmp_path / "nope.txt", "not found")
    _raises(_write(tmp_path / "p.xml", "<a/>"), "unknown prompt file format", ".xml")
    _raises(_write(tmp_path / "empty.txt", "\n  \n"), "no prompts", "2 blank")
    _raises(_write(tmp_path / "header_only.csv", "prompt\n"), "no prompts")
    (tmp_path / "plain_dir").mkdir()
    _raises(tmp_path / "plain_dir", "save_to_disk")


def test_jsonl_malformed_records_name_file_and_line(tmp_path):
    _raises(_write(tmp_path / "a.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n'), "line 2", "invalid JSON")
    missing = '{"Task2": {"Caption": "a"}}\n\n{"Task2": {}}\n'
    _raises(_write(tmp_path / "b.jsonl", missing), "line 3", "missing field 'Task2.Caption'", field="Task2.Caption")
    _raises(_write(tmp_path / "c.jsonl", '{"prompt": 7}\n'), "line 1", "int")
    _raises(_write(tmp_path / "d.jsonl", '"ok"\n[1, 2]\n'), "line 2", "list")
    _raises(_write(tmp_path / "e.jsonl", '"bare"\n'), "line 1", "str", field="Task2.Caption")


def test_csv_malformed_records_name_file_and_line(tmp_path):
    _raises(_write(tmp_path / "a.csv", "id,text\n1,a\n"), "no column 'prompt'", "id, text")
    _raises(_write(tmp_path / "b.csv", "id,prompt\n1,a\n2,b,extra\n"), "line 3", "3 fields")


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    _raises(path, "line 2", "UTF-8")


@pytest.mark.parametrize("module,name", [("pyarrow.parquet", "p.parquet"), ("datasets", "ds")])
def test_missing_optional_package_says_what_to_install(tmp_path, monkeypatch, module, name):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    path = tmp_path / name
    if name == "ds":
        path.mkdir()
        _write(path / "state.json", "{}")
    else:
        _write(path, "")
    _raises(path, f"pip install {module.split('.')[0]}")


# ---- stream -----------------------------------------------------------------------------------

PROMPTS = [f"prompt {i}" for i in range(23)]


def _take(stream: PromptStream, steps: int) -> list[list[str]]:
    return [stream.next_batch() for _ in range(steps)]


def test_stream_is_deterministic_per_seed():
    assert _take(PromptStream(PROMPTS, 4, seed=1), 12) == _take(PromptStream(PROMPTS, 4, seed=1), 12)
    assert _take(PromptStream(PROMPTS, 4, seed=1), 12) != _take(PromptStream(PROMPTS, 4, seed=2), 12)


def test_stream_resumes_mid_epoch_with_identical_continuation():
    original = PromptStream(PROMPTS, 4, seed=3)
    _take(original, 3)
    state = original.state_dict()
    expected = _take(original, 10)  # crosses two epoch boundaries (5 steps per epoch)
    resumed = PromptStream(PROMPTS, 4, seed=3)
    resumed.load_state_dict(state)
    assert _take(resumed, 10) == expected


def test_stream_ranks_are_disjoint_and_cover_the_global_batch():
    ranks = [PromptStream(PROMPTS, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    single = PromptStream(PROMPTS, 6, seed=5)
    for _ in range(9):
        first, second = (stream.next_batch() for stream in ranks)
        assert len(first) == len(second) == 3
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(single.next_batch())


def test_stream_wraps_epochs_without_repeats_inside_an_epoch():
    stream = PromptStream(PROMPTS, 5, seed=0)  # 23 prompts → 4 steps per epoch, 3 left out
    seen_overall: set[str] = set()
    for epoch in range(8):
        batches = _take(stream, 4)
        assert stream.epoch == epoch
        flat = [p for batch in batches for p in batch]
        assert len(set(flat)) == 20
        seen_overall |= set(flat)
    assert stream.next_batch() and stream.epoch == 8
    assert seen_overall == set(PROMPTS)  # the left-out prompts differ between epochs


def test_stream_rejects_too_few_prompts_and_mismatched_resume():
    with pytest.raises(LoopfreeError, match="fewer than one global batch"):
        PromptStream(PROMPTS[:5], 3, seed=0, world_size=2)
    state = PromptStream(PROMPTS, 4, seed=0).state_dict()
    with pytest.raises(LoopfreeError, match="cannot resume"):
        PromptStream(PROMPTS[:-1], 4, seed=0).load_state_dict(state)
