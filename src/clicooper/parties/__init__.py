"""The roles of the protocol, each talking only through a Transport."""

from clicooper.parties.data_owner import DataOwner
from clicooper.parties.recorder import Recorder
from clicooper.parties.trainer import Trainer
from clicooper.parties.verifier import Verifier

__all__ = ["DataOwner", "Recorder", "Trainer", "Verifier"]
