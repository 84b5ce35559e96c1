# SPDX-License-Identifier: MIT
"""vhub: Python client for vhubd's control API (stdlib only).

    vhub.Client          blocking client (vhub.client)
    vhub.aio.connect()   asyncio client (vhub.aio)
    vhub.errors          RpcError and its per-code subclasses, transport
                         errors, the contract's error codes
    vhub.framing         the line + fd framing, u64()/u64_json()

The control API itself is described in the vhub documentation
(control-api.md).
"""

from . import errors, framing
from .client import Client, Pending, Response, default_socket_path
from .errors import *  # noqa: F401,F403 (the codes and exception classes)
from .errors import __all__ as _errors_all
from .framing import Event, u64, u64_json

__all__ = (["Client", "Pending", "Response", "Event", "default_socket_path", "u64", "u64_json",
            "errors", "framing"] + list(_errors_all))
