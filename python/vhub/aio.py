# SPDX-License-Identifier: MIT
"""asyncio client for vhubd's control socket.

    import asyncio, vhub.aio

    async def main():
        async with await vhub.aio.connect() as c:
            await c.call("vm.create", {"vm": "vm0"})
            await c.call("vm.memory.add", {"vm": "vm0", "gpa": 0, "size": n, "fd": 0},
                         fds=[memfd], timeout=5)
            res, fds = await c.call_fds("vm.dirty_log.start", {"vm": "vm0"})
            async for ev in c.events():
                print(ev.name, ev)

The socket is read with loop.add_reader() and recvmsg() (fds with
MSG_CMSG_CLOEXEC), written with sendmsg() (fds as SCM_RIGHTS on the first
byte of their line) and loop.add_writer() while the kernel buffer is full;
framing is vhub.framing's, the same as the blocking client's.  Responses
resolve their call by id, whatever the order; events queue (bounded) for
events()/next_event().

fds: those you pass stay yours (the client sends copies it dup()s at once,
so you may close yours as soon as call() returns or is cancelled).  Those you
receive (call_fds, RpcError.fds, Event.fds) are yours to close.  A call that
times out or is cancelled is forgotten: its late response is dropped and its
fds closed.  Errors: vhub.errors.
"""

import array
import asyncio
import collections
import itertools
import os
import socket

from . import framing
from .client import default_socket_path
from .errors import ConnectionClosed, ProtocolError, RpcError, Timeout

MAX_QUEUED_EVENTS = 65536


async def connect(path=None, *, timeout=10.0):
    """Connect to the control socket (None: vhub.client.default_socket_path());
    timeout is the default per-call timeout in seconds (None: none)."""
    path = default_socket_path() if path is None else path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return Client(sock, timeout=timeout)


