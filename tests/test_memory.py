"""``loopfree bench --train --memory``: counts against independent references, the saved-tensor and live-tensor
counters against hand counts, and the table's arithmetic."""

import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

from loopfree.bench.archs import ARCHS
from loopfree.cli import main
from loopfree.training.config import DistillConfig
from loopfree.bench.memory import GIB, HELD, Activations, Float32Norms, LiveTensors, SavedTensors, measure_activations, memory_rows, parameter_counts

TINY = ARCHS["tiny"]


def config(**kw) -> DistillConfig:
    return DistillConfig(teacher="-", prompts="-", out="-", **kw)


@pytest.mark.parametrize("rank, targets", [(64, ["to_q", "to_v"]), (4, ["to_k", "to_out.0"])])
def test_parameter_counts_match_the_unet_and_peft(rank, targets):
    n = parameter_counts(TINY, config(lora_rank=rank, lora_targets=targets))
    unet = TINY.build()
    assert n["unet"] == sum(p.numel() for p in unet.parameters())
    peft_trainable, _ = get_peft_model(TINY.build(), LoraConfig(r=rank, target_modules=targets)).get_nb_trainable_parameters()
    by_hand = sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in targets))
    assert n["lora"] == peft_trainable == by_hand > 0


def test_saved_tensors_of_a_small_mlp_match_a_hand_count():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    x = torch.randn(3, 8)
    with SavedTensors([*lin1.parameters(), *lin2.parameters()], inputs=[x]) as saved:
        r = torch.relu(lin1(x))  # lin1 saves x (for its weight's grad), relu its output r
        w2 = lin2.weight * 2  # computed from a weight only: not per prompt
        F.linear(r, w2).sum()  # saves r again (counted once) and w2; the parameters' storages count zero
    x_bytes, r_bytes, w2_bytes = 3 * 8 * 4, 3 * 16 * 4, 4 * 16 * 4
    assert saved.bytes == x_bytes + r_bytes + w2_bytes
    assert saved.fixed == w2_bytes


def test_saved_tensors_count_a_view_as_its_whole_storage_once():
    w = torch.randn(6, 5, requires_grad=True)
    base = torch.randn(4, 6)
    with SavedTensors([w], inputs=[base]) as saved:
        (base[:2] @ w).sum() + (base[2:] @ w).sum()  # two views of one storage, both saved
    assert saved.bytes == base.numel() * 4 and saved.fixed == 0


def test_live_tensors_peak_matches_a_hand_count():
    def step():
        a = torch.randn(256, 1024)  # 1 MiB
        b = a * 2  # 2 MiB alive
        del a  # 1 MiB
        total = b.sum()  # + 4 bytes
        c = torch.randn(512, 1024)  # + 2 MiB: the peak
        del b, c
        return total

    with LiveTensors() as live:
        step()
    assert live.peak == 3 * 2**20 + 4 and live.now == 0


