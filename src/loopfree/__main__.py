"""``python -m loopfree`` is the ``loopfree`` command."""

from loopfree.cli import main

main()
