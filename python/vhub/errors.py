# SPDX-License-Identifier: MIT
"""Errors of the vhub control API, and their codes.

The codes and their messages (CODE_NAMES: the error.message the daemon
sends) are the contract's, as vhub-contract.h defines them for the daemon
and the C library; the package keeps its own copy so that it needs nothing
but the standard library.  The project's tests check that the two agree
(tests/integration/test_discover.py).

Two families:

- RpcError: the daemon answered a request with a JSON-RPC error.  It carries
  the contract's ``code``, ``message`` and ``data`` (``{"detail": ...}``, for
  back-end errors also ``device`` and ``request``) and the fds the response
  carried, if any.  Each contract code has its own subclass (NoSuchVM,
  BackendTimeout, ...), so callers can catch by kind or test ``e.code``.
- ClientError: the transport failed: the connection closed (ConnectionClosed),
  the daemon broke the framing (ProtocolError, which also closes the
  connection), or a call timed out on our side (Timeout).
"""

# Standard JSON-RPC codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# The contract's own ("Errors")
NO_SUCH_VM = -32001
NO_SUCH_DEVICE = -32002
ALREADY_EXISTS = -32003
WRONG_STATE = -32004
NOT_SUPPORTED = -32005
BACKEND_ERROR = -32006
BACKEND_TIMEOUT = -32007
LIMIT_REACHED = -32008
BAD_REGION = -32009
BACKEND_NOT_ALLOWED = -32010
DAEMON_RESTARTED = -32011

CODE_NAMES = {
    PARSE_ERROR: "parse error",
    INVALID_REQUEST: "invalid request",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params",
    INTERNAL_ERROR: "internal error",
    NO_SUCH_VM: "no such VM",
    NO_SUCH_DEVICE: "no such device",
    ALREADY_EXISTS: "already exists",
    WRONG_STATE: "wrong state for this call",
    NOT_SUPPORTED: "not supported by the back-end",
    BACKEND_ERROR: "back-end error",
    BACKEND_TIMEOUT: "timed out waiting for the back-end",
    LIMIT_REACHED: "resource limit reached",
    BAD_REGION: "bad memory region",
    BACKEND_NOT_ALLOWED: "back-end not allowed",
    DAEMON_RESTARTED: "the daemon restarted during this request",
}


class VhubError(Exception):
    """Base of every exception this package raises."""


class ClientError(VhubError):
    """Transport trouble: closed connection, timeout, malformed message."""


class ConnectionClosed(ClientError):
    """The connection is gone (the daemon closed it, or it broke)."""


class ProtocolError(ConnectionClosed):
    """The daemon broke the framing (bad JSON, fds it declared but did not
    send, fds with no message, an oversized line).  The connection is closed
    and every fd queued on it with it."""


class Timeout(ClientError, TimeoutError):
    """No answer within the call's timeout.  The request is forgotten: a late
    response is dropped and the fds it carries are closed."""


_BY_CODE = {}


class RpcError(VhubError):
    """An error response: ``code``, ``message``, ``data`` (dict or None) and
    ``fds`` (fds that came with it, yours to close; normally none)."""

    code_value = None     # set on the per-code subclasses

    def __init__(self, code, message, data=None, fds=()):
        self.code = code
        self.message = message
        self.data = data
        self.fds = list(fds)
        super().__init__("%s: %s%s" % (code, message, " %s" % _dump(data) if data else ""))

    @property
    def detail(self):
        """error.data.detail, the daemon's sentence about what went wrong."""
        return self.data.get("detail") if isinstance(self.data, dict) else None

    @property
    def name(self):
        """The contract's name of the code ("no such VM"), or None."""
        return CODE_NAMES.get(self.code)

    @staticmethod
    def from_error(error, fds=()):
        """The RpcError (subclass) for a JSON-RPC error object."""
        if not isinstance(error, dict):
            return RpcError(INTERNAL_ERROR, "malformed error object: %r" % (error,), None, fds)
        code = error.get("code")
        cls = _BY_CODE.get(code, RpcError) if isinstance(code, int) else RpcError
        return cls(code, error.get("message"), error.get("data"), fds)


def _dump(data):
    import json
    return json.dumps(data)


def _subclass(name, code, doc):
    cls = type(name, (RpcError,), {"__doc__": doc, "code_value": code})
    _BY_CODE[code] = cls
    return cls


ParseError = _subclass("ParseError", PARSE_ERROR, "-32700: the daemon could not parse a line.")
InvalidRequest = _subclass("InvalidRequest", INVALID_REQUEST, "-32600: not a valid request.")
MethodNotFound = _subclass("MethodNotFound", METHOD_NOT_FOUND, "-32601: no such method.")
InvalidParams = _subclass("InvalidParams", INVALID_PARAMS, "-32602: a param is missing, "
                          "malformed or unknown.")
InternalError = _subclass("InternalError", INTERNAL_ERROR, "-32603: the daemon failed itself.")
NoSuchVM = _subclass("NoSuchVM", NO_SUCH_VM, "-32001: no such VM (or not yours).")
NoSuchDevice = _subclass("NoSuchDevice", NO_SUCH_DEVICE, "-32002: no such device.")
AlreadyExists = _subclass("AlreadyExists", ALREADY_EXISTS, "-32003: already exists.")
WrongState = _subclass("WrongState", WRONG_STATE, "-32004: wrong state for this call.")
NotSupported = _subclass("NotSupported", NOT_SUPPORTED, "-32005: the back-end does not "
                         "support this.")
BackendError = _subclass("BackendError", BACKEND_ERROR, "-32006: the back-end failed, closed "
                         "or violated the protocol (data: device, request).")
BackendTimeout = _subclass("BackendTimeout", BACKEND_TIMEOUT, "-32007: the back-end did not "
                           "answer in time (data: device, request).")
LimitReached = _subclass("LimitReached", LIMIT_REACHED, "-32008: a resource limit was reached.")
BadRegion = _subclass("BadRegion", BAD_REGION, "-32009: bad memory region.")
BackendNotAllowed = _subclass("BackendNotAllowed", BACKEND_NOT_ALLOWED, "-32010: back-end "
                              "path or owner not allowed.")
DaemonRestarted = _subclass("DaemonRestarted", DAEMON_RESTARTED, "-32011: the daemon restarted "
                            "while the request was in flight; check with the *.list methods.")

CODES = sorted(CODE_NAMES)

__all__ = (["VhubError", "ClientError", "ConnectionClosed", "ProtocolError", "Timeout",
            "RpcError", "CODE_NAMES", "CODES"]
           + [c.__name__ for c in _BY_CODE.values()]
           + [k for k in list(globals()) if k.isupper() and not k.startswith("_")
              and k not in ("CODE_NAMES", "CODES")])
