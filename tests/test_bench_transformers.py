"""``loopfree bench`` on transformers: FLOPs counted on the meta device agree with a CPU count, add up by blocks to
the whole model's, compose as the one pass does, and follow N + K·(L − N) blocks; the memory estimate's counts;
the CLI's JSON and its one-line refusals."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from loopfree.bench.speed import count_flops, train_config
from loopfree.bench.transformer_archs import TRANSFORMER_ARCHS
from loopfree.bench.transformer_cost import Parts, cost_rows, count_split, metered, target
from loopfree.bench.transformer_memory import memory_rows, parameter_counts
from loopfree.cli import main

TINY = ["pixart-tiny", "sd3-tiny", "flux-tiny"]
SIZE, K = (64, 64), 4


def args(batch: int = 1, device: str = "cpu") -> tuple:
    return (batch, SIZE, K, device, torch.float32)


def every_n(name: str) -> list[int]:
    return list(range(len(TRANSFORMER_ARCHS[name].block_kinds()) + 1))


def test_metered_splits_a_call_into_its_blocks():
    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    x = torch.randn(3, 8)
    with FlopCounterMode(display=False) as counter:
        parts = metered(lambda: c(b(b(a(x)))), {b: "square"}, counter.get_total_flops)
    count = lambda i, o: 2 * 3 * i * o  # noqa: E731
    assert parts.block == {"square": count(16, 16)} and parts.calls["square"] == 2
    assert parts.total == count(8, 16) + 2 * count(16, 16) + count(16, 4)
    assert parts.rest == count(8, 16) + count(16, 4)
    assert Parts.median([parts, parts]).rest == parts.rest


@pytest.mark.parametrize("name", TINY)
def test_meta_counts_equal_a_cpu_count_with_real_weights(name):
    arch = TRANSFORMER_ARCHS[name]
    calls = arch.calls(arch.build(), *args())
    with torch.inference_mode():
        cpu = count_flops(calls.full), count_flops(lambda: calls.shared(1)), count_flops(lambda: calls.per_step(calls.shared(1)))
    meta = count_split(arch, args(), [1], reduced=False)[1]
    assert cpu[0] == meta.full > 0 and cpu[1] == meta.shared and cpu[2] - cpu[1] == meta.per_step


@pytest.mark.parametrize("name", TINY)
def test_flops_by_blocks_equal_the_whole_models_at_every_n(name):
    arch, ns = TRANSFORMER_ARCHS[name], every_n(name)
    for batch in (1, 2):
        by_blocks, whole = (count_split(arch, args(batch), ns, reduced) for reduced in (True, False))
        assert by_blocks == whole  # exactly: the blocks of a kind cost the same


@pytest.mark.parametrize("name", TINY)
def test_one_pass_flops_are_its_two_parts_and_meet_the_bound_at_n_0(name):
    arch = TRANSFORMER_ARCHS[name]
    calls = arch.calls(arch.build("meta"), *args(device="meta"))
    rows = {r.name: r for r in cost_rows(arch, SIZE, every_n(name), timing="none")}
    L = len(every_n(name)) - 1
    with torch.inference_mode():
        for n in every_n(name):
            whole = count_flops(lambda: calls.per_step(calls.shared(n)))
            one, shared, per_step = (rows[f"one pass, N={n}/{L}"], rows[f"  shared part (N={n}, once)"],
                                     rows[f"  {K} per-step parts (N={n}, batched)"])
            assert one.gflops == pytest.approx(whole / 1e9, rel=1e-12)
            assert one.gflops == pytest.approx(shared.gflops + per_step.gflops, rel=1e-12)
            assert one.target == target(L, n, K) and one.meets_target == (one.ratio <= one.target)
    # at N = 0 the bound is K full forwards: the one pass runs their blocks and final layers, the embeddings once
    assert rows[f"one pass, N=0/{L}"].meets_target and rows[f"one pass, N=0/{L}"].ratio < K
    assert rows[f"{K}-step sampler ({K} full forwards)"].ratio == K


def test_the_blocks_of_the_one_pass_cost_n_plus_k_times_the_rest():
    """PixArt's blocks are alike: the one pass's block FLOPs are exactly N + K·(L − N) blocks, the bound's count."""
    arch = TRANSFORMER_ARCHS["pixart-tiny"]
    model = arch.build("meta")
    calls = arch.calls(model, *args(device="meta"))
    kinds = dict(zip(arch.blocks(model), arch.block_kinds()))
    L = len(kinds)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        full = metered(calls.full, kinds, counter.get_total_flops)
        block = full.block["DiT"]
        for n in range(L + 1):
            feats = calls.shared(n)
            one = metered(lambda: calls.per_step(feats), kinds, counter.get_total_flops)
            shared = metered(lambda: calls.shared(n), kinds, counter.get_total_flops)
            blocks = sum(p.block.get("DiT", 0) * p.calls["DiT"] for p in (one, shared))
            assert blocks == (n + K * (L - n)) * block == target(L, n, K) * L * block


