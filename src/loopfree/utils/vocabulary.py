"""Names every layer and the command line share, defined once and importable without torch (``loopfree --help``
stays fast)."""

MODES = ("loop_free", "loop", "propagate")  # sampling modes: the one pass, the DDIM loop, encoder propagation
DTYPES = ("fp32", "fp16", "bf16")  # precisions by name
MAX_SEED = 2**64 - 1  # seeds are 64-bit (SeedSequence input)
