"""Errors the person running opt_jax can fix: bad flag values, missing or malformed files,
unsupported formats, model types or config fields, unknown task or model names, outputs in the way.

Raise these, not a bare ValueError, for anything a user can correct. The binaries print the
message (one or a few lines naming what is wrong and what was expected) and exit with status 2,
without a traceback; any other exception is a bug and keeps its traceback. Each class also
subclasses the builtin a caller would catch, so `except ValueError` / `except FileNotFoundError`
keep working.
"""

from __future__ import annotations


class UserError(Exception):
  """Base class: the message names the file, key, flag or example at fault and what was expected."""


class InputError(UserError, ValueError):
  """A value, flag, file content or format that opt_jax cannot use as given."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named (or that a named input needs) does not exist."""


class OutputExistsError(UserError, FileExistsError):
  """An output location is taken by something opt_jax will not overwrite."""


class ConversionError(InputError):
  """Checkpoint files that cannot be read as the model they claim to be (a missing, unexpected,
  misshapen or corrupt tensor, a damaged safetensors header): raised by conversion and by the
  in-place read of HF checkpoints alike. The message names the file and tensor at fault and what
  was expected."""
