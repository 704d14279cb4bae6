"""The paper's analyses behind ``loopfree analyze``, one module per figure: ``features`` (Fig. 1), ``noise``
(Fig. 8), ``interpolate`` (Fig. 9), ``steps`` (Fig. 10); ``capture`` reads UNet features with hooks, ``common``
holds the sampling and checks they share, ``settings`` their defaults (importable without torch)."""
