"""er_ray's errors: each is written to be read by a person (what is wrong, where, and how to fix it)."""

from __future__ import annotations

import gc
import traceback
from typing import Callable, TypeVar

T = TypeVar("T")


class ErRayError(Exception):
    """Base of every error er_ray raises on purpose; the CLI prints these without a traceback."""


class OptionsError(ErRayError, ValueError):
    """An option value that cannot work."""


class PipelineError(ErRayError, RuntimeError):
    """A Ray Data pipeline failed for a reason er_ray did not name itself (its message keeps Ray's report)."""


def run_pipeline(consume: Callable[[], T]) -> T:
    """consume(), which drives a Ray Data pipeline to its end; what it raises comes out as the user's error.

    Trap: a failed pipeline shuts down without killing its actors. They go only once nothing refers to them, and
    Ray's error does: its traceback holds the executor's frames, some still live in the executor's thread, so
    clearing them is not enough. A caller who keeps the error (a notebook, pytest.raises) kept actors holding CPUs,
    and the next pipeline on a 2-core machine waited for a CPU forever. So the error raised here is a new object
    that refers to none of it, raised outside the except block (no __context__), after a collection (the executor
    sits in reference cycles)."""
    try:
        return consume()
    except Exception as e:
        err = user_error(e)
        # Anything er_ray did not name (a bug, a Ray failure) keeps its whole traceback, as text.
        err = type(err)(*err.args) if isinstance(err, ErRayError) else \
            PipelineError("".join(traceback.format_exception(err)).rstrip())
        del e
    gc.collect()
    raise err


def user_error(e: BaseException) -> BaseException:
    """The er_ray error that code inside a Ray task or actor raised, out of Ray's wrappers, for the user to read;
    any other error unchanged. (Ray wraps it once or twice; Ray Data can lose the cause and keep only the worker's
    error line in its message text.)"""
    import re

    seen, x, original = set(), e, None
    while x is not None and id(x) not in seen:  # the deepest er_ray error of the chain is the one raised
        seen.add(id(x))
        if isinstance(x, ErRayError):
            original = x
        x = getattr(x, "cause", None) or x.__cause__
    if original is not None:
        if type(original).__module__.startswith("er_ray"):
            return original
        # Ray's RayTaskError(SomeError) hybrid: rebuild the plain er_ray error from the original's message
        cls = next(c for c in type(original).__mro__ if issubclass(c, ErRayError) and c.__module__.startswith("er_ray"))
        return cls(*getattr(getattr(original, "cause", None), "args", original.args))
    found = re.search(r"^er_ray\.\w+\.(\w+): (.+)$", str(e), re.M)
    if found:
        classes, todo = {}, [ErRayError]
        while todo:
            c = todo.pop()
            classes[c.__name__] = c
            todo += c.__subclasses__()
        if found.group(1) in classes:
            return classes[found.group(1)](found.group(2))
    return e
