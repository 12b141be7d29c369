"""How every job in jobs/ ends when something goes wrong: one line on stderr, no traceback.

    if __name__ == "__main__":
        run_job(main)

- The input is wrong (a missing or unreadable file, a wrong column, an unknown condition, a
  calibration made for something else, an output folder that cannot be created, an S3
  endpoint that does not answer...): `<job>: <what is wrong and what to do>`, exit code 2.
  What counts as an input error is listed once, in BUILTIN_INPUT_ERRORS and
  PROJECT_INPUT_ERRORS below.
- Anything else (the job failed): `<job>: failed: <ExceptionType>: <message>`, exit code 1.
  Ray's wrappers (a task's or actor's error, Ray Data's and Ray Train's) are unwrapped to the
  exception that was raised on the worker, and classified by it.
- `--debug`, which every job accepts (it is taken out of the arguments before the job's own
  parser sees them), prints the full traceback before that line; the exit code is the same.

A job may also refuse its arguments with `raise SystemExit("message")`: that is an input error
too (`<job>: message`, exit code 2). argparse's own usage errors (exit code 2) and `--help`
pass through unchanged.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from ray_app.pipeline.ray_session import filter_native_stderr

EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
MAX_MESSAGE_CHARS = 1000


class InputError(ValueError):
    """The user's input is wrong; the message names the input, what is wrong and what to do."""


class ColumnError(InputError, KeyError):
    """A column the job was told to read is not in the table (still a KeyError, as before)."""

    def __str__(self) -> str:  # a KeyError repr-quotes its message; this one reads as text
        return str(self.args[0]) if self.args else ""


# The one list of "your input is wrong" exceptions: built-in types, and the project's own
# classes by module (looked up only where their module is imported already: an error of a
# class whose module was never imported cannot have been raised).
BUILTIN_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    InputError,  # ColumnError included
    FileNotFoundError,  # a path the user gave does not exist
    IsADirectoryError,  # a file was expected
    NotADirectoryError,  # a folder was expected (or a file stands in the path)
    PermissionError,  # a path the user gave cannot be read or written
)
PROJECT_INPUT_ERRORS: dict[str, tuple[str, ...]] = {
    "yaml": ("YAMLError",),  # a config, condition or prompt file that is not valid YAML
    "ray_app.evaluation.calibration": ("CalibrationError",),  # unreadable, or made for another setup
    "ray_app.labelling.conditions": ("ConditionError",),  # unknown condition, invalid condition YAML
    "ray_app.labelling.prompts": ("PromptError",),  # invalid prompt variants file
    "ray_app.pipeline.label_job": ("ResumeError",),  # output folder holds labels of another setup
    "ray_app.labelling.scoring": ("AnswerTokenError",),  # the model's tokenizer has no yes/no token
    "ray_app.finetune.masking": ("TargetTooLong",),  # a training example longer than max_length
    "ray_app.imaging.disc_volumes": ("LocationsError",),  # a bad disc-locations table
    "ray_app.imaging.embeddings": ("WeightsError",),  # missing or wrong encoder weights
    "ray_app.imaging.dicom_store": ("UnusableFile",),  # not a usable DICOM file
    "ray_app.imaging.predict": ("PredictionError",),  # an MRI request the models cannot take
}


def input_error_types() -> tuple[type[BaseException], ...]:
    found = list(BUILTIN_INPUT_ERRORS)
    for module, names in PROJECT_INPUT_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None:
            found += [getattr(loaded, name) for name in names]
    return tuple(found)


def is_input_error(err: BaseException) -> bool:
    return isinstance(err, input_error_types())


