"""Text-prompt data for distillation: loading prompt files and a resumable, sharded batch stream.

Supported sources (chosen by suffix): `.txt` (one prompt per line), `.jsonl` (one JSON object per
line, prompt at a dotted field path such as JourneyDB's `Task2.Caption`, or a bare JSON string),
`.csv`, `.tsv` and `.parquet` (a column; CSV/TSV default to a column named prompt or prompts in any case, as
in DrawBench's CSV and PartiPrompts' TSV), `.json` (a COCO captions annotation file such as
`captions_val2014.json`: one caption per image, the image's lowest-id caption, images by ascending id), and a
directory written by `datasets.Dataset.save_to_disk`.
"""

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopfree.utils.errors import LoopfreeError, first_line

DEFAULT_FIELD = "prompt"

@dataclass
class PromptSet:
    """De-duplicated prompts (stripped, in order of first appearance) and what was dropped."""

    prompts: list[str]
    n_blank: int  # blank lines, empty strings and null values skipped
    n_duplicates: int  # repeats of an earlier prompt skipped

    def __len__(self) -> int:
        return len(self.prompts)


def _field_value(record: Any, field: str, where: str) -> Any:
    """Value at a dotted field path in nested mappings; a missing key is an error naming `where`."""
    for key in field.split("."):
        if not isinstance(record, dict) or key not in record:
            raise LoopfreeError(f"{where}: missing field '{field}'")
        record = record[key]
    return record


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Stripped lines of a UTF-8 file with their 1-based numbers (decoded line by line)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LoopfreeError(f"{path}, line {number}: not valid UTF-8 text") from None
            yield number, line.lstrip("\ufeff").strip()


def _read_txt(path: Path, field: str | None) -> Iterator[tuple[str, Any]]:
    for number, line in _text_lines(path):
        yield f"{path}, line {number}", line


def _read_jsonl(path: Path, field: str | None) -> Iterator[tuple[str, Any]]:
    for number, line in _text_lines(path):
        where = f"{path}, line {number}"
        if not line:
            yield where, None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoopfreeError(f"{where}: invalid JSON ({e.msg})") from None
        if isinstance(record, str) and field is None:
            yield where, record
        elif isinstance(record, dict):
            yield where, _field_value(record, field or DEFAULT_FIELD, where)
        else:
            expected = "a JSON object" if field else "a JSON object or string"
            raise LoopfreeError(f"{where}: record is {type(record).__name__}, expected {expected}")


def _default_column(header: list[str]) -> str:
    """The column named prompt or prompts in any case (DrawBench: Prompts, PartiPrompts: Prompt), else "prompt"."""
    return next((name for name in header if name.strip().lower() in ("prompt", "prompts")), DEFAULT_FIELD)


