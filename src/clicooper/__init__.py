"""CliCooper: client-cooperative split learning.

A data owner trains a model through a chain of trainer clients. Its inputs are
protected by differential-privacy noise on the cut-layer activations, its
labels by a secret label obfuscation, and every stage of training is bound to
the trainers who did it by a dynamic chained watermark.
"""

__version__ = "0.1.0"

from clicooper.api import train  # noqa: E402
from clicooper.config import RunConfig  # noqa: E402
from clicooper.data import Dataset, Split, load_dataset  # noqa: E402

__all__ = ["Dataset", "RunConfig", "Split", "load_dataset", "train"]