def unwrap(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions inside Ray's wrappers of it, outermost first. RayTaskError and
    its subclasses carry the worker's exception as `.cause`; Ray Data's and Ray Train's
    wrappers chain it (`__cause__`) or list it per worker. Other libraries' exceptions end the
    walk: their `__cause__` is context, not the error."""
    chain = [err]
    while _is_ray_wrapper(err) and len(chain) < 20:
        inner = getattr(err, "cause", None)
        if not isinstance(inner, BaseException):
            failures = getattr(err, "worker_failures", None)  # Ray Train v2's WorkerGroupError
            if isinstance(failures, dict) and failures:
                inner = next(iter(failures.values()))
        if not isinstance(inner, BaseException):
            inner = getattr(err, "controller_failure", None)  # Ray Train v2's ControllerError
        if not isinstance(inner, BaseException):
            inner = err.__cause__
        if not isinstance(inner, BaseException) or any(inner is e for e in chain):
            break
        chain.append(inner)
        err = inner
    return chain


def _is_ray_wrapper(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    return module == "ray" or module.startswith("ray.")


# "package.module.SomeError: message" as the last line of a (remote) traceback ("File" for
# the project's UnusableFile)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|File))"
                             r"(?:: (.*))?$")
_MESSAGE_ENDS = ("The above exception", "During handling of the above", "Traceback ", "ray::",
                 "\x1b")


def remote_exception(text: str) -> tuple[str, type | None, str] | None:
    """(name, class if importable here, message) of the last exception in a remote traceback
    that is not one of Ray's own: what a Ray wrapper holds only as text (an actor that died in
    its constructor, Ray Data's UserCodeException)."""
    lines = text.splitlines()
    found = None
    for i, line in enumerate(lines):
        match = _EXCEPTION_LINE.match(line)
        if not match or match.group(1).startswith("ray."):
            continue
        body = [match.group(2) or ""]
        for more in lines[i + 1:]:
            if not more.strip() or more.startswith(_MESSAGE_ENDS) or _EXCEPTION_LINE.match(more):
                break
            body.append(more)
        found = (match.group(1), "\n".join(body))
    if found is None:
        return None
    qualified, text = found
    module, _, name = qualified.rpartition(".")
    owner = sys.modules.get(module or "builtins")
    cls = getattr(owner, name, None) if owner is not None else None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = None
    return name, cls, text


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The message's lines joined with spaces, unprintable characters escaped, cut at `limit`."""
    flat = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def message(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, KeyError) and not isinstance(err, ColumnError) and len(err.args) == 1:
        text = str(err.args[0])  # not repr-quoted
    elif isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"  # not "[Errno 2] No such file...: 'path'"
    elif isinstance(err, OSError):
        text = re.sub(r"^\[Errno \d+\] ", "", text)
    return one_line(text)


def diagnose(err: BaseException) -> tuple[str, bool, str]:
    """(exception type name, whether it is an input error, one-line message) of what actually
    went wrong: the worker's exception out of Ray's wrappers, read from their text when Ray
    kept only that."""
    chain = unwrap(err)
    cause = chain[-1]
    if not _is_ray_wrapper(cause):
        return type(cause).__name__, is_input_error(cause), message(cause) or type(cause).__name__
    for wrapper in reversed(chain):
        found = remote_exception(str(wrapper))
        if found:
            name, cls, text = found
            is_input = cls is not None and issubclass(cls, input_error_types())
            return name, is_input, one_line(text) or name
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return type(cause).__name__, False, one_line(lines[-1] if lines else "") or type(cause).__name__


def describe_failure(job: str, err: BaseException, debug: bool = False) -> tuple[str, int]:
    """(the line to print, the exit code) for an exception that ended `job`."""
    if isinstance(err, KeyboardInterrupt):
        return f"{job}: interrupted", EXIT_INTERRUPTED
    name, is_input, text = diagnose(err)
    if is_input:
        return f"{job}: {text}", EXIT_INPUT
    hint = "" if debug else f" (rerun with {DEBUG_FLAG} for the traceback)"
    return f"{job}: failed: {name}: {text}{hint}", EXIT_FAILED


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """The arguments without --debug, and whether it was given."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return rest, len(rest) != len(argv)


def job_name(main: Callable) -> str:
    try:
        return Path(inspect.getfile(main)).stem
    except (TypeError, OSError):
        return getattr(main, "__name__", "job")


def run_job(main: Callable[[list[str]], object], argv: Sequence[str] | None = None,
            name: str | None = None) -> None:
    """Run `main(argv)` (argv: sys.argv[1:] less --debug); when it raises, print one line and
    exit as the module docstring says."""
    args, debug = split_debug(sys.argv[1:] if argv is None else argv)
    if debug:
        os.environ["RAY_APP_DEBUG"] = "1"  # ray_session: Ray's own failure reports shown too
    else:
        filter_native_stderr()
    name = name or job_name(main)
    try:
        main(args)
    except SystemExit as stop:
        if isinstance(stop.code, str):  # SystemExit("message"): the job's own one-line refusal
            print(f"{name}: {one_line(stop.code)}", file=sys.stderr)
            raise SystemExit(EXIT_INPUT) from None
        if stop.code in (0, None) and {"-h", "--help"} & set(args):
            print(f"\nevery job also takes {DEBUG_FLAG}: print the full traceback when it fails")
        raise
    except BaseException as err:  # noqa: BLE001 - every failure ends in one line
        if debug:
            traceback.print_exception(err)
        line, code = describe_failure(name, err, debug)
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(code) from None
