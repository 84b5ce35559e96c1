/* SPDX-License-Identifier: MIT */
/*
 * Private to control/control-server*.c: the functions the server's files
 * share (control-server.c says which file holds what).
 */
#pragma once

#include <stdbool.h>

#include <event2/util.h>

#include "control-internal.h"

struct batch_run;
struct vhub_event;
struct vhub_owner;

/* control-server.c: connections, requests, answers, the server */
void cs_conn_send(struct control_conn *c, json_t *msg, const int *fds, unsigned n_fds);
void cs_conn_finish_if_answered(struct control_conn *c);
int cs_server_check_fds(struct control_server *s, uid_t uid, unsigned n, unsigned slack,
                        struct vhub_error *err);
unsigned cs_fd_slack(const struct control_server *s, uid_t uid);
void cs_handle_request(struct control_conn *c, json_t *msg, struct rpc_fds *fds,
                       struct control_batch *b, unsigned index);
unsigned cs_element_fds(json_t *e);

/* control-server-batch.c: batches in slices */
void cs_batch_run_abort(struct batch_run *r);
void cs_conn_on_message(struct rpc_conn *rpc, json_t *msg, struct rpc_fds *fds, void *userdata);

/* control-server-accept.c: accepting */
void cs_accept_retry_cb(evutil_socket_t fd, short what, void *userdata);
void cs_accept_resume(struct control_server *s);
void cs_accept_cb(evutil_socket_t lfd, short what, void *userdata);

/* control-server-events.c: events out */
bool cs_conn_congested(const struct vhub_owner *o);
void cs_server_emit(void *userdata, const struct vhub_event *ev);
