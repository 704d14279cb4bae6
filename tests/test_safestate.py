"""Optimiser and EMA state round-trip through safetensors exactly."""

import torch

from loopfree.utils.safestate import load_state, save_state


def test_optimizer_state_roundtrip_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    save_state(tmp_path / "s.safetensors", {"step": 2, "model": model.state_dict(), "opt": opt.state_dict(), "x": [1.5, None, "a"]})
    assert not (tmp_path / "s.safetensors.tmp").exists()

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    saved = load_state(tmp_path / "s.safetensors")
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert saved["step"] == 2 and saved["x"] == [1.5, None, "a"]
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)