class Client:
    """One connection; create with connect() or Client(sock) from a connected
    AF_UNIX stream socket (the client takes it over).  Use from one event loop."""

    def __init__(self, sock, *, timeout=10.0):
        self._loop = asyncio.get_running_loop()
        self.sock = sock
        sock.setblocking(False)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._decoder = framing.Decoder()
        self._pending = {}               # id -> Future of (msg, fds)
        self._events = collections.deque()
        self._event_waiters = []         # futures woken when an event or the close arrives
        self._null = collections.deque()  # id-null errors: the daemon refusing our framing
        self._out = collections.deque()  # [bytearray, fds still to attach (our dups)]
        self._writing = False
        self.closed = False
        self.close_reason = None
        self._close_exc = None           # what pending calls and iterators raise
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # ---- calls ----
    async def call(self, method, params=None, fds=(), *, timeout=None):
        """The result, or RpcError (fds a response carries are closed)."""
        res, rfds = await self.call_fds(method, params, fds, timeout=timeout)
        framing.close_fds(rfds)
        return res

    async def call_fds(self, method, params=None, fds=(), *, timeout=None):
        """(result, fds the response carried, yours to close)."""
        req_id, fut = self.request(method, params, fds)
        timeout = self.timeout if timeout is None else timeout
        try:
            msg, rfds = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            self._abandon(req_id, fut)
            raise Timeout("no response to %s (id %d) within %.3fs" % (method, req_id, timeout)) \
                from None
        except asyncio.CancelledError:
            self._abandon(req_id, fut)
            raise
        if "error" in msg:
            raise RpcError.from_error(msg["error"], rfds)
        return msg.get("result"), rfds

    def request(self, method, params=None, fds=()):
        """Send a request now: (id, future of (message, fds)).  Most callers
        want call()/call_fds()."""
        if self.closed:
            raise self._closed_error()
        req_id = next(self._ids)
        line = framing.request_line(req_id, method, params, len(fds))
        fut = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            self._queue(line, fds)
        except BaseException:
            del self._pending[req_id]
            raise
        return req_id, fut

    def _abandon(self, req_id, fut):
        self._pending.pop(req_id, None)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            framing.close_fds(fut.result()[1])
        else:
            fut.cancel()

    # ---- events ----
    async def _take_queued(self, queue, timeout, what):
        """The first of queue (events or id-null errors), waiting up to
        timeout seconds (None: forever) for one.  Raises ConnectionClosed once
        the connection is gone and nothing is queued."""
        while not queue:
            if self.closed:
                raise self._closed_error()
            w = self._loop.create_future()
            self._event_waiters.append(w)
            try:
                await asyncio.wait_for(w, timeout)
            except asyncio.TimeoutError:
                raise Timeout("no %s within %.3fs" % (what, timeout)) from None
            finally:
                if w in self._event_waiters:
                    self._event_waiters.remove(w)
        return queue.popleft()

    async def next_event(self, *, timeout=None):
        """The next event (an Event), waiting up to timeout seconds (None:
        forever).  Raises ConnectionClosed once the connection is gone and
        nothing is queued."""
        return await self._take_queued(self._events, timeout, "event")

    async def events(self, predicate=None):
        """Async iterator over events in arrival order (those matching
        predicate; others are dropped and their fds closed).  Ends when you
        close() the client; raises ConnectionClosed if the daemon closes or
        breaks the connection."""
        while True:
            try:
                ev = await self.next_event()
            except ConnectionClosed:
                if self._close_exc is None:
                    return          # closed by us
                raise
            if predicate is None or predicate(ev):
                yield ev
            else:
                framing.close_fds(ev.fds)

    async def wait_null_response(self, *, timeout=None):
        """The next id-null error response (the daemon refusing our framing)."""
        return await self._take_queued(self._null, self.timeout if timeout is None else timeout,
                                       "id-null response")

    # ---- output ----
    def _queue(self, data, fds):
        # Our own copies: the line may leave after the caller closed theirs.
        own = []
        try:
            for fd in fds:
                own.append(os.dup(fd))
        except BaseException:
            framing.close_fds(own)
            raise
        self._out.append([bytearray(data), own])
        self._flush()

    def _flush(self):
        while self._out:
            buf, fds = self._out[0]
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    n = self.sock.sendmsg([buf], anc, socket.MSG_NOSIGNAL)
                else:
                    n = self.sock.send(buf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._shutdown("send failed: %s" % e, ConnectionClosed)
                return
            if fds:
                # the kernel has its copies with the first byte
                framing.close_fds(fds)
                self._out[0][1] = []
            del buf[:n]
            if not buf:
                self._out.popleft()
        want = bool(self._out)
        if want and not self._writing:
            self._loop.add_writer(self.sock.fileno(), self._flush)
        elif not want and self._writing:
            self._loop.remove_writer(self.sock.fileno())
        self._writing = want

    # ---- input ----
    def _on_readable(self):
        for _ in range(64):     # bounded: let the loop breathe between bursts
            try:
                data, anc, flags, _ = self.sock.recvmsg(framing.RECV_SIZE, framing.ANC_SIZE,
                                                        socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._shutdown("receive failed: %s" % e, ConnectionClosed)
                return
            fds = framing.fds_from_ancdata(anc)
            if flags & socket.MSG_CTRUNC:
                framing.close_fds(fds)
                self._shutdown("fds lost: control data truncated (MSG_CTRUNC)", ProtocolError)
                return
            if not data:
                framing.close_fds(fds)
                self._shutdown("EOF", ConnectionClosed)
                return
            try:
                msgs = self._decoder.feed(data, fds)
            except ProtocolError as e:
                self._shutdown(str(e), ProtocolError)
                return
            for msg, mfds in msgs:
                self._dispatch(msg, mfds)
            if self.closed:
                return

    def _dispatch(self, msg, fds):
        kind = framing.classify(msg)
        if kind == "response":
            fut = self._pending.pop(msg["id"], None)
            if fut is None or fut.done():
                framing.close_fds(fds)       # abandoned, or never ours
            else:
                fut.set_result((msg, fds))
            return
        if kind == "event":
            if len(self._events) >= MAX_QUEUED_EVENTS:
                framing.close_fds(fds)
                self._shutdown("more than %d events queued and not read" % MAX_QUEUED_EVENTS,
                               ConnectionClosed)
                return
            self._events.append(framing.make_event(msg, fds))
        elif kind == "null":
            framing.close_fds(fds)
            if len(self._null) >= MAX_QUEUED_EVENTS:
                self._shutdown("more than %d id-null errors queued" % MAX_QUEUED_EVENTS,
                               ProtocolError)
                return
            self._null.append(msg.get("error"))
        else:
            framing.close_fds(fds)
            return
        self._wake()

    def _wake(self):
        for w in self._event_waiters:
            if not w.done():
                w.set_result(None)

    # ---- closing ----
    def _closed_error(self):
        if self._close_exc is not None:
            return self._close_exc("connection closed: %s" % self.close_reason)
        return ConnectionClosed("connection closed (by the client)")

    def _shutdown(self, reason, exc_class):
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._close_exc = exc_class
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False
        for _, fds in self._out:
            framing.close_fds(fds)
        self._out.clear()
        self._decoder.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._closed_error())
        self._wake()

    async def close(self):
        """Close the connection, every fd received and not handed out, and
        fail the calls still waiting with ConnectionClosed."""
        if not self.closed:
            self._shutdown("closed by the client", None)
        for ev in self._events:
            framing.close_fds(ev.fds)
        self._events.clear()
        self._null.clear()
        if self.sock.fileno() >= 0:
            self.sock.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
        return False


__all__ = ["connect", "Client", "MAX_QUEUED_EVENTS"]
