"""``loopfree bench``'s rows: FLOPs that add up the way the passes compose, ratios per section."""

import pytest
import torch
import torch.nn.functional as F

from loopfree.bench.archs import ARCHS
from loopfree.bench.speed import END_TO_END, UNET, count_flops, format_table, inference_rows
from loopfree.method.split import run_decoders, run_encoder
from tiny import make_unet


@pytest.fixture(scope="module")
def rows():
    rows = inference_rows(ARCHS["tiny"], (128, 128), torch.device("cpu"), torch.float32, repeats=1)
    return {r.name: r for r in rows}


def test_count_flops_counts_cpu_attention_and_convolutions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, k)) == 2 * (2 * 2 * 3 * 10 * 7 * 8)  # QKᵀ, AV
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    assert count_flops(lambda: conv(torch.randn(2, 4, 5, 5))) == 2 * (2 * 6 * 25) * (4 * 9)


def test_sections_and_ratios(rows):
    unet = [r for r in rows.values() if r.section == UNET]
    e2e = [r for r in rows.values() if r.section == END_TO_END]
    assert unet[0].name == "full UNet, 1 step" and e2e[0].name == "end-to-end, 1 step"
    for part in (unet, e2e):
        assert part[0].ratio == 1.0
        assert all(r.ratio == pytest.approx(r.median_s / part[0].median_s) and r.median_s > 0 for r in part)
    table = format_table(list(rows.values()), "title").splitlines()
    assert table[0] == "title" and UNET in table and END_TO_END in table and len(table) == 1 + 2 * 3 + len(rows)


def test_flops_add_up_as_the_passes_compose(rows):
    f = {name: r.gflops for name, r in rows.items()}
    assert f["full UNet, 4 steps"] == pytest.approx(4 * f["full UNet, 1 step"], rel=1e-12)
    assert f["4 decoders batched, plain"] == pytest.approx(4 * f["decoder alone (1 step)"], rel=1e-12)
    assert f["one pass, K=4, plain decoders"] == pytest.approx(f["encoder alone"] + f["4 decoders batched, plain"], rel=1e-12)
    assert f["one pass, K=4"] == pytest.approx(f["encoder alone"] + f["4 decoders batched"], rel=1e-12)
    # the split recomputes the time embedding MLP in the decoder: a sliver more than the full UNet
    assert f["full UNet, 1 step"] < f["encoder alone"] + f["decoder alone (1 step)"] < 1.01 * f["full UNet, 1 step"]
    assert f["4 decoders batched"] < 0.9 * f["4 decoders batched, plain"]
    for name in ("end-to-end, 1 step", "end-to-end, one pass, K=4"):
        unet_part = "full UNet, 1 step" if name.endswith("1 step") else "one pass, K=4"
        assert f[name] == pytest.approx(f["text encoder alone"] + f[unet_part] + f["VAE decode alone"], rel=1e-12)
    tiny = "end-to-end, one pass, K=4, tiny VAE"
    assert f[tiny] == pytest.approx(f["text encoder alone"] + f["one pass, K=4"] + f["tiny VAE (TAESD) decode alone"], rel=1e-12)


def test_hoisting_saves_nothing_with_one_decoder():
    unet = make_unet("sd2")
    with torch.inference_mode():
        feats = run_encoder(unet, torch.randn(2, 4, 8, 8), 501, torch.randn(2, 5, 16))
        assert count_flops(lambda: run_decoders(unet, feats, [501])) == count_flops(lambda: run_decoders(unet, feats, [501], hoist=False))


def test_bench_runs_in_bf16_with_the_same_flops():
    fp32, bf16 = (inference_rows(ARCHS["tiny"], (64, 64), torch.device("cpu"), dtype, repeats=1, end_to_end=False)
                  for dtype in (torch.float32, torch.bfloat16))
    assert [r.name for r in bf16] == [r.name for r in fp32]
    assert all(b.gflops == pytest.approx(f.gflops, rel=1e-12) and b.median_s > 0 for b, f in zip(bf16, fp32))


def test_with_50_adds_the_loop_and_encoder_propagation():
    """--with-50: the 50-step loop and, beside it, 50-step propagation (9 full steps, decoders alone at the 41 others)."""
    rows = inference_rows(ARCHS["tiny"], (64, 64), torch.device("cpu"), torch.float32, repeats=1, with_50=True, end_to_end=False)
    names = [r.name for r in rows]
    loop = names.index("full UNet, 50 steps")
    assert names[loop + 1] == "propagate, 50 steps, 9 key steps"
    f = {r.name: r.gflops for r in rows}
    assert f["full UNet, 50 steps"] == pytest.approx(50 * f["full UNet, 1 step"], rel=1e-12)
    assert 9 * f["full UNet, 1 step"] < f["propagate, 50 steps, 9 key steps"] < f["full UNet, 50 steps"]
    assert all(r.median_s > 0 and r.ratio == pytest.approx(r.median_s / rows[0].median_s) for r in rows)


def test_a_bf16_training_bench_owns_accelerates_process_state_only_while_it_runs():
    """gpu_check times a bf16 step, then runs the demo in fp32 in the same process (on one thread, in-process); and
    an fp32 Accelerator made before (another test in this process) does not stop the bf16 step."""
    from accelerate import Accelerator

    from loopfree.bench.speed import train_rows

    Accelerator(cpu=True, mixed_precision="no")
    train_rows(ARCHS["tiny"], (64, 64), torch.device("cpu"), "bf16", repeats=1)
    assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"  # raised ValueError before
