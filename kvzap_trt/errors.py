"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class KvzapError(Exception):
    """Bad input or an unusable resource, explained in one line for the user."""


class CacheFullError(KvzapError):
    """The block pool cannot hold what a step needs."""


# Machine-readable reasons a request failed, as the serving doors report them (OpenAI's `code`;
# Triton's error kind): the pool cannot hold the request (the client may shorten it), or a fault
# of the server (HTTP 500). Other failures are the request's own (HTTP 400, no code).
KV_POOL_EXHAUSTED = "kv_pool_exhausted"
INTERNAL_ERROR = "internal_error"


def error_code(e: BaseException) -> str | None:
    """The reason code of a request that failed with `e`: KV_POOL_EXHAUSTED for CacheFullError,
    None for another KvzapError (bad input), INTERNAL_ERROR for anything else (a bug)."""
    if isinstance(e, CacheFullError):
        return KV_POOL_EXHAUSTED
    return None if isinstance(e, KvzapError) else INTERNAL_ERROR
