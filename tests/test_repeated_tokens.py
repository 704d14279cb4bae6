"""SD3's zero text rows run as one (method/repeated_tokens.compact_zero_rows): the one pass, the teacher's scores and
a whole distillation step equal the plain path on all the rows."""

import pytest
import torch
from accelerate import Accelerator

from loopfree.method import flow, repeated_tokens, split_sd3
from loopfree.method.sampler import Conditioning
from loopfree.training.distiller import Batch, Distiller
from test_distill_transformer import SCHEDULER, config
from test_flow_objective import tiny_sd3

ROWS = 256  # StableDiffusion3Pipeline's zero rows without T5


def zero_padded(batch: int, seed: int, rows: int = ROWS) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    text = torch.cat([torch.randn(batch, 5, 12, generator=g), torch.zeros(batch, rows, 12)], dim=1)
    return Conditioning(text, {"pooled_projections": torch.randn(batch, 6, generator=g)})


def test_zero_tail_counts_the_rows_zero_in_every_batch_row():
    c = zero_padded(3, 0, rows=4)
    assert repeated_tokens.zero_tail(c.text) == 4
    c.text[1, -2, 5] = 1.0  # one batch row's second-to-last row is not zero: only the last counts
    assert repeated_tokens.zero_tail(c.text) == 1
    model = tiny_sd3()
    same, kwargs = repeated_tokens.compact_zero_rows(model, c)
    assert same is c and kwargs is None  # nothing to gain: the plain call, the model untouched
    assert type(next(iter(model.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"
    short, kwargs = repeated_tokens.compact_zero_rows(model, zero_padded(3, 0))
    assert short.text.shape == (3, 6, 12) and kwargs == {"repeats": ROWS}


def one_pass(cond, uncond):
    model = tiny_sd3()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return split_sd3.loop_free(model, x_T, flow.decoder_sigmas(SCHEDULER.config, 3), cond, uncond, 4.5, shared_blocks=1)


def test_the_one_pass_on_zero_rows_equals_the_plain_path(monkeypatch):
    cond, uncond = zero_padded(2, 1), zero_padded(2, 2)
    fast = one_pass(cond, uncond)
    monkeypatch.setattr(repeated_tokens, "compact_zero_rows", lambda model, c: (c, None))
    plain = one_pass(cond, uncond)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_a_model_that_ran_compacted_still_serves_plain_calls():
    model, c = tiny_sd3(), zero_padded(2, 1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 300.0])
    call = lambda: model(x, encoder_hidden_states=c.text, pooled_projections=c.added["pooled_projections"], timestep=t).sample  # noqa: E731
    with torch.no_grad():
        before = call()
        repeated_tokens.compact_zero_rows(model, c)
        assert all(isinstance(p, repeated_tokens.RepeatedTokenJointAttention) for p in model.attn_processors.values())
        torch.testing.assert_close(call(), before, rtol=0, atol=1e-6)


def distillation_step(tmp_path, regression: bool):
    torch.manual_seed(0)
    kw = dict(regression_weight=1.0) if regression else {}
    d = Distiller(config(tmp_path, **kw), tiny_sd3(), SCHEDULER, Accelerator(cpu=True), latent_size=8)
    cond, uncond = zero_padded(2, 1), zero_padded(2, 2)
    pairs = (zero_padded(2, 3), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)) if regression else None
    logs = d.step([Batch(cond, uncond, pairs=pairs)])
    return logs, [p.detach().clone() for p in (*d.student_params, *d.lora_params)]


@pytest.mark.parametrize("regression", [False, True])
def test_a_distillation_step_on_zero_rows_equals_the_plain_path(tmp_path, monkeypatch, regression):
    fast_logs, fast = distillation_step(tmp_path / "fast", regression)
    monkeypatch.setattr(repeated_tokens, "compact_zero_rows", lambda model, c: (c, None))
    plain_logs, plain = distillation_step(tmp_path / "plain", regression)
    assert fast_logs.keys() == plain_logs.keys()
    for key in fast_logs:
        assert fast_logs[key] == pytest.approx(plain_logs[key], rel=1e-4, abs=1e-6), key
    # one Adam step moves each weight by about lr = 1e-3 · g/(|g| + ε): the moves agree to 1 % of a step
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
