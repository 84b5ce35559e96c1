/* SPDX-License-Identifier: MIT */
/*
 * libvhub-client: the C client library of vhubd's control API
 * (reference: docs/client-library.md; the API itself: control-api.md).
 *
 *     #include <vhub/vhub-client.h>      pkg-config --cflags --libs vhub-client
 *
 * One object per connection; not thread-safe (use one per thread, or lock).
 * Two ways to use it, which can be mixed on one connection:
 *
 * - Blocking: vhub_client_call() sends a request and waits for its response
 *   (with a timeout); vhub_client_next_event() waits for a notification.
 * - In the caller's event loop: watch vhub_client_get_fd() for
 *   vhub_client_get_events() (POLLIN, plus POLLOUT while output is queued)
 *   with the timeout vhub_client_get_timeout_ms() says, and call
 *   vhub_client_dispatch() whenever it fires.  vhub_client_call_async()
 *   queues a request and returns at once; its callback runs from
 *   vhub_client_dispatch() with the result, an error response, or a local
 *   failure (timeout, connection lost).  Events go to the handler set with
 *   vhub_client_set_event_handler(), also from vhub_client_dispatch().
 *   Nothing in this mode blocks.
 *
 * Framing, as the contract says: every message is one compact JSON line
 * ending in '\n'.  A request carrying fds says "fds": N at top level and the
 * fds travel as SCM_RIGHTS attached to the first byte of that line.  Incoming
 * fds are received with MSG_CMSG_CLOEXEC and queued in arrival order; each
 * incoming message takes its declared N from the front of that queue.  A
 * daemon that breaks these rules breaks the connection (-EBADMSG).
 *
 * Responses may arrive in any order and notifications anywhere in between:
 * whatever is read while waiting for one thing is queued.  Queues are
 * bounded (VHUB_CLIENT_MAX_*); a peer that exceeds a bound breaks the
 * connection (-ENOBUFS) rather than growing memory.
 *
 * fds: those you pass are not closed: the library sends its own dup()s, so
 * you may close yours as soon as the call returns.  Those you receive are
 * yours to close (vhub_client_close_fds()), except in callbacks (below).
 *
 * Conventions: functions return 0 (or a positive value where documented) on
 * success and -errno on failure; ret_* output parameters are only written on
 * success, with one exception: a JSON-RPC error response returns
 * -EREMOTEIO and fills *ret_err.  Once the connection is broken (peer closed,
 * I/O error, framing violation) every call returns the same sticky error,
 * but responses and events already queued can still be fetched.
 *
 * Timeouts are in milliseconds; -1 waits forever, 0 does not wait at all
 * (but still reads whatever the socket already holds).
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The contract's vocabulary, installed beside this header and the same one
 * the daemon is built with: error codes (enum vhub_err_code: VHUB_ERR_NO_VM,
 * ...) and their messages, event names (VHUB_EV_*), VHUB_API_VERSION. */
#include "vhub-contract.h"
/* The contract's JSON conventions: u64 members and base64. */
#include "vhub-json.h"

