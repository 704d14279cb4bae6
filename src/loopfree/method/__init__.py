"""The method, read top to bottom: ``schedule`` (ā, DDIM steps, decoder timesteps) → ``split`` (the UNet as
encoder and decoder: read ``run_decoders`` with ``hoist=False`` first, the plain path; ``hoist`` is its exact fast
path, tested equal) → ``sampler`` (the one pass, the DDIM loop, encoder propagation) → ``guidance`` → ``scores``
(teacher and fake score on one UNet) → ``objective`` (the losses: VSD or SiD, KL, regression; the fake score's).
Transformer denoisers: ``transformer_split`` (the boundary N, one block) → ``split_pixart``, ``split_sd3``,
``split_flux`` (one family each: shared part, per-step part, one pass) with ``flow`` (σ schedules, Euler, v ↔ ε ↔ x₀).

    loopfree distill --teacher path/to/sd21-base --prompts prompts.txt --out runs/tiue   # trains with all of it
    python -m pytest tests/test_split.py tests/test_sampler.py tests/test_objective.py   # each piece against a reference
"""
