"""``loopfree bench``: real UNet shapes by name (``archs``), inference and training speed (``speed``), the
training-memory estimate (``memory``)."""