def test_float32_norms_as_cuda_autocast_runs_them():
    x, norm = torch.randn(2, 8, 4, 4), torch.nn.GroupNorm(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(F.conv2d(x, torch.randn(8, 8, 1, 1)))
        with Float32Norms():
            full = norm(F.conv2d(x, torch.randn(8, 8, 1, 1)))
            assert F.conv2d(x, torch.randn(8, 8, 1, 1)).dtype == torch.bfloat16
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_fp32():
    torch.set_num_threads(1)
    return {ckpt: measure_activations(TINY, config(gradient_checkpointing=ckpt), (8, 8)) for ckpt in (False, True)}


def test_checkpointing_reduces_the_measured_activations(tiny_fp32):
    plain, ckpt = tiny_fp32[False], tiny_fp32[True]
    assert 0 < ckpt.student < plain.student and 0 < ckpt.fake < plain.fake
    assert ckpt.guided_per == plain.guided_per > 0  # no graph in the guided pass: checkpointing changes nothing


@pytest.fixture(scope="module")
def tiny_sid():
    torch.set_num_threads(1)
    return {ckpt: measure_activations(TINY, config(objective="sid", gradient_checkpointing=ckpt), (8, 8)) for ckpt in (False, True)}


def test_sid_estimate_holds_the_guided_passes_graph_on_top_of_vsds(tiny_fp32, tiny_sid):
    vsd, sid = tiny_fp32[False], tiny_sid[False]
    # reference: SiD's guided passes are 4 UNet rows per prompt (teacher and fake score, each unconditional and
    # conditional) with gradients to x_t, none to the frozen weights; the frozen LoRA saves no activations of its own
    unet = TINY.build().requires_grad_(False)
    x, text, _ = TINY.inputs(1, (64, 64), "cpu", torch.float32)
    x4, text4 = torch.cat([x] * 4).requires_grad_(True), torch.cat([text] * 4)
    with SavedTensors(unet.parameters(), [x4, text4]) as ref:
        unet(x4, torch.tensor([500] * 4), text4)
    ref_per = ref.bytes - ref.fixed
    assert vsd.guided_graph == 0 and sid.guided_graph_per == pytest.approx(ref_per, rel=0.01)
    assert 0 < tiny_sid[True].guided_graph < 0.5 * sid.guided_graph  # checkpointed: the blocks' inputs
    # at 8 prompts the guided pass, not the gradients, sets the student update's peak: SiD's estimate exceeds VSD's by
    # the graph (their students' own graphs differ by SiD's loss on x_t, bytes per prompt)
    totals = {}
    for objective, act in (("vsd", vsd), ("sid", sid)):
        def measured(arch, cfg, latent, act=act, objective=objective):
            assert cfg.objective == objective
            return act

        rows = {r.name: r.gib for r in memory_rows(TINY, (64, 64), batch=8, objective=objective, measured=measured)}
        totals[objective] = rows["total: held + the largest peak"]
    assert rows["guided passes' graph (SiD), 8 prompts"] == 8 * sid.guided_graph_per / GIB
    assert totals["sid"] - totals["vsd"] == pytest.approx(8 * ref_per / GIB, rel=0.01)


def test_bf16_saves_weight_casts_not_per_prompt(tiny_fp32):
    bf16 = measure_activations(TINY, config(dtype="bf16"), (8, 8))
    bf16_weights = 2 * parameter_counts(TINY, config())["unet"]
    assert tiny_fp32[False].student_fixed < 0.02 * bf16_weights  # fp32: nothing is cast
    assert 0.5 * bf16_weights < bf16.student_fixed < 1.2 * bf16_weights  # autocast's bf16 copies of the weights
    assert bf16.student_per < tiny_fp32[False].student_per


def test_saved_tensors_leave_no_reference_cycle():
    lin = torch.nn.Linear(4, 4)
    with SavedTensors(lin.parameters()):
        y = torch.relu(lin(torch.randn(2, 4)))  # relu saves its output: kept as itself, output → grad_fn → output
    storage = weakref.ref(y.untyped_storage())
    del y
    gc.collect()
    assert storage() is None


def test_memory_rows_add_up():
    act = Activations(student_fixed=3 * GIB, student_per=2 * GIB, fake_fixed=0, fake_per=GIB, guided_per=GIB // 2)
    seen = []

    def fake_measure(arch, cfg, latent):
        seen.append((cfg.dtype, cfg.gradient_checkpointing, latent))
        return act

    rows = memory_rows(TINY, (64, 64), "bf16", batch=4, gradient_checkpointing=True, measure_size=(32, 32), measured=fake_measure)
    assert seen == [("bf16", True, (4, 4))]  # 32 px / the VAE's 8
    by = {(r.phase, r.name): r.gib for r in rows}
    n = parameter_counts(TINY, config())
    p = n["unet"] * 4 / GIB
    held = {name: gib for (phase, name), gib in by.items() if phase == HELD}
    assert held["student weights (fp32)"] == held["student EMA (fp32)"] == p
    assert held["student AdamW moments (2 × fp32)"] == 2 * p
    assert held["teacher weights (frozen, bf16)"] == n["unet"] * 2 / GIB
    assert held["fake-score LoRA: weights + AdamW (3 × fp32)"] == 3 * n["lora"] * 4 / GIB
    assert held["text encoder + VAE (frozen, fp32)"] == (n["text_encoders"] + n["vae"]) * 4 / GIB
    # per prompt × 4 prompts × 4 (measured on a quarter of the pixels); the weight casts once
    assert by[("student update", "graph: activations, 4 prompts")] == 2 * 4 * 4
    assert by[("student update", "graph: computed from weights only, not per prompt")] == 3
    assert by[("student update", "peak: graph + max(gradients, guided pass)")] == pytest.approx(3 + 32 + 8)
    assert by[("fake-score update", "graph: activations, 4 prompts")] == 16
    total = next(r for r in rows if r.kind == "total")
    assert total.gib == pytest.approx(sum(held.values()) + 3 + 32 + 8)


def test_sharding_divides_the_students_state_and_adds_the_gathered_blocks():
    act = Activations(student_fixed=0, student_per=GIB, fake_fixed=0, fake_per=GIB, guided_per=GIB)
    n = parameter_counts(TINY, config())
    unet = TINY.build()
    blocks = [sum(p.numel() for p in b.parameters()) for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]]
    assert n["largest_block"] == max(blocks) and n["root"] == n["unet"] - sum(blocks) > 0  # by hand from the UNet
    one = {r.name: r.gib for r in memory_rows(TINY, (64, 64), "bf16", measured=lambda *a: act)}
    ddp = {r.name: r.gib for r in memory_rows(TINY, (64, 64), "bf16", measured=lambda *a: act, processes=8)}
    fsdp = {r.name: r.gib for r in memory_rows(TINY, (64, 64), "bf16", measured=lambda *a: act, processes=8, shard=True)}
    p = n["unet"] * 4 / GIB
    assert ddp["DDP gradient buckets (fp32)"] == p and "DDP gradient buckets (fp32)" not in one | fsdp
    assert fsdp["student weights (fp32, 1/8)"] == fsdp["student EMA (fp32, 1/8)"] == p / 8
    assert fsdp["student AdamW moments (2 × fp32, 1/8)"] == 2 * p / 8
    assert fsdp["gathered: root + 2 blocks (bf16, FSDP2)"] == (n["root"] + 2 * n["largest_block"]) * 2 / GIB
    assert fsdp["teacher weights (frozen, bf16)"] == one["teacher weights (frozen, bf16)"]  # replicated
    total = lambda rows: rows["total: held + the largest peak"]  # noqa: E731
    assert total(fsdp) < total(one) < total(ddp)


def test_a_lora_student_holds_its_frozen_base_and_the_adapters_state_only(tiny_fp32):
    from loopfree.training.student_lora import add_student_lora

    targets = ["to_q", "to_v", "conv1"]
    n = parameter_counts(TINY, config(student_lora_rank=8, student_lora_targets=targets))
    unet = TINY.build()
    by_hand = sum(8 * (m.in_features + m.out_features) for name, m in unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_v")))
    by_hand += sum(8 * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) for name, m in unet.named_modules()
                   if isinstance(m, torch.nn.Conv2d) and name.endswith("conv1"))
    assert n["student_lora"] == by_hand > 0 and parameter_counts(TINY, config())["student_lora"] == 0
    act = Activations(student_fixed=0, student_per=GIB, fake_fixed=0, fake_per=GIB, guided_per=GIB)
    full = {r.name: r.gib for r in memory_rows(TINY, (64, 64), "bf16", measured=lambda *a: act, processes=8)}
    lora = {r.name: r.gib for r in memory_rows(TINY, (64, 64), "bf16", measured=lambda *a: act, processes=8, student_lora_rank=16)}
    r16 = parameter_counts(TINY, config(student_lora_rank=16))["student_lora"] * 4 / GIB
    assert lora["student's frozen base (a copy of the teacher, bf16)"] == full["teacher weights (frozen, bf16)"]
    assert lora["student LoRA (r 16) weights (fp32)"] == lora["student LoRA (r 16) EMA (fp32)"] == lora["DDP gradient buckets (fp32)"] == r16
    assert lora["student LoRA (r 16) AdamW moments (2 × fp32)"] == 2 * r16
    assert "student weights (fp32)" not in lora
    assert lora["total: held + the largest peak"] < full["total: held + the largest peak"]
    with pytest.raises(ValueError, match="not sharded"):
        memory_rows(TINY, (64, 64), "bf16", measured=lambda *a: act, processes=8, shard=True, student_lora_rank=16)
    # measured: the frozen base saves no input for a weight gradient, so the LoRA student's graph is no bigger
    plain = tiny_fp32[False]
    adapted = measure_activations(TINY, config(student_lora_rank=16), (8, 8))
    assert 0 < adapted.student <= plain.student


def run(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_cli_memory_prints_a_table_with_a_total():
    r = run("--train", "--memory", "--arch", "tiny", "--batch-size", 2, "--dtype", "bf16", "--gradient-checkpointing")
    assert r.exit_code == 0, r.output
    bad = run("--train", "--memory", "--arch", "tiny", "--shard")
    assert bad.exit_code == 2 and "--processes 2 or more" in bad.output
    lines = r.output.splitlines()
    assert "tiny, 64x64, bf16, batch 2" in lines[0] and "estimate" in lines[0]
    assert any(line.startswith("total: held + the largest peak") for line in lines)
    assert "graph: activations, 2 prompts *" in r.output

    j = run("--train", "--memory", "--arch", "tiny", "--json")
    assert j.exit_code == 0, j.output
    rows = json.loads(j.output)["rows"]
    total = [r["gib"] for r in rows if r["kind"] == "total"]
    held = sum(r["gib"] for r in rows if r["phase"] == HELD)
    assert total == [pytest.approx(held + max(r["gib"] for r in rows if r["kind"] == "peak"))]

    scaled = run("--train", "--memory", "--arch", "tiny", "--resolution", 128, "--measure-resolution", 64, "--json")
    assert scaled.exit_code == 0, scaled.output
    assert json.loads(scaled.output)["measured_at"] == "64x64"


def test_cli_memory_of_sid_shows_the_guided_passes_graph():
    r = run("--train", "--memory", "--arch", "tiny", "--objective", "sid", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["objective"] == "sid" and any(row["name"] == "guided passes' graph (SiD), 1 prompt" for row in out["rows"])


def test_cli_memory_needs_train():
    r = run("--memory", "--arch", "tiny")
    assert r.exit_code == 2 and "--train" in r.output
    r = run("--objective", "sid", "--arch", "tiny")
    assert r.exit_code == 2 and "--train" in r.output
    r = run("--train", "--arch", "tiny", "--measure-resolution", 64)
    assert r.exit_code == 2 and "--memory" in r.output
