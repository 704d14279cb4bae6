"""The student as diffusers pipelines (``pipeline``; transformers: ``transformer_pipeline`` and ``pipeline_pixart``,
``pipeline_sd3``, ``pipeline_flux``), the checked loading gate (``loading``, ``files``, ``families``) and ``loopfree
generate`` (``generate``)."""
