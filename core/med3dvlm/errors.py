"""Exceptions whose message is one sentence a user can act on.

Front ends (CLI, Slicer panel) print ``str(error)`` for these and never a traceback.
"""


class Med3DVLMError(Exception):
    """Base class: the message names the object (file, model, volume) and the problem."""


class VolumeError(Med3DVLMError, ValueError):
    """A volume cannot be read or is not usable (2D, 4D, empty, constant, NaN, too large...)."""


class ModelError(Med3DVLMError):
    """A model folder is missing, incomplete, corrupted or does not match the architecture."""


class RegionError(VolumeError):
    """A region of interest is empty, outside the volume, or too small for the model's input."""


class Med3DVLMWarning(UserWarning):
    """An answer was made otherwise than the model was trained or asked (one sentence): a model
    server passes these on to its client with the answer."""