#ifdef __cplusplus
extern "C" {
#endif

struct vhub_client;

/* Limits: a misbehaving daemon can not make the client grow without bound. */
#define VHUB_CLIENT_MAX_FDS_PER_MESSAGE 253        /* the kernel's SCM_MAX_FD */
#define VHUB_CLIENT_MAX_LINE (64u * 1024 * 1024)   /* one incoming JSON line */
#define VHUB_CLIENT_MAX_QUEUED_FDS 1024u           /* received, not yet claimed */
#define VHUB_CLIENT_MAX_QUEUED_MESSAGES 65536u     /* responses + events queued */
#define VHUB_CLIENT_MAX_PENDING_CALLS 4096u        /* vhub_client_call_async() in flight */

/* A JSON-RPC error object, flattened.  Strings are truncated to fit and
 * always NUL-terminated; absent members are "". */
struct vhub_client_error {
        int code;               /* error.code: an enum vhub_err_code */
        char message[256];      /* error.message */
        char detail[512];       /* error.data.detail */
        char device[80];        /* error.data.device (-32006/-32007) */
        char request[64];       /* error.data.request (-32006/-32007) */
};

/* The contract's message for an error code ("no such VM", ...), or NULL if
 * unknown: vhub_contract_error_message(), as a function of the library. */
const char *vhub_client_error_code_name(int code);

/*
 * The default control socket for a client: $VHUB_SOCKET if set and
 * non-empty; else /run/vhub/control.sock for root; else
 * $XDG_RUNTIME_DIR/vhub/control.sock; else (no XDG_RUNTIME_DIR) the system
 * daemon's /run/vhub/control.sock.  *ret_path is malloc()ed.
 */
int vhub_client_default_socket_path(char **ret_path);

/* Connect to path (NULL: vhub_client_default_socket_path()). */
int vhub_client_connect(const char *path, struct vhub_client **ret);

/* Wrap an already connected AF_UNIX stream socket; takes ownership of fd
 * (also on failure).  The fd is switched to non-blocking and CLOEXEC. */
int vhub_client_new_from_fd(int fd, struct vhub_client **ret);

/* Closes the socket, every queued fd and message; pending asynchronous
 * calls are dropped without their callbacks.  NULL-safe; returns NULL.
 * Not from a callback. */
struct vhub_client *vhub_client_free(struct vhub_client *c);

/* The socket, for the caller's event loop (see vhub_client_get_events()). */
int vhub_client_get_fd(const struct vhub_client *c);

/* 0 while usable, else the sticky -errno that broke the connection. */
int vhub_client_get_error(const struct vhub_client *c);

/* ---- blocking ---- */

/*
 * Send one request: {"jsonrpc":"2.0","id":N,"method":...,"params":...}
 * plus "fds": n_fds when n_fds > 0.  params is stolen (also on failure);
 * NULL omits "params".  Blocks until the whole line is written, reading
 * and queueing incoming messages meanwhile so that neither side can
 * deadlock on full socket buffers.  *ret_id (may be NULL) gets the request
 * id for vhub_client_wait_response().
 */
int vhub_client_send_request(struct vhub_client *c, const char *method, json_t *params,
                             const int *fds, unsigned n_fds, uint64_t *ret_id);

/*
 * Wait for the response with that id.  On a result: 0, *ret_result a new
 * reference (NULL: dropped), *ret_fds a malloc()ed array of the fds it
 * carried, owned by the caller, and *ret_n_fds their count (ret_fds NULL:
 * they are closed; no fds: *ret_fds = NULL, *ret_n_fds = 0).  On an error
 * response: -EREMOTEIO with *ret_err filled (ret_err may be NULL) and any
 * fds it carried closed.  -ETIMEDOUT leaves the response pending: it can
 * be waited for again, or dropped with vhub_client_abandon().
 * A JSON-RPC error with "id": null (the daemon refusing our framing) breaks
 * the connection: -EPROTO, with *ret_err filled from it.  -EINVAL for an
 * id that was never sent or belongs to an asynchronous call.
 */
int vhub_client_wait_response(struct vhub_client *c, uint64_t id, int timeout_ms,
                              json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                              struct vhub_client_error *ret_err);

/* Forget request id (blocking or asynchronous): its response is dropped
 * (fds closed) now or when it arrives; an asynchronous call's callback does
 * not run. */
void vhub_client_abandon(struct vhub_client *c, uint64_t id);

/*
 * send_request + wait_response.  timeout_ms bounds the whole call; on
 * timeout the request is abandoned.  Returns as vhub_client_wait_response().
 */
int vhub_client_call(struct vhub_client *c, const char *method, json_t *params,
                     const int *fds, unsigned n_fds, int timeout_ms,
                     json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                     struct vhub_client_error *ret_err);

/*
 * Next notification, in arrival order: 1 and *ret_event = the whole message
 * ({"jsonrpc","method":"event","params":{event, vm, ...}}, a new reference)
 * with the fds it carried in *ret_fds and *ret_n_fds (as for responses; ret_fds
 * NULL closes them); 0 if none arrived within timeout_ms (*ret_event
 * untouched); -errno when broken and nothing is queued.  With an event
 * handler set, events go to the handler instead and this finds none.
 */
int vhub_client_next_event(struct vhub_client *c, int timeout_ms, json_t **ret_event,
                           int **ret_fds, unsigned *ret_n_fds);

/* How many responses and notifications are queued, not yet fetched. */
unsigned vhub_client_queued_responses(const struct vhub_client *c);
unsigned vhub_client_queued_events(const struct vhub_client *c);

/* ---- in the caller's event loop ---- */

/*
 * What an asynchronous call ended with, for its callback.  status: 0 with
 * result; -EREMOTEIO with error (the daemon answered with an error);
 * -EPROTO with error (the daemon refused our framing); else a local failure
 * (-ETIMEDOUT: no answer within the call's timeout; the connection's sticky
 * error when it broke).  result and error are borrowed for the callback
 * (json_incref() to keep the result).  fds: what the response carried; to
 * keep one, copy it and set its slot to -1; the library closes the others
 * after the callback.
 */
struct vhub_client_reply {
        uint64_t id;
        const char *method;
        int status;
        json_t *result;
        const struct vhub_client_error *error;
        int *fds;
        unsigned n_fds;
};

typedef void (*vhub_client_reply_fn)(struct vhub_client *c, struct vhub_client_reply *reply,
                                     void *userdata);

/*
 * Queue a request and return at once; cb(c, reply, userdata) runs exactly
 * once, from vhub_client_dispatch(), unless the call is abandoned or the
 * client freed first.  params is stolen (also on failure); the fds are
 * dup()ed (yours stay yours).  timeout_ms bounds the wait for the answer
 * (-1: none).  *ret_id (may be NULL) gets the request id.  -ENOBUFS when
 * VHUB_CLIENT_MAX_PENDING_CALLS calls are in flight.
 */
int vhub_client_call_async(struct vhub_client *c, const char *method, json_t *params,
                           const int *fds, unsigned n_fds, int timeout_ms,
                           vhub_client_reply_fn cb, void *userdata, uint64_t *ret_id);

/*
 * An event, for the event handler.  name is params.event; params the
 * notification's params, borrowed for the callback; fds as for replies.
 */
struct vhub_client_event {
        const char *name;
        json_t *params;
        int *fds;
        unsigned n_fds;
};

typedef void (*vhub_client_event_fn)(struct vhub_client *c, struct vhub_client_event *event,
                                     void *userdata);

/* Deliver events to fn from vhub_client_dispatch() (NULL: queue them for
 * vhub_client_next_event() again).  Events already queued go to fn at the
 * next dispatch. */
void vhub_client_set_event_handler(struct vhub_client *c, vhub_client_event_fn fn,
                                   void *userdata);

/* The poll() events to wait for: POLLIN, plus POLLOUT while output is queued. */
short vhub_client_get_events(const struct vhub_client *c);

/* The poll() timeout to use: milliseconds until the next asynchronous
 * call's deadline, -1 if none has one, 0 if vhub_client_dispatch() has work
 * without reading (a call overdue; answers or events a blocking call read
 * into the queue, which leave the socket quiet). */
int vhub_client_get_timeout_ms(const struct vhub_client *c);

/*
 * Do what can be done without blocking: write queued output, read what the
 * socket holds, run the callbacks of answered and timed-out calls, and
 * deliver events to the handler.  Returns how many callbacks ran (>= 0), or
 * the sticky -errno once the connection is broken (after failing every
 * pending call through its callback): take the fd out of the loop and free
 * the client.  Callbacks may call vhub_client_call_async() and
 * vhub_client_abandon(), not vhub_client_free().
 */
int vhub_client_dispatch(struct vhub_client *c);

/* Close n fds and free the array (NULL-safe); for ret_fds arrays. */
void vhub_client_close_fds(int *fds, unsigned n);

/* u64 and base64 helpers: vhub-json.h (shared with the daemon). */

#ifdef __cplusplus
}
#endif
