"""Evaluation of a pretrained encoder: the labelled splits every evaluation
shares (`splits`), weighted kNN (`knn`), the linear probe (`lineval`), the
in-training monitor and diagnostics (`monitor`), and the post-training
mutual-information estimate (`mi`, with its `pairs` and `view_features`)."""