def test_timed_by_blocks_and_whole_give_the_same_rows():
    arch = TRANSFORMER_ARCHS["flux-tiny"]
    by_blocks, whole = (cost_rows(arch, SIZE, [2], timing=t) for t in ("blocks", "whole"))
    assert [r.name for r in by_blocks] == [r.name for r in whole]
    for b, w in zip(by_blocks, whole):
        assert b.gflops == w.gflops and b.median_s > 0 and w.median_s > 0
    one, shared, per_step = by_blocks[2:5]
    assert one.median_s == pytest.approx(shared.median_s + per_step.median_s)
    assert one.time_vs_flops == pytest.approx(one.time_ratio / one.ratio) and by_blocks[0].time_ratio == 1.0


@pytest.mark.parametrize("name", TINY)
def test_memory_counts_and_sharding(name):
    arch = TRANSFORMER_ARCHS[name]
    n = parameter_counts(arch, train_config(1, 4, "fp32", False, True))
    model = arch.build()
    assert n["transformer"] == sum(p.numel() for p in model.parameters())
    by_hand = sum(64 * (m.in_features + m.out_features) for key, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and key.endswith(("to_q", "to_v")))  # rank 64 on to_q, to_v
    assert n["lora"] == by_hand > 0
    blocks = [sum(p.numel() for p in b.parameters()) for b in arch.blocks(model)]
    assert n["largest_block"] == max(blocks) and n["root"] == n["transformer"] - sum(blocks) > 0
    one, sharded = ({r.name: r.gib for r in memory_rows(arch, "bf16", p, s)} for p, s in ((1, False), (8, True)))
    assert sharded["student weights (fp32, 1/8)"] == pytest.approx(one["student weights (fp32)"] / 8)
    assert one["student weights (fp32)"] == pytest.approx(n["transformer"] * 4 / 2**30)
    assert one["teacher weights (frozen, bf16)"] == pytest.approx(n["transformer"] * 2 / 2**30)
    ddp = {r.name: r.gib for r in memory_rows(arch, "bf16", 8)}
    held = lambda rows: sum(r.gib for r in rows if r.phase == "held throughout")  # noqa: E731
    for rows in (memory_rows(arch, "bf16"), memory_rows(arch, "bf16", 8, True)):
        peak = max(r.gib for r in rows if r.kind == "peak")
        assert rows[-1].gib == pytest.approx(held(rows) + peak)
    assert ddp["DDP gradient buckets (fp32)"] == pytest.approx(one["student weights (fp32)"])


def run(*argv):
    return CliRunner().invoke(main, [str(a) for a in argv])


def test_cli_json_rows():
    r = run("bench", "--arch", "sd3-tiny", "--shared-blocks", 1, "--shared-blocks", 3, "--repeats", 1, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["blocks"] == 4 and out["image_tokens"] == 16 and out["timing"] == "blocks"
    names = [row["name"] for row in out["rows"]]
    assert names[:3] == ["full forward", "4-step sampler (4 full forwards)", "one pass, N=1/4"] and "one pass, N=3/4" in names
    assert all(row["gflops"] > 0 and row["median_s"] > 0 for row in out["rows"])
    table = run("bench", "--arch", "pixart-tiny", "--timing", "none")
    assert table.exit_code == 0 and "one pass, N=2/4" in table.output and "n/a" in table.output
    memory = run("bench", "--train", "--memory", "--arch", "flux-tiny", "--processes", 8, "--shard", "--json")
    assert memory.exit_code == 0, memory.output
    rows = json.loads(memory.output[memory.output.index("{"):])
    assert rows["name"] == "flux-tiny, fp32, 8 devices, FSDP2" and rows["rows"][-1]["kind"] == "total"


@pytest.mark.parametrize("argv, says", [
    (["--arch", "sd3-tiny", "--shared-blocks", 9], "out of range"),
    (["--arch", "pixart-tiny", "--train"], "isn't built yet"),
    (["--arch", "flux-tiny", "--with-50"], "--with-50 does not apply"),
    (["--arch", "flux-tiny", "--train", "--memory", "--gradient-checkpointing"], "not measured yet"),
    (["--arch", "flux-tiny", "--train", "--memory", "--shard"], "--processes 2 or more"),
    (["--arch", "pixart-tiny", "--resolution", 72], "multiple of 16"),
    (["--arch", "tiny", "--shared-blocks", 1], "go with a transformer"),
    (["--arch", "flux-tiny", "--timing", "fast"], "fast"),
])
def test_cli_refuses_bad_input_in_one_line(argv, says):
    r = run("bench", *argv)
    assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output
