"""Local directories for Hugging Face Hub ids: the Hub when reachable, else the local cache."""

from __future__ import annotations

from pathlib import Path

from kvzap_trt.errors import KvzapError


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` that is not an existing path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not Path(spec).exists() and not spec.startswith((".", "~"))


def hub_snapshot(repo_id: str, allow_patterns: list[str], what: str) -> Path:
    """Directory holding `allow_patterns` of `repo_id`; the local cache is used when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as online_error:  # noqa: BLE001 - any Hub failure falls back to the cache
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            reason = str(online_error).splitlines()[0] if str(online_error) else type(online_error).__name__
            raise KvzapError(
                f"{what} {repo_id!r} is neither reachable on the Hugging Face Hub nor in the local cache ({reason})"
            ) from None
