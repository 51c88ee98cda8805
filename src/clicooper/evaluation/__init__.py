"""The evaluation: vanilla vs CliCooper under every attack (DESIGN.md section 7).

:func:`evaluate` trains both runs, builds each attacking party's view of what it
received (:mod:`.views`), runs the attack library on those views only
(:mod:`.adapters`), scores against the truth (:mod:`.truth`) and writes
results.json, report.md (:mod:`.report`) and figures (:mod:`.figures`).
"""

from clicooper.evaluation.orchestrate import evaluate
from clicooper.evaluation.settings import FULL, QUICK, EvalSettings

__all__ = ["FULL", "QUICK", "EvalSettings", "evaluate"]
