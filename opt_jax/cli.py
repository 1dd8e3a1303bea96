r"""What every binary in experiments/ and tools/ does the same way: flags, logs, errors, summary.

A binary is a settings dataclass and one function:

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Settings(cli.Settings):
    input: str = cli.option(help="Text file to score.")                  # required: no default
    batch_size: int = cli.option(8, "Rows per forward pass.", ge=1)
    dtype: str = cli.option("float32", "Compute dtype.", choices=inputs.DTYPES)

  def run(settings: Settings) -> cli.Summary: ...

  if __name__ == "__main__":
    cli.main(Settings, run)

Each field is declared once: its absl flag (name, type, default, help, choices) is derived from
it, its bounds are checked when the dataclass is built (also from Python), and the run manifest
records `as_dict(settings)`. Fields marked `key=False` do not change what is computed (output
folder, batch size, plots...); every other field goes into the experiment's result key (`key`).

`main` then makes the terminal behave the same way in every binary:
  * library logs (orbax, absl, JAX) at WARNING; absl's `--verbosity` (e.g. -v 0 for INFO) brings
    them back; every log line and warning is written through tqdm, so a progress bar is redrawn
    below it instead of being broken;
  * a user error (opt_jax.errors.UserError, a flag that does not parse, a path named by an OS
    error that is missing, not allowed, in the way or read-only, a full disk however deep in a
    library it was hit: opt_jax.files.disk_full_cause) prints `error: <message>` and exits with
    status 2, without a traceback; any other exception is a bug and keeps its traceback;
  * JAX's persistent compilation cache is on (default $XDG_CACHE_HOME/opt_jax/jax_cache, i.e.
    ~/.cache/opt_jax/jax_cache; `--compilation_cache=DIR` moves it, `--compilation_cache=` turns it
    off; JAX_COMPILATION_CACHE_DIR is honoured), so a second run compiles nothing it compiled
    before;
  * the function's `Summary` is printed when it returns: what was evaluated, the headline
    result, what was skipped or failed and why, the output folder and its main files, wall time.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from opt_jax.errors import InputError, UserError

# OS errors about a path the user named (missing, not allowed, in the way, read-only, full): one
# `error:` line naming the path. Any other OSError keeps its traceback.
_USER_ERRNOS = frozenset((errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                          errno.EEXIST, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                          errno.ENAMETOOLONG, errno.ELOOP))

COMPILATION_CACHE_FLAG = "compilation_cache"
_MISSING = dataclasses.MISSING
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


# Settings dataclasses -> flags ---------------------------------------------------------------

def option(default: Any = _MISSING, help: str = "", *, choices: Sequence[str] | None = None,
           key: bool = True, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
  """A settings field and the flag derived from it. No default: the flag is required.

  choices: allowed values (an enum flag). ge/gt/le/lt: bounds of a number (of each element of a
  tuple). key: False when the field does not change any computed number (output location,
  batching, plots), so it stays out of the result key.
  """
  # pylint: disable=redefined-builtin
  meta = {"help": help, "choices": tuple(choices) if choices else None, "key": key,
          "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                     if v is not None}}
  if default is _MISSING:
    return dataclasses.field(metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


def _kind(tp: Any) -> tuple[type, bool, bool]:
  """(scalar type, is a tuple, may be None) of a field annotation."""
  optional = False
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional, tp = len(args) < len(typing.get_args(tp)), args[0]
  if typing.get_origin(tp) is tuple:
    return typing.get_args(tp)[0], True, optional
  return tp, False, optional


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool, bool]]:
  hints = typing.get_type_hints(cls)
  return [(f, *_kind(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def _show(value: Any) -> str:
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Base of every binary's settings: fields made with `option`, checked when built."""

  def __post_init__(self):
    for f, scalar, is_tuple, optional in _fields(type(self)):
      value = getattr(self, f.name)
      if value is None:
        if not optional:
          raise InputError(f"--{f.name} is required")
        continue
      if is_tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
          raise InputError(f"--{f.name}={value!r}: expected a list of {scalar.__name__}")
        value = tuple(_coerce(f.name, v, scalar) for v in value)
      else:
        value = _coerce(f.name, value, scalar)
      object.__setattr__(self, f.name, value)
      for v in value if is_tuple else (value,):
        choices = f.metadata.get("choices")
        if choices and v not in choices:
          raise InputError(f"--{f.name}={_show(value)}: {v!r} is not one of {', '.join(choices)}")
        bounds = f.metadata.get("bounds", {})
        outside = any(not _BOUNDS[k][1](v, b) for k, b in bounds.items())
        if outside or (isinstance(v, float) and not math.isfinite(v)):
          want = " and ".join(f"{_BOUNDS[k][0]} {b:g}" for k, b in bounds.items())
          kind = {(int, False): "an integer", (int, True): "integers",
                  (float, False): "a number", (float, True): "numbers"}[scalar, is_tuple]
          raise InputError(f"--{f.name}={_show(value)}: expected {kind}"
                           f"{' ' + want if want else ''}" + (f" (got {v})" if is_tuple else ""))

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any, scalar: type) -> Any:
  if scalar is bool:
    if not isinstance(value, bool):
      raise InputError(f"--{name}={value!r}: expected true or false")
    return value
  if scalar in (int, float):
    if isinstance(value, bool):
      raise InputError(f"--{name}={value!r}: expected a number")
    try:
      number = scalar(value)
    except (TypeError, ValueError):
      kind = "an integer" if scalar is int else "a number"
      raise InputError(f"--{name}={value!r}: expected {kind}") from None
    if scalar is int and number != float(value):
      raise InputError(f"--{name}={value!r}: expected an integer")
    return number
  if not isinstance(value, scalar):
    raise InputError(f"--{name}={value!r}: expected a {scalar.__name__}")
  return value


