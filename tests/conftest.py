"""Test-session settings: caches the library would keep in the home folder go to a temporary one; under pytest-xdist
(pyproject's ``-n auto``: one test process per core) each process and what it starts computes on one thread, since
OpenMP threads of two processes contending for the same cores stall each other."""

import os
import tempfile


def pytest_configure(config):
    os.environ["LOOPFREE_CACHE"] = tempfile.mkdtemp(prefix="loopfree-test-cache-")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # before any test module imports torch
        os.environ["OMP_NUM_THREADS"] = "1"
