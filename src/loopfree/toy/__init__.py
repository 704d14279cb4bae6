"""The toy world: a small captioned-image domain with ground truth, for CPU-sized end-to-end runs.

``world`` generates images and captions, ``tokenizer`` builds a word-level CLIP tokenizer for its
vocabulary, ``classifier`` is the metric network and ``evaluate`` scores generated images.
"""
