"""``loopfree eval``: generate images for a prompt set, resumably and over many processes, and score them like the
paper (FID, KID, CLIP score, precision/recall/F1, density/coverage, latency, memory; toy-world alignment).

    loopfree eval --model runs/tiue --prompts captions_val2014.json --num-prompts 30000 --out evals/tiue \\
        --reference-images coco/val2014 --inception inception-2015-12-05.pt --clip clip-vit-g-14

Modules: ``settings`` (the options), ``prompts`` (sources and subsets), ``generation`` (the resumable generate
stage), ``features`` (image preparation, Inception), ``clip`` (CLIP score), ``reference`` (the reference-feature
cache), ``scores`` (metrics from features), ``latency``, ``results`` (results.json/md and reports), ``run``.
"""
