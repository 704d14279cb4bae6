"""An offline word-level CLIP tokenizer for the toy world.

The vocabulary is CLIP's layout, built from scratch: the 256 byte-level characters, the same
characters as word ends (``</w>``), one BPE merge chain per toy-world word so that each word is
a single token, then ``<|startoftext|>`` and ``<|endoftext|>`` (also padding and unknown) as the
two highest ids, as in CLIP. Any other text still tokenizes, character by character.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from transformers import CLIPTokenizer

from loopfree.toy.world import VOCABULARY

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_END = "</w>"


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level base vocabulary plus merges that make every word of ``words`` one token.

    Words are completed one at a time: while a word splits into several tokens, the merge of its
    first two tokens is appended with the lowest priority. Merges appended later can never fire
    before the earlier ones, so finished words stay single tokens.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + _END for c in alphabet]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    for word in words:
        while True:
            model = BPE(vocab=vocab, merges=merges, end_of_word_suffix=_END, unk_token=EOS)
            pieces = [tok.value for tok in model.tokenize(word)]
            if len(pieces) == 1:
                break
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_tokenizer(out_dir: str | Path | None = None, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer in which every toy-world word is one token; saved to ``out_dir`` if given.

    The directory gets ``vocab.json`` and ``merges.txt`` (CLIP's file formats) alongside the
    ``tokenizer.json`` written by ``save_pretrained``, so ``CLIPTokenizer.from_pretrained`` (and
    diffusers' ``tokenizer/`` component loading) restores it.
    """
    vocab, merges = _vocab_and_merges(VOCABULARY)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )
    if out_dir is not None:
        out = Path(out_dir)
        tokenizer.save_pretrained(out)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tokenizer
