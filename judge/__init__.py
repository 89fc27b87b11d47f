"""Judging models without pretrained weights: a lesion classifier trained on the run's own real data
(classifier stage) and the Fréchet distances and class agreement measured with it (evaluate stage)."""
