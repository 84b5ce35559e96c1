/* SPDX-License-Identifier: MIT */
/*
 * What vhub-client.c (connection, JSON-RPC messages, blocking calls) and
 * vhub-client-async.c (calls and events in the caller's event loop) share.
 */
#pragma once

#include "vhub/vhub-client.h"
#include "vhub-frame.h"     /* the framing, shared with the daemon (control/) */

_Static_assert(VHUB_CLIENT_MAX_FDS_PER_MESSAGE == VHUB_FRAME_MAX_FDS, "fds per message");

#define CLIENT_ABANDONED_MAX 1024u /* ids whose answers are dropped on arrival */

/* One received message with the fds it took from the fd queue. */
struct client_msg {
        struct client_msg *next;
        json_t *msg;
        int *fds;
        unsigned n_fds;
        uint64_t id;            /* responses only */
};

struct client_msg_queue {
        struct client_msg *head, *tail;
        unsigned n;
};

/* An asynchronous call waiting for its response.  The response is kept
 * with the call, not in the responses queue: finding the answered calls
 * costs one walk of the calls, whatever the daemon sends. */
struct client_async_call {
        struct client_async_call *next;
        uint64_t id;
        int64_t deadline;       /* CLOCK_MONOTONIC ms, -1: none */
        struct client_msg *reply; /* its response, once read */
        vhub_client_reply_fn cb;
        void *userdata;
        char method[];
};

struct vhub_client {
        int fd;
        int error;              /* sticky -errno once broken */
        uint64_t next_id;

        struct vhub_frame_in in;        /* lines up to VHUB_CLIENT_MAX_LINE, fds
                                         * up to VHUB_CLIENT_MAX_QUEUED_FDS */
        struct vhub_frame_out out;      /* a line per chunk: one can be taken back */

        struct client_msg_queue responses, events;

        bool has_proto_err;     /* an "id": null error broke the connection */
        struct vhub_client_error proto_err;

        uint64_t abandoned[CLIENT_ABANDONED_MAX];
        unsigned n_abandoned;

        struct client_async_call *calls;        /* in the order they were made */
        unsigned n_calls;
        vhub_client_event_fn event_fn;
        void *event_userdata;
};

int64_t client_now_ms(void);

/* The connection is unusable from now on: remember why, drop unclaimed fds
 * and unsent output.  Queued messages stay fetchable.  Returns the error. */
int client_break(struct vhub_client *c, int error);

/* Read once (non-blocking) and queue what arrived: bytes read (> 0), 0 if
 * nothing was there, or the sticky error once broken. */
int client_read_once(struct vhub_client *c);

/* Build and queue one request line; *ret_id and *ret_seq get its id and
 * output sequence number.  params is stolen. */
int client_queue_request(struct vhub_client *c, const char *method, json_t *params,
                         const int *fds, unsigned n_fds, uint64_t *ret_id, uint64_t *ret_seq);

/* Write what the socket takes now: 0 all out, 1 some left, or the sticky
 * error (the connection broke). */
int client_flush(struct vhub_client *c);

struct client_msg *client_msg_free(struct client_msg *m);
struct client_msg *client_msg_queue_take(struct client_msg_queue *q, bool by_id, uint64_t id);
void client_error_from_json(const json_t *error, struct vhub_client_error *ret);

/* vhub-client-async.c: the asynchronous call with that id (NULL if there
 * is none), unlinked by client_async_take(). */
struct client_async_call *client_async_find(const struct vhub_client *c, uint64_t id);
struct client_async_call *client_async_take(struct vhub_client *c, uint64_t id);
struct client_async_call *client_async_free(struct client_async_call *a);
void client_async_free_all(struct vhub_client *c);
