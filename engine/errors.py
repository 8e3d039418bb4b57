"""The engine's exception types.

Every message is one line that names the file (or argument) and what is wrong with it, so the
command line can print it as it is and the app can show it as a notification.
"""


class AprTuiError(Exception):
    """Base class of every error the engine raises on bad input."""


class PlanError(AprTuiError):
    """A `--save-tensor` stage list or `--save-tensor-layers` range that apr would reject."""


class FormatError(AprTuiError):
    """A file whose bytes do not follow its format (truncated, bad magic, bad lengths, ...)."""


class UnsupportedModelError(AprTuiError):
    """A well-formed model file of an architecture, dtype or feature the engine does not support."""


class MissingTensorError(AprTuiError):
    """A model file that lacks a tensor the architecture needs."""


class TokenizerError(AprTuiError):
    """No usable tokenizer, or a prompt / token list that cannot be used."""


class DiffError(AprTuiError):
    """Two stage tensors (or traces) that cannot be compared element-wise."""


class TokenMismatchError(DiffError):
    """Two traces that were produced from different token sequences."""


class MissingPackageError(AprTuiError):
    """An optional package a feature needs is not installed; the message names what to install."""
