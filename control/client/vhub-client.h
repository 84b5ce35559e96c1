/* SPDX-License-Identifier: MIT */
/*
 * vhub-client: a small, blocking client for vhubd's control API
 * (docs/control-api.md, "Framing").
 *
 * One object per connection; not thread-safe (use one per thread, or lock).
 *
 * Framing, as the contract says: every message is one compact JSON line
 * ending in '\n'.  A request carrying fds says "fds": N at top level and the
 * fds travel as SCM_RIGHTS attached to the first byte of that line.  Incoming
 * fds are received with MSG_CMSG_CLOEXEC and queued in arrival order; each
 * incoming message takes its declared N from the front of that queue.
 *
 * Responses may arrive in any order and notifications anywhere in between:
 * whatever is read while waiting for one thing is queued, so
 * vhub_client_wait_response() and vhub_client_next_event() can be called in
 * any order.  Queues are bounded (VHUB_CLIENT_MAX_*); a peer that exceeds a
 * bound breaks the connection (-ENOBUFS) rather than growing memory.
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

#include "vhub-json.h"

struct vhub_client;

/* Limits: a misbehaving daemon can not make the client grow without bound. */
#define VHUB_CLIENT_MAX_FDS_PER_MESSAGE 253        /* the kernel's SCM_MAX_FD */
#define VHUB_CLIENT_MAX_LINE (64u * 1024 * 1024)   /* one incoming JSON line */
#define VHUB_CLIENT_MAX_QUEUED_FDS 1024u           /* received, not yet claimed */
#define VHUB_CLIENT_MAX_QUEUED_MESSAGES 65536u     /* responses + events queued */

/* Error codes (VHUB_ERR_NO_VM, ...), event names and the API version: the
 * contract's vocabulary, shared with the daemon. */
#include "vhub-contract.h"

/* A JSON-RPC error object, flattened.  Strings are truncated to fit and
 * always NUL-terminated; absent members are "". */
struct vhub_client_error {
        int code;               /* error.code */
        char message[256];      /* error.message */
        char detail[512];       /* error.data.detail */
        char device[80];        /* error.data.device (-32006/-32007) */
        char request[64];       /* error.data.request (-32006/-32007) */
};

/* The contract's message for an error code ("no such VM", ...), or NULL if
 * unknown: vhub_contract_error_message(). */
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

/* Closes the socket, every queued fd and message.  NULL-safe; returns NULL. */
struct vhub_client *vhub_client_free(struct vhub_client *c);

/* The socket, for poll(POLLIN) in an event loop: when it is readable, call
 * vhub_client_next_event(c, 0, ...) / vhub_client_wait_response(c, id, 0, ...). */
int vhub_client_fd(const struct vhub_client *c);

/* 0 while usable, else the sticky -errno that broke the connection. */
int vhub_client_get_error(const struct vhub_client *c);

/*
 * Send one request: {"jsonrpc":"2.0","id":N,"method":...,"params":...}
 * plus "fds": n_fds when n_fds > 0.  params is stolen (also on failure);
 * NULL omits "params".  fds are not closed: the caller keeps its copies (the
 * kernel duplicates them into the message).  Blocks until the whole line is
 * written, reading and queueing incoming messages meanwhile so that neither
 * side can deadlock on full socket buffers.  *ret_id (may be NULL) gets the
 * request id for vhub_client_wait_response().
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
 * id that was never sent.
 */
int vhub_client_wait_response(struct vhub_client *c, uint64_t id, int timeout_ms,
                              json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                              struct vhub_client_error *ret_err);

/* Forget request id: its response is dropped (fds closed) now or when it
 * arrives. */
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
 * untouched); -errno when broken and nothing is queued.
 */
int vhub_client_next_event(struct vhub_client *c, int timeout_ms, json_t **ret_event,
                           int **ret_fds, unsigned *ret_n_fds);

/* How many responses and notifications are queued, not yet fetched. */
unsigned vhub_client_queued_responses(const struct vhub_client *c);
unsigned vhub_client_queued_events(const struct vhub_client *c);

/* Close n fds and free the array (NULL-safe); for ret_fds arrays. */
void vhub_client_close_fds(int *fds, unsigned n);

/* u64 and base64 helpers: vhub-json.h (shared with the daemon). */
