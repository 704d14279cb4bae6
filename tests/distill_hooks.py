"""``loopfree distill`` under torchrun with the hooks tests/test_sharding.py looks through:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distill_hooks.py CONFIG.json HOOKS.json

CONFIG holds DistillConfig fields. HOOKS may hold ``evaluate`` (true: score the EMA student along the run — the
mean and some pixels of two seeded images — into eval.jsonl), ``no_gathers`` (true: a whole-student gather,
``full_weights``, before the final publish fails the run) and ``loaded`` (a folder: the state a resumed run
loaded is written there at once, as a checkpoint, ``checkpoints/checkpoint-00000000``).
"""

import json
import sys
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator

from loopfree.training import distiller as distiller_module
from loopfree.training import trainer
from loopfree.training.checkpoint import save_checkpoint
from loopfree.training.config import load_config


def evaluate(pipe, step: int) -> dict[str, float]:
    images = pipe(["a red cat", "a blue dog"], output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    flat = images.flatten()
    return {"mean": float(images.mean()), **{f"p{i}": float(flat[i * 97 % len(flat)]) for i in range(8)}}


def main(config: str, hooks: str) -> None:
    cfg, hooks = load_config(None, json.loads(config)), json.loads(hooks)
    if hooks.get("no_gathers"):
        published, gather, agree = [], distiller_module.full_weights, trainer.check_replicas_agree

        def guarded_gather(*args, **kwargs):
            if not published:
                raise RuntimeError("the whole student was gathered during the run")
            return gather(*args, **kwargs)

        def agree_then_publish(*args, **kwargs):  # the trainer checks the replicas just before it publishes
            agree(*args, **kwargs)
            published.append(True)

        distiller_module.full_weights, trainer.check_replicas_agree = guarded_gather, agree_then_publish
    if hooks.get("loaded"):
        load = distiller_module.Distiller.load_weights

        def load_then_write(self, directory, ema_step):
            load(self, directory, ema_step)
            save_checkpoint(self.acc, self, Path(hooks["loaded"]), 0, {}, None)

        distiller_module.Distiller.load_weights = load_then_write
    if hooks.get("teardown"):
        prepared, prepare, destroy = [], Accelerator.prepare, torch.distributed.destroy_process_group

        def recording_prepare(self, *args, **kwargs):
            out = prepare(self, *args, **kwargs)
            prepared.extend(weakref.ref(m) for m in (out if isinstance(out, tuple) else (out,)) if isinstance(m, torch.nn.Module))
            return out

        def checked_destroy(*args, **kwargs):
            alive = [type(m).__name__ for ref in prepared if (m := ref()) is not None]
            if alive:
                raise RuntimeError(f"the process group was destroyed while prepared models were alive: {alive}")
            destroy(*args, **kwargs)

        Accelerator.prepare, torch.distributed.destroy_process_group = recording_prepare, checked_destroy
    trainer.distill(cfg, evaluate if hooks.get("evaluate") else None)


if __name__ == "__main__":
    main(*sys.argv[1:])
