"""``loopfree serve``: a web page and an OpenAI-compatible image API in one process.

    loopfree serve                                   # the bundled toy student and teacher on 127.0.0.1:7860
    loopfree serve --model runs/tiue --teacher path/to/sd21-base --device cuda --max-batch 16

Modules, one concept each: ``schemas`` (request fields and their validation), ``engine`` (loaded models;
a batch of (prompt, seed) items to PNGs), ``batcher`` (the bounded queue and the worker that combines
compatible requests into one pipeline call), ``routes`` (the HTTP API), ``page`` (the Gradio page),
``app`` (assembly, and uvicorn with a drain on SIGTERM). Nothing here is imported by ``import loopfree``.
"""
