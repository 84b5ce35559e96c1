"""Waiting for (or on the absence of) one device's events on a client.

The client queues notifications as they arrive; these pick the first of a
given name for a given device without blocking, until one comes, or assert
that none is queued."""

from .client import ClientError
from .procs import wait_until
from .testing import check


def poll_event(c, name, device):
    """The first queued event `name` for `device`, or None (never blocks)."""
    try:
        return c.wait_event(lambda e: e.get("event") == name and e.get("device") == device, 0)
    except ClientError:
        if c.closed:
            raise
        return None


def wait_event(c, name, device, timeout=10.0):
    """The first event `name` for `device`, waiting up to `timeout` seconds."""
    return wait_until(lambda: poll_event(c, name, device), timeout, interval=0.002,
                      what="%s for %s" % (name, device))


def no_event(c, name, device):
    check(poll_event(c, name, device) is None, "no further %s event for %s" % (name, device))
