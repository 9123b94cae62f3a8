"""Bounds and error classes for every request this project sends to the Hugging Face Hub.

huggingface_hub 2.x sends its HTTP through one shared `httpx2.Client` whose default timeout is None: downloads pass
their own (`HF_HUB_ETAG_TIMEOUT`, `HF_HUB_DOWNLOAD_TIMEOUT`, 10 s), but `create_repo`, the pre-upload and the commit
calls of an upload do not, so a server that accepts the connection and never answers makes them wait forever.
`bound_hub_requests` installs (through `huggingface_hub.set_client_factory`, the library's documented hook) a
client with the library's own request hooks and redirect handling plus connect / read / write timeouts; a request
that passes its own timeout keeps it.

`is_permanent_error` tells the errors that a retry cannot fix (an invalid repo id, 400/401/403/404/422 answers)
from transient ones (connection refused or reset, timeouts, 408/429/5xx), and `describe_hub_error` says either in
one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# huggingface_hub and httpx2 are imported where used: `selfpatch-push --help` reads the defaults below without them.
if TYPE_CHECKING:
    import httpx2

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0  # seconds without a byte from the server (or without progress sending to it)
TRANSIENT_STATUS_CODES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})  # 409: "conflicting operation"

_bounds: httpx2.Timeout | None = None
# The library's own client settings (its request hook, redirects), read from its first session: a bounded client is
# that client with timeouts, and unbinding builds it again without them.
_library_client: dict | None = None


def _client_settings() -> dict:
    global _library_client
    if _library_client is None:
        from huggingface_hub import get_session

        session = get_session()
        _library_client = {
            "event_hooks": {name: list(hooks) for name, hooks in session.event_hooks.items()},
            "follow_redirects": session.follow_redirects,
        }
    return _library_client


def bound_hub_requests(
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, read_timeout: float = DEFAULT_READ_TIMEOUT
) -> None:
    """Gives every request of huggingface_hub in this process a connect timeout and a read/write timeout (seconds
    without progress, not a limit on a long transfer). Replaces the shared client; call it before uploading."""
    import httpx2
    from huggingface_hub import set_client_factory

    global _bounds
    if not connect_timeout > 0 or not read_timeout > 0:
        raise ValueError(f"Hub timeouts must be > 0 seconds, got {connect_timeout} and {read_timeout}.")
    settings = _client_settings()
    _bounds = httpx2.Timeout(read_timeout, connect=connect_timeout)
    bounds = _bounds
    set_client_factory(lambda: httpx2.Client(timeout=bounds, **settings))


def unbound_hub_requests() -> None:
    """Restores huggingface_hub's own client settings (no timeouts on uploads): undoes `bound_hub_requests`."""
    import httpx2
    from huggingface_hub import set_client_factory

    global _bounds
    settings = _client_settings()
    _bounds = None
    set_client_factory(lambda: httpx2.Client(timeout=None, **settings))


def check_repo_id(repo_id: str | None, option: str = "repo id") -> str:
    """Returns `repo_id` if it is a valid Hub model id (`name` or `namespace/name`), else raises a ValueError that
    names `option` and the expected form."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{option} {repo_id!r} is not a valid Hub repository id: use `namespace/name` (letters, digits, '-', "
            f"'_', '.'; at most 96 characters), e.g. your-name/selfpatch-vit-small ({error})."
        ) from None
    return repo_id


def status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_permanent_error(error: BaseException) -> bool:
    """True when repeating the same request cannot succeed (bad repo id or token, no permission, repo not found,
    a request the Hub rejects as invalid); False for network failures, timeouts and overloaded servers."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if isinstance(error, httpx2.TransportError):  # refused, reset, timed out: the next attempt may work
        return False
    if isinstance(error, HfHubHTTPError):
        code = status_code(error)
        return code is not None and code not in TRANSIENT_STATUS_CODES and 400 <= code < 500
    # invalid ids and arguments, missing local files: the same call fails the same way
    return isinstance(error, (HFValidationError, ValueError, FileNotFoundError, PermissionError))


def describe_hub_error(error: BaseException, endpoint: str | None = None, action: str = "request") -> str:
    """One line saying what went wrong with a Hub request (no traceback, no multi-line server dump); `action` names
    what was refused ("the Hub refused the upload (HTTP 401): ...")."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    where = endpoint or constants.ENDPOINT
    if isinstance(error, httpx2.ConnectTimeout):
        return f"cannot connect to the Hub at {where}: no answer within {_seconds(error, 'connect')}"
    if isinstance(error, httpx2.TimeoutException):
        return f"the Hub at {where} stopped answering (no data within {_seconds(error, 'read')})"
    if isinstance(error, httpx2.ConnectError):
        return f"cannot connect to the Hub at {where} ({_first_line(error) or 'connection refused'})"
    if isinstance(error, httpx2.TransportError):
        return f"the connection to the Hub at {where} failed ({type(error).__name__}: {_first_line(error)})"
    if isinstance(error, HfHubHTTPError):
        code = status_code(error)
        detail = error.server_message or _first_line(error)
        return f"the Hub refused the {action} (HTTP {code}): {detail.strip()}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _seconds(error: BaseException, kind: str) -> str:
    value = getattr(_bounds, kind, None) if _bounds is not None else None
    return f"{value:g} s" if value is not None else "the timeout"


__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "bound_hub_requests",
    "check_repo_id",
    "describe_hub_error",
    "is_permanent_error",
    "unbound_hub_requests",
]
