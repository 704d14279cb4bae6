"""The method, read top to bottom: ``schedule`` (ā, DDIM steps, decoder timesteps) → ``split`` (the UNet as
encoder and decoder; ``hoist`` is its exact fast path) → ``sampler`` (the one pass, the DDIM loop, encoder
propagation) → ``guidance`` → ``scores`` (teacher and fake score on one UNet) → ``objective`` (the losses).

    loopfree distill --teacher path/to/sd21-base --prompts prompts.txt --out runs/tiue   # trains with all of it
"""
