"""``loopfree distill``: options (``config``), prompt data (``data``), one distillation step (``distiller``), the
loop (``trainer``) and its checkpoints (``checkpoint``)."""
