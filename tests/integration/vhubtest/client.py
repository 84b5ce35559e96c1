"""The tests' control client: the project's own Python package (python/vhub).

The tests import it from the source tree, never an installed copy, so that
they check the package they ship with: meson puts python/ on PYTHONPATH, and
running a test by hand (PYTHONPATH=tests/integration) finds it here.
"""

import os
import sys

_SRC_PY = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "..", "..", "..", "python"))
if _SRC_PY not in [os.path.abspath(p) for p in sys.path]:
    sys.path.insert(0, _SRC_PY)

from vhub.client import Client, Pending, Response, default_socket_path  # noqa: E402
from vhub.errors import *                                            # noqa: E402,F401,F403
from vhub.errors import __all__ as _errors_all                       # noqa: E402
from vhub.framing import (MAX_FDS_PER_MSG, U53, Event, encode, request_line,  # noqa: E402
                          u64, u64_json)

__all__ = (["Client", "Pending", "Response", "Event", "default_socket_path", "MAX_FDS_PER_MSG",
            "U53", "encode", "u64", "u64_json"] + list(_errors_all))
