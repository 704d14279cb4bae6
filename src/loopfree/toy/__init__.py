"""The toy world: a small captioned-image domain with ground truth, for CPU-sized end-to-end runs.

``world`` generates images and captions, ``tokenizer`` builds a word-level CLIP tokenizer for its vocabulary,
``classifier`` is the metric network, ``assets`` finds the bundled models and ``settings`` holds the toy commands'
defaults. Scoring with the classifier lives in :mod:`loopfree.evaluation.toy`; the demo in :mod:`loopfree.demo`.
"""
