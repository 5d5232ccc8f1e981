"""sdlora's errors: one base class, so a caller (or the command line) catches a user's mistake as
`SdloraError` and a bug still shows as a bug.

Each kind also derives from the built-in error it refines (ValueError, OSError, ...), so code that
caught those before keeps working.
"""


class SdloraError(Exception):
    """A problem with what sdlora was given (a file, a value, a folder), said in one line."""


class ConfigError(SdloraError, ValueError):
    """A training option that cannot work, with the option and the value in the message."""


class DataError(SdloraError, ValueError):
    """A dataset that cannot be trained on (no images, every image unreadable, ...)."""


class AdapterFileError(SdloraError, ValueError):
    """An adapter file that cannot be used, with the file and the reason in the message."""


class FamilyMismatch(AdapterFileError):
    """An adapter made for another model family (SDXL on SD 1.x, say); nothing was modified."""


class ModelError(SdloraError, ValueError):
    """A base model that cannot be found or loaded, or that sdlora cannot train."""


class ModelSourceError(ModelError):
    """The model named by the user cannot be found or read; the message says what to do."""


class UnknownArchitecture(ModelError):
    """A single-file checkpoint that is none of the shipped architectures; the message says why."""


class OutputFolderBusy(SdloraError, RuntimeError):
    """Another sdlora run holds this output folder."""


class TrainingDiverged(SdloraError, RuntimeError):
    """The loss or the adapter's weights became NaN or infinite; `last_good_step`, when known, is the
    last step whose loss was finite."""

    def __init__(self, message: str, last_good_step: int | None = None):
        super().__init__(message)
        self.last_good_step = last_good_step


class TrainingStopped(Exception):
    """A run ended early because it was asked to (a stop request, see training/control.py), its
    checkpoint written. Not an SdloraError: nothing was wrong with what sdlora was given."""


class WriteFailed(SdloraError, OSError):
    """A file could not be written; what was there before is unchanged and no temporary is left."""

    def __str__(self) -> str:
        return self.strerror
