"""Prompts → conditioning through the teacher's frozen text encoder(s), with a bounded host-memory cache
(``--cache-prompt-embeds``, ``--prompt-cache-mb``)::

    encode = PromptEncoder(pipe, device, resolution=512, cache_mb=4096)
    cond, uncond = encode(["a red cat", "a blue dog"])
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from loopfree.method.sampler import Conditioning


class PromptEncoder:
    """Prompts → (conditional, unconditional) conditioning through the teacher's frozen text encoder(s).

    The unconditional side is the same for every prompt, so it is encoded once. With ``cache_mb`` each prompt's
    conditioning is kept after its first encoding, in host memory and in the encoder's own dtype (so a cached
    prompt gives bit for bit what encoding it again would), up to ``cache_mb`` MiB: the least recently used go first.
    """

    def __init__(self, pipe, device: torch.device, resolution: int, cache_mb: float = 0):
        self.pipe, self.device, self.size = pipe, device, (resolution, resolution)
        self.cache: OrderedDict[str, Conditioning] = OrderedDict()
        self.limit, self.bytes = int(cache_mb * 2**20), 0
        with torch.no_grad():
            self.uncond = pipe.encode_conditioning([""], None, 1, True, device, self.size)[1]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Conditioning:
        return self.pipe.encode_conditioning(prompts, None, 1, False, self.device, self.size)[0]

    def _keep(self, prompt: str, c: Conditioning) -> None:
        host = Conditioning(c.text.cpu(), None if c.added is None else {k: v.cpu() for k, v in c.added.items()})
        self.cache[prompt] = host
        self.bytes += _nbytes(host)
        while self.bytes > self.limit and self.cache:
            self.bytes -= _nbytes(self.cache.popitem(last=False)[1])

    def __call__(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        if not self.limit:
            cond = self._encode(prompts)
        else:
            missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
            fresh = {}
            if missing:
                encoded = self._encode(missing)
                fresh = {p: encoded.rows(i, i + 1) for i, p in enumerate(missing)}
            parts = []
            for p in prompts:
                if p in fresh:
                    parts.append(fresh[p])
                else:
                    self.cache.move_to_end(p)
                    host = self.cache[p]
                    parts.append(Conditioning(host.text.to(self.device),
                                              None if host.added is None else {k: v.to(self.device) for k, v in host.added.items()}))
            for p, c in fresh.items():
                self._keep(p, c)
            cond = Conditioning.cat(parts)
        return cond, self.uncond.repeat(len(prompts))


def _nbytes(c: Conditioning) -> int:
    return c.text.nbytes + sum(v.nbytes for v in (c.added or {}).values())
