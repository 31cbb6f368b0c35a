"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class KvzapError(Exception):
    """Bad input or an unusable resource, explained in one line for the user."""


class CacheFullError(KvzapError):
    """The block pool cannot hold what a step needs."""
