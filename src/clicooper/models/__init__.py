"""Models as ordered named blocks, cut into a head and trainer segments.

Presets (``mlp``, ``cnn``) name their cut points; any user ``nn.Sequential``
can be split at module indices. Every segment is an ordinary ``nn.Module``.
"""

from clicooper.models.presets import PRESETS, build_preset
from clicooper.models.split import SplitModel, split_blocks, split_sequential

__all__ = ["PRESETS", "SplitModel", "build_preset", "split_blocks", "split_sequential"]