def define_flags(cls: type, flag_values: Any = None) -> None:
  """One absl flag per field of `cls` (name, default, help, choices; required if no default)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  fv = flag_values if flag_values is not None else flags.FLAGS
  # Registered as the main module's own flags, so --help lists them.
  kw = dict(flag_values=fv, module_name=sys.argv[0])
  for f, scalar, is_tuple, _ in _fields(cls):
    default = None if f.default is _MISSING else f.default
    help_text = f.metadata.get("help") or f.name
    choices = f.metadata.get("choices")
    if is_tuple:
      flags.DEFINE_list(f.name, None if default is None else [str(v) for v in default], help_text,
                        **kw)
    elif choices:
      flags.DEFINE_enum(f.name, default, list(choices), help_text, **kw)
    elif scalar is bool:
      flags.DEFINE_bool(f.name, default, help_text, **kw)
    elif scalar is int:
      flags.DEFINE_integer(f.name, default, help_text, **kw)
    elif scalar is float:
      flags.DEFINE_float(f.name, default, help_text, **kw)
    else:
      flags.DEFINE_string(f.name, default, help_text, **kw)
    if f.default is _MISSING:
      flags.mark_flag_as_required(f.name, flag_values=fv)


def from_flags(cls: type, flag_values: Any = None):
  """The settings the parsed flags describe (checked: InputError naming the flag)."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  fv = flag_values if flag_values is not None else flags.FLAGS
  values = {}
  for f, scalar, is_tuple, _ in _fields(cls):
    value = fv[f.name].value
    if is_tuple and value is not None and scalar is not str:
      value = tuple(_parse_element(f.name, v, scalar) for v in value)
    values[f.name] = value
  return cls(**values)


def _parse_element(name: str, text: str, scalar: type) -> Any:
  try:
    return scalar(text)
  except ValueError:
    raise InputError(f"--{name}: {text!r} is not {'an integer' if scalar is int else 'a number'}"
                     ) from None


def as_dict(settings: Any) -> dict[str, Any]:
  """Every field (tuples as lists): what a run manifest records."""
  return {f.name: list(v) if isinstance(v := getattr(settings, f.name), tuple) else v
          for f in dataclasses.fields(settings)}


