"""er_ray's errors: each is written to be read by a person (what is wrong, where, and how to fix it)."""


class ErRayError(Exception):
    """Base of every error er_ray raises on purpose; the CLI prints these without a traceback."""


class OptionsError(ErRayError, ValueError):
    """An option value that cannot work."""
