"""The teacher-pair cache at scale: filled by many fillers at once (each chunk made once, by whoever claims it, none
read half-written), waited for by polling the disk, and read row by row on demand."""

import fcntl
import threading

import pytest
import torch
from safetensors.torch import load_file

from loopfree.training import pairs as pairs_module
from loopfree.training.pairs import CHUNK, PairCache


def pair(indices):
    """Pairs that depend on their indices alone, as the teacher's do: x_T from the index's seed, x_0 from x_T."""
    x_T = torch.stack([torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(i)) for i in indices])
    return x_T, x_T.flip(-1) * 2


def test_rows_read_on_demand_equal_the_whole_cache(tmp_path):
    cache = PairCache(tmp_path, {"teacher": "t"}, count=3 * CHUNK + 5)
    cache.fill(pair)
    files = sorted(cache.path.glob("pairs-*.safetensors"))
    parts = [load_file(f) for f in files]  # the whole cache, read without PairCache
    whole = {name: torch.cat([p[name] for p in parts]) for name in ("x_T", "x0")}
    drawn = torch.randint(cache.count, (40,), generator=torch.Generator().manual_seed(0)).tolist() + [3, 3, cache.count - 1]
    x_T, x0 = cache.rows(drawn)
    assert torch.equal(x_T, whole["x_T"][drawn]) and torch.equal(x0, whole["x0"][drawn])
    files[1].unlink()  # only the chunks of the drawn rows are read
    rows = [i for i in drawn if not CHUNK <= i < 2 * CHUNK]
    assert torch.equal(cache.rows(rows)[0], whole["x_T"][rows])
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cache.rows([CHUNK + 1])
    with pytest.raises(IndexError):
        cache.rows([cache.count])


def test_fillers_side_by_side_make_every_chunk_once(tmp_path):
    """A launch's two processes and another run fill one cache at once: they share the work, no chunk twice."""
    count = 6 * CHUNK
    made, guard, all_working = [], threading.Lock(), threading.Barrier(3, timeout=60)

    def filler(name, rank, world):
        first = [True]

        def make(indices):
            if first[0]:  # all three are making a chunk at once (each holds its own), whichever thread starts first
                first[0] = False
                all_working.wait()
            with guard:
                made.append((name, indices[0]))
            return pair(indices)

        return lambda: PairCache(tmp_path, {"teacher": "t"}, count).fill(make, rank, world, progress=False)

    threads = [threading.Thread(target=filler(*args)) for args in [("rank 0", 0, 2), ("rank 1", 1, 2), ("other run", 0, 1)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    starts = sorted(start for _, start in made)
    assert starts == list(range(0, count, CHUNK))  # each chunk made once, all of them
    assert {name for name, _ in made} == {"rank 0", "rank 1", "other run"}
    reference = PairCache(tmp_path / "alone", {"teacher": "t"}, count)
    reference.fill(pair, progress=False)
    everything = list(range(count))
    assert all(torch.equal(a, b) for a, b in zip(PairCache(tmp_path, {"teacher": "t"}, count).rows(everything),
                                                  reference.rows(everything)))
    assert not list(tmp_path.rglob("*.tmp-*"))  # every chunk renamed into place whole


def test_a_filler_waits_for_a_chunk_held_elsewhere_and_takes_it_over_if_its_holder_dies(tmp_path, monkeypatch):
    monkeypatch.setattr(pairs_module, "POLL_SECONDS", 0.05)
    cache = PairCache(tmp_path, {"teacher": "t"}, count=3 * CHUNK)
    cache.path.mkdir(parents=True)
    held = open(cache.path / f".pairs-{CHUNK:08d}.lock", "w")  # another filler is making chunk 1
    fcntl.flock(held, fcntl.LOCK_EX)
    made = []
    waiting = threading.Thread(target=lambda: made.append(cache.fill(pair, progress=False)))
    waiting.start()
    waiting.join(2)
    assert waiting.is_alive() and cache.missing() == [CHUNK]  # the others made, chunk 1 waited for
    held.close()  # its holder died without writing it
    waiting.join(60)
    assert not waiting.is_alive() and made == [3] and not cache.missing()
