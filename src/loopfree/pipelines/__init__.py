"""The student as diffusers pipelines (``pipeline``), the checked loading gate (``loading``) and ``loopfree
generate`` (``generate``)."""