def key(settings: Any) -> dict[str, Any]:
  """The fields that change computed numbers (option(key=True), the default)."""
  values = as_dict(settings)
  return {f.name: values[f.name] for f in dataclasses.fields(settings)
          if f.metadata.get("key", True)}


# The closing summary --------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
  """What a binary tells its user when it finishes (a few lines; `render`).

  evaluated: what ran (models, checkpoints, tasks or tokens); results: the headline numbers;
  skipped: what was skipped or failed, each with its reason; out_dir and files: where the outputs
  are (files relative to out_dir, or absolute).
  """
  title: str
  evaluated: list[str] = dataclasses.field(default_factory=list)
  results: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  out_dir: str | None = None
  files: list[str] = dataclasses.field(default_factory=list)
  exit_code: int = 0            # non-zero: the binary exits with it after printing (a finding)

  def render(self, seconds: float | None = None) -> str:
    took = f" in {format_seconds(seconds)}" if seconds is not None else ""
    lines = [f"== {self.title} finished{took}"]
    sections = (("evaluated", self.evaluated), ("result", self.results),
                ("skipped", self.skipped or ["nothing"]))
    for name, items in sections:
      for i, item in enumerate(items):
        lines.append(f"{name + ':' if i == 0 else '':<11}{item}")
    if self.out_dir or self.files:
      where = (self.out_dir + ("/" if self.files else "")) if self.out_dir else ""
      lines.append(f"{'outputs:':<11}{where}" + (" " if where else "") + ", ".join(self.files))
    return "\n".join(lines)


def plural(n: int, word: str, many: str | None = None) -> str:
  """'1 document', '5 documents' ('1 entry', '2 entries' with many="entries")."""
  return f"{n:,} {word if n == 1 else (many or word + 's')}"


def format_seconds(seconds: float) -> str:
  s = int(round(seconds))
  if s < 60:
    return f"{seconds:.1f} s"
  return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else \
      f"{s // 60}m {s % 60:02d}s"


def say(message: str, enabled: bool = True) -> None:
  """A status line for the user (stderr) that does not break a progress bar."""
  if enabled:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(message, file=sys.stderr)


# Logs, errors, compilation cache, main ------------------------------------------------------

