"""Test-session settings: caches the library would keep in the home folder go to a temporary one."""

import os
import tempfile


def pytest_configure(config):
    os.environ["LOOPFREE_CACHE"] = tempfile.mkdtemp(prefix="loopfree-test-cache-")
