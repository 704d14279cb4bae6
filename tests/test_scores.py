"""Teacher and fake score on one UNet; the peft behaviour that per-row routing relies on, pinned."""

import torch
from peft import LoraConfig, inject_adapter_in_model

from loopfree.method.scores import BASE, FAKE, lora_rows


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(6, 6)
        self.to_v = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.to_v(torch.relu(self.to_q(x)))


def test_peft_routes_base_rows_around_the_adapter_and_named_rows_through_it():
    """``lora_rows`` hands peft's ``adapter_names`` keyword to each LoRA layer: rows named ``__base__`` must equal
    the adapter-free model, rows named after the adapter the adapter-on model (peft's mixed-batch semantics)."""
    torch.manual_seed(0)
    model = TwoLinear()
    plain = TwoLinear()
    plain.load_state_dict(model.state_dict())
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]), model, adapter_name=FAKE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    x = torch.randn(4, 6)
    with torch.no_grad():
        with_adapter = model(x)
        with lora_rows(model, [BASE, FAKE, BASE, FAKE]):
            mixed = model(x)
        assert not torch.allclose(with_adapter, plain(x))
        assert torch.allclose(mixed[0::2], plain(x)[0::2], atol=1e-6)
        assert torch.allclose(mixed[1::2], with_adapter[1::2], atol=1e-6)
        assert torch.equal(model(x), with_adapter)  # the hooks are gone after the block
