"""The toy world's applications: ``loopfree demo`` (``demo``, its learning curves in ``curves``) and the toy
teacher's training (``teacher``, on the resumable CPU loop of ``run``)."""
