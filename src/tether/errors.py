"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import errno


class TetherError(Exception):
    """A mistake in the user's input (a path, a spec, a config value): never a traceback."""


# failed writes the user can fix (full disk, quota, read-only, permissions, I/O): one line, and
# never a traceback, wherever they surface
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
