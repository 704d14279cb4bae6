"""loopfree: loop-free (TiUE) text-to-image diffusion — encoder once, K decoders in parallel."""

__version__ = "0.1.0"
