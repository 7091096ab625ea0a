"""Training with the similarity term (the paper, §4).

:mod:`.pair_term` computes the term (:meth:`Handle.pair_similarity`); :mod:`.helpers` draws the
pairs and keeps BatchNorm on its running statistics.
"""

from .helpers import same_class_pairs, augmentation_pairs, batchnorm_running_stats

__all__ = ["same_class_pairs", "augmentation_pairs", "batchnorm_running_stats"]
