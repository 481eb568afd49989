"""The exceptions mmlens raises on bad input, so callers can catch them by kind and messages stay in one style."""

from __future__ import annotations


class UnknownNameError(KeyError, ValueError):
    """A hook point or cache entry that does not exist. A KeyError (so `Mapping.get` and `in` behave) and a
    ValueError (a bad argument); its message quotes the name and lists the closest valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class LensBusyError(RuntimeError):
    """A Lens (or the model under it) is already in use by another thread."""


class CheckpointError(ValueError):
    """A checkpoint folder mmlens will not or cannot load: a config that is not valid JSON or lacks a field, a
    truncated or corrupt safetensors file. The message quotes the file and says what to fix."""


class PickleWeightsError(CheckpointError):
    """Weights stored only in pickle format (.bin, .pt, .ckpt): unpickling can run arbitrary code, so mmlens
    refuses them and says how to convert to safetensors."""
