"""The errors a user can cause: each message says what is wrong and what to change.

They live apart from the modules that raise them, and import nothing heavy, so that a
command line can catch them without loading torch.
"""


class DatasetError(ValueError):
    """The data folder cannot be used for training; the message says why."""


class OutsideDataRoots(PermissionError):
    """A path resolves to a place outside the folders a job may read."""


class SpecError(ValueError):
    """The sweep file is wrong; the message names the field."""


class RunNotFound(LookupError):
    """No run has that id."""


class RunStateError(ValueError):
    """The run is not in a state that allows what was asked (e.g. retrying a run that succeeded)."""


class ScoringError(ValueError):
    """The job cannot be created; the message says why."""


class EvaluationError(ValueError):
    """The runs cannot be evaluated as asked (no such run, no test split, mismatched splits)."""


class SettingsError(ValueError):
    """A REALFAKE_* environment variable has a value realfake cannot use; the message names it."""


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded; the message says which file to put where."""


# what the command line reports as a message with exit status 2, not a traceback
USER_ERRORS = (DatasetError, OutsideDataRoots, SpecError, RunNotFound, RunStateError, ScoringError, EvaluationError,
               SettingsError, WeightsUnavailable)
