"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class TetherError(Exception):
    """A mistake in the user's input (a path, a spec, a config value): never a traceback."""
