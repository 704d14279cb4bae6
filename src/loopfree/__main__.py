"""``python -m loopfree`` is the ``loopfree`` command (named so in its help and messages)."""

from loopfree.cli import main

main(prog_name="loopfree")