class _BarSafeStream:
  """A stream for log handlers: each write goes through tqdm, which clears the progress bars,
  writes the line and redraws them."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    tqdm.write(text, file=self._stream, end="")

  def flush(self) -> None:
    self._stream.flush()

  def close(self) -> None:
    """Logging closes handler streams at exit; stderr stays open."""


class _PlainFormatter(logging.Formatter):
  """'warning: message' instead of absl's 'W1207 23:37:01.118535 123 sweep.py:289] message'."""

  def format(self, record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return f"{record.levelname.lower()}: {text}"


def quiet_logs(verbosity_given: bool) -> None:
  """Library logs at WARNING, as 'warning: message', unless --verbosity was given (then absl's
  full prefix: time, thread, file and line); log lines never break a bar."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  handler = absl_logging.get_absl_handler()
  if not verbosity_given:
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler.python_handler.setFormatter(_PlainFormatter())
  handler.python_handler.stream = _BarSafeStream(sys.stderr)
  if handler not in logging.root.handlers:
    logging.root.addHandler(handler)
  logging.captureWarnings(True)


def default_compilation_cache() -> str:
  """JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/opt_jax/jax_cache."""
  from opt_jax import files  # pylint: disable=import-outside-toplevel
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or files.user_cache_dir("jax_cache")


def enable_compilation_cache(path: str | None) -> None:
  """JAX's persistent compilation cache in `path` for every program, however fast it compiled
  (the default threshold of 1 s would skip most of a small model's programs); None or "": off.

  Works before or after jax is imported, as long as nothing has been compiled yet.
  """
  settings = {"jax_compilation_cache_dir": path or None,
              "jax_persistent_cache_min_compile_time_secs": 0.0}
  if not path:
    settings = {"jax_enable_compilation_cache": False}
  if "jax" in sys.modules:
    import jax  # pylint: disable=import-outside-toplevel
    for name, value in settings.items():
      jax.config.update(name, value)
  else:  # jax reads these when it is imported
    for name, value in settings.items():
      os.environ[name.upper()] = str(value)


def user_error_message(error: BaseException) -> str | None:
  """The message to print for an error the user can fix, None for a bug."""
  from opt_jax import files  # pylint: disable=import-outside-toplevel
  full = None if isinstance(error, UserError) else files.disk_full_cause(error)
  if isinstance(error, UserError):
    text = str(error)
  elif full is not None:   # not through opt_jax.files (which names the output): say what is known
    path = getattr(full, "filename", None)
    text = (str(files.disk_full_error(path)) if path else
            f"no space left on device ({type(full).__name__}: {str(full).splitlines()[0][:200]}): "
            "free some space or write the outputs elsewhere")
  elif (isinstance(error, OSError) and error.filename and error.errno in _USER_ERRNOS):
    text = f"{error.filename}: {error.strerror or error}"
  else:
    return None
  notes = getattr(error, "__notes__", None) or []
  return "\n".join([text, *notes])


def _quiet_closed_loop_callbacks() -> None:
  """Drops "Event loop is closed" from the unraisable-exception hook: orbax's worker threads,
  stopped by an error (e.g. a full disk) that the binary reports in one line, leave tensorstore
  callbacks that fire on their closed event loops and would print a traceback each."""
  default = sys.unraisablehook

  def hook(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      default(unraisable)
  sys.unraisablehook = hook


def _is_main_process() -> bool:
  if "jax" not in sys.modules:
    return True
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    missing = re.search(r"Flag --(\w+) must have a value other than None", str(e))
    print(f"error: {f'--{missing.group(1)} is required' if missing else e}\n"
          f"(--help lists the flags)", file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"error: unexpected arguments {rest[1:]}; every setting is a --flag (--help lists "
          f"them)", file=sys.stderr)
    sys.exit(2)
  return rest


def main(settings_cls: type, fn: Callable[[Any], Summary | None], *,
         before: Callable[[Any], None] | None = None) -> None:
  """Runs a binary: flags from `settings_cls`, then fn(settings); see the module docstring.

  before(settings): called after the flags are parsed and before anything else (for settings
  that must reach JAX before it starts, e.g. XLA_FLAGS or a simulated device count).
  """
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  define_flags(settings_cls)
  flags.DEFINE_string(COMPILATION_CACHE_FLAG, None,
                      "JAX's persistent compilation cache folder: a second run compiles nothing "
                      "it compiled before (default: JAX_COMPILATION_CACHE_DIR or "
                      "$XDG_CACHE_HOME/opt_jax/jax_cache; empty: off).")

  def run(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    quiet_logs(flags.FLAGS["verbosity"].present)
    _quiet_closed_loop_callbacks()
    cache = flags.FLAGS[COMPILATION_CACHE_FLAG].value
    try:
      settings = from_flags(settings_cls)
      if before is not None:
        before(settings)
      enable_compilation_cache(default_compilation_cache() if cache is None else cache)
      summary = fn(settings)
    except KeyboardInterrupt:
      # One line and a closing summary, not a traceback: Ctrl-C is how a user stops a run.
      name = os.path.splitext(os.path.basename(sys.argv[0] or "run"))[0]
      print("\ninterrupted (Ctrl-C)", file=sys.stderr)
      if _is_main_process():
        print(f"== {name} interrupted after {format_seconds(time.perf_counter() - start)}: "
              "what was finished is kept; the same command resumes from there", flush=True)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      message = user_error_message(e)
      if message is None:
        raise
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)
    if summary is not None and _is_main_process():
      print(summary.render(time.perf_counter() - start), flush=True)
    if summary is not None and summary.exit_code:
      sys.exit(summary.exit_code)

  app.run(run, flags_parser=_parse_flags)