def _read_delimited(path: Path, field: str | None, delimiter: str) -> Iterator[tuple[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            column = field or _default_column(header)
            if column not in header:
                raise LoopfreeError(f"{path}, line 1: no column '{column}' in header ({', '.join(header)})")
            index = header.index(column)
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if not row:
                    yield where, None
                elif len(row) != len(header):
                    raise LoopfreeError(f"{where}: {len(row)} fields, header has {len(header)}")
                else:
                    yield where, row[index]
        except csv.Error as e:
            raise LoopfreeError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise LoopfreeError(f"{path}, near line {reader.line_num + 1}: not valid UTF-8 text") from None


def _read_coco(path: Path, field: str | None) -> Iterator[tuple[str, Any]]:
    """One caption per image of a COCO captions annotation file: the lowest annotation id, images by id."""
    try:
        annotations = json.loads(path.read_bytes()).get("annotations")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoopfreeError(f"{path} is not valid JSON ({e.__class__.__name__})") from None
    except AttributeError:
        annotations = None
    if not isinstance(annotations, list):
        raise LoopfreeError(f"{path} is not a COCO captions file (no 'annotations' list)")
    first: dict[Any, tuple[Any, Any]] = {}
    for number, record in enumerate(annotations):
        if not isinstance(record, dict) or "image_id" not in record or "caption" not in record:
            raise LoopfreeError(f"{path}, annotation {number}: expected an object with image_id and caption")
        key = record.get("id", number)
        if record["image_id"] not in first or key < first[record["image_id"]][0]:
            first[record["image_id"]] = (key, record["caption"])
    for image_id in sorted(first):
        yield f"{path}, image {image_id}", first[image_id][1]


def _column_values(
    path: Path, columns: Sequence[str], field: str, read_column: Callable[[str], Iterator[list[Any]]]
) -> Iterator[tuple[str, Any]]:
    """Values at a dotted `field` path, labelled by 1-based row.

    `read_column(name)` yields batches of the values of one top-level column.
    """
    top, _, rest = field.partition(".")
    if top not in columns:
        raise LoopfreeError(f"{path}: no column '{top}' (columns: {', '.join(columns)})")
    row = 0
    for batch in read_column(top):
        for value in batch:
            row += 1
            where = f"{path}, row {row}"
            yield where, value if not rest or value is None else _field_value(value, rest, where)


def _read_parquet(path: Path, field: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoopfreeError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise LoopfreeError(f"cannot read {path}: {first_line(e)}") from None
    yield from _column_values(
        path,
        parquet.schema_arrow.names,
        field or DEFAULT_FIELD,
        lambda column: (b.column(0).to_pylist() for b in parquet.iter_batches(columns=[column])),
    )


def _read_datasets_dir(path: Path, field: str | None) -> Iterator[tuple[str, Any]]:
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise LoopfreeError(f"{path} is a directory but not one written by datasets' save_to_disk")
    try:
        import datasets
    except ImportError:
        raise LoopfreeError(f"reading the dataset directory {path} needs datasets: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # corrupt, or written by an incompatible datasets version
        raise LoopfreeError(f"cannot read {path} as a saved dataset: {first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1 and "train" not in ds:
            raise LoopfreeError(f"{path} holds splits {', '.join(ds)}; save one split or a 'train' split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    yield from _column_values(
        path,
        ds.column_names,
        field or DEFAULT_FIELD,
        lambda column: (b[column] for b in ds.select_columns([column]).iter(batch_size=10_000)),
    )


_READERS: dict[str, Callable[[Path, str | None], Iterator[tuple[str, Any]]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".json": _read_coco,
    ".csv": lambda path, field: _read_delimited(path, field, ","),
    ".tsv": lambda path, field: _read_delimited(path, field, "\t"),
    ".parquet": _read_parquet,
}


def load_prompts(path: str | Path, field: str | None = None) -> PromptSet:
    """Load, strip and de-duplicate prompts from a file or a saved `datasets` directory.

    `field` is the column or dotted JSON path holding the prompt (default "prompt"; ignored for
    `.txt` and COCO `.json`). Blank lines, empty strings and nulls are skipped and counted. Raises LoopfreeError on
    a missing, unreadable or empty source, an unknown format or a malformed record.
    """
    path = Path(path)
    if path.is_dir():
        reader = _read_datasets_dir
    elif not path.exists():
        raise LoopfreeError(f"prompt file not found: {path}")
    elif path.suffix.lower() in _READERS:
        reader = _READERS[path.suffix.lower()]
    else:
        raise LoopfreeError(
            f"unknown prompt file format '{path.suffix}' for {path} "
            "(expected .txt, .jsonl, .json (COCO captions), .csv, .tsv, .parquet or a datasets directory)"
        )
    seen: dict[str, None] = {}
    n_blank = n_duplicates = 0
    try:
        for where, value in reader(path, field):
            if value is not None and not isinstance(value, str):
                raise LoopfreeError(f"{where}: prompt is {type(value).__name__}, expected a string")
            prompt = (value or "").strip()
            if not prompt:
                n_blank += 1
            elif prompt in seen:
                n_duplicates += 1
            else:
                seen[prompt] = None
    except OSError as e:
        raise LoopfreeError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if not seen:
        raise LoopfreeError(f"no prompts in {path} ({n_blank} blank lines or records)")
    return PromptSet(prompts=list(seen), n_blank=n_blank, n_duplicates=n_duplicates)


class PromptStream:
    """Endless, seeded, resumable prompt batches, sharded over data-parallel ranks.

    Each epoch is a permutation of the prompts drawn with seed `seed + epoch`. A global step takes
    the next `batch_size * world_size` prompts of it, and rank r gets the r-th slice of
    `batch_size`, so ranks see disjoint prompts within a step. The `len(prompts) % global_batch`
    prompts left at the end of an epoch are dropped (different ones every epoch), so a batch never
    mixes two epochs and never repeats a prompt.
    """

    def __init__(self, prompts: Sequence[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        if len(prompts) < self.global_batch:
            raise LoopfreeError(
                f"{len(prompts)} prompts are fewer than one global batch "
                f"({batch_size} per process × {world_size} processes)"
            )
        self.epoch = 0
        self.position = 0  # prompts of this epoch's permutation already consumed by all ranks
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) cache

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.prompts), generator=generator))
        return self._order[1]

    def next_batch(self) -> list[str]:
        """This rank's `batch_size` prompts of the next global step."""
        if self.position + self.global_batch > len(self.prompts):
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.batch_size
        indices = self._permutation()[start : start + self.batch_size].tolist()
        self.position += self.global_batch
        return [self.prompts[i] for i in indices]

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands; `load_state_dict` continues from exactly here."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`; the prompts and seed must be the ones it was saved with."""
        if state["n_prompts"] != len(self.prompts) or state["seed"] != self.seed:
            raise LoopfreeError(
                f"cannot resume the prompt stream: it was saved for {state['n_prompts']} prompts with seed "
                f"{state['seed']}, now {len(self.prompts)} prompts with seed {self.seed}"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
