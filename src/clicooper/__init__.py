"""CliCooper: client-cooperative split learning.

A data owner trains a model through a chain of trainer clients. Its inputs are
protected by differential-privacy noise on the cut-layer activations, its
labels by a secret label obfuscation, and every stage of training is bound to
the trainers who did it by a dynamic chained watermark.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clicooper.api import train
    from clicooper.config import RunConfig
    from clicooper.data import Dataset, Split, load_dataset

__all__ = ["Dataset", "RunConfig", "Split", "load_dataset", "train"]

# The public names load on first use (PEP 562): ``import clicooper`` then costs no torch, so
# the CLI's light commands (certs, pool, node status) start in a fraction of a second.
_LAZY = {
    "train": "clicooper.api",
    "RunConfig": "clicooper.config",
    "Dataset": "clicooper.data",
    "Split": "clicooper.data",
    "load_dataset": "clicooper.data",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clicooper' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
