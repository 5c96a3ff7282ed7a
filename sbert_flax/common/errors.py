"""Which exceptions are the user's to fix and which are bugs: what the command lines report how.

A user error (a bad file, a bad flag value, a missing model, a full disk) is one line on stderr
and exit code 2: the message says what was wrong and what to do, and a traceback would only bury
it. Anything else is a bug in sbert-flax (or in how it drives a dependency): its traceback is
printed, with a line saying so, and the exit code is 1.

The user errors:
- the library's own refusal classes (`USER_ERROR_CLASSES`: ConfigError, WeightsError, DataError,
  ResumeMismatch, InputTooLong, ModelNotFoundError, ...);
- OSError (missing, unreadable or existing paths, a full disk, no network): about the user's
  files and machine, never the code;
- a ModuleNotFoundError for a package other than sbert_flax (an optional dependency that is not
  installed);
- a ValueError or ImportError that sbert_flax's own code raised (the innermost frame of its
  traceback is in the sbert_flax package, and for ImportError no module name is attached): the
  library's way of refusing input, with a message for people. The same classes raised inside
  numpy, JAX or another dependency mean sbert-flax passed it something it should not have: a bug.

TypeError, KeyError, AttributeError, IndexError, RuntimeError, AssertionError, ... are always
bugs: a user's input never reaches them without a check first.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import TextIO

EXIT_BUG = 1
EXIT_USER_ERROR = 2

# Module -> the classes it defines for "the input is wrong". Looked up by name, and only in
# modules already imported, so that classifying an error never imports JAX or torch (an exception
# cannot be an instance of a class whose module was never imported). tests/common/test_errors.py checks
# that every name resolves, so a rename cannot silently drop one.
USER_ERROR_CLASSES: dict[str, tuple[str, ...]] = {
    "sbert_flax.models.config": ("ConfigError", "WeightsError"),
    "sbert_flax.checkpoints.loading": ("ModelNotFoundError",),
    "sbert_flax.inference.encoder": ("InputTooLong",),
    "sbert_flax.training.sources": ("DataError",),
    "sbert_flax.training.trainer": ("ResumeMismatch",),
    "sbert_flax.cli.serve": ("MissingServeExtra",),
    "sbert_flax.cli.args": ("UsageError",),
}


def user_error_classes(import_modules: bool = False) -> tuple[type[BaseException], ...]:
    """The classes of `USER_ERROR_CLASSES` whose modules are imported (all, with `import_modules`)."""
    found: list[type[BaseException]] = []
    for module_name, names in USER_ERROR_CLASSES.items():
        module = (importlib.import_module(module_name) if import_modules
                  else sys.modules.get(module_name))
        if module is not None:
            found += [getattr(module, n) for n in names]
    return tuple(found)


def _raised_in_sbert_flax(e: BaseException) -> bool:
    """The innermost Python frame of `e`'s traceback belongs to the sbert_flax package."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "sbert_flax" or module.startswith("sbert_flax.")


def is_user_error(e: BaseException) -> bool:
    """True if `e` is the user's to fix (see the module docstring); False for a bug."""
    if isinstance(e, user_error_classes()):
        return True
    if isinstance(e, OSError):
        return True
    if isinstance(e, ModuleNotFoundError):
        top = (e.name or "").split(".")[0]
        return top not in ("", "sbert_flax")
    if isinstance(e, ImportError):  # "cannot import name": the import machinery sets e.name
        return e.name is None and _raised_in_sbert_flax(e)
    if isinstance(e, ValueError):
        return _raised_in_sbert_flax(e)
    return False


def report_bug(prog: str, e: BaseException, file: TextIO | None = None) -> int:
    """Prints `e`'s traceback and a line saying it is a bug; returns `EXIT_BUG`."""
    file = sys.stderr if file is None else file
    traceback.print_exception(type(e), e, e.__traceback__, file=file)
    print(f"{prog}: internal error ({type(e).__name__}): this is a bug in sbert-flax, not a "
          "problem with your input; please report it with the traceback above", file=file)
    return EXIT_BUG
