/* SPDX-License-Identifier: MIT */
/*
 * The control server accepting connections: SO_PEERCRED, the limits per
 * uid, refusals, pausing when out of fds (control-server.c for the server).
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-listen.h"
#include "control-params.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

#include "control-server-internal.h"

/* ---- accepting ---- */

#define ACCEPT_RETRY_MS 200

/* Tell a connection we will not serve why, and close it (fd taken). */
static void refuse_connection(int fd, const char *detail) {
        json_t *msg = json_pack("{s:s, s:n, s:{s:i, s:s, s:{s:s}}}", "jsonrpc", "2.0", "id", "error",
                                "code", VHUB_ERR_LIMIT, "message", vhub_error_message(VHUB_ERR_LIMIT),
                                "data", "detail", detail);
        char *line = msg ? json_dumps(msg, JSON_COMPACT) : NULL;

        if (line) {
                size_t n = strlen(line);

                line[n] = '\n'; /* replaces the NUL: sent by length below */
                (void)send(fd, line, n + 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        free(line);
        json_decref(msg);
        vhu_safe_close(fd);
}

void cs_accept_retry_cb(evutil_socket_t fd, short what, void *userdata) {
        cs_accept_resume(userdata);
}

/* Out of fds: stop watching the listening socket (it stays readable and
 * accept() keeps failing: a busy loop) until a connection closes or the
 * retry timer fires. */
static void accept_pause(struct control_server *s) {
        struct timeval tv = vhub_timeval_from_ms(ACCEPT_RETRY_MS);

        if (s->accept_paused)
                return;
        s->accept_paused = true;
        event_del(s->ev_accept);
        evtimer_add(s->ev_accept_retry, &tv);
}

void cs_accept_resume(struct control_server *s) {
        if (!s->accept_paused || s->paused || vhub_context_shutting_down(s->ctx))
                return;
        s->accept_paused = false;
        evtimer_del(s->ev_accept_retry);
        if (s->spare_fd < 0)
                s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        event_add(s->ev_accept, NULL);
}

/* accept() failed for want of fds: give up the spare for a moment to take
 * the connection and tell it so.  False if that did not work either. */
static bool accept_refuse_with_spare(struct control_server *s, int lfd) {
        char detail[128];
        int fd;

        if (s->spare_fd < 0)
                return false;
        s->spare_fd = vhu_safe_close(s->spare_fd);
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd >= 0) {
                struct rlimit rl = { 0 };

                (void)getrlimit(RLIMIT_NOFILE, &rl);
                snprintf(detail, sizeof(detail), "the daemon is out of fds (fd limit %llu)",
                         (unsigned long long)rl.rlim_cur);
                refuse_connection(fd, detail);
        }
        s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        return fd >= 0;
}

/* Room for another connection of uid?  All together at most
 * max_connections, of which non-root uids may hold all but an eighth (root
 * can always connect), and one non-root uid at most its share (the others
 * can too).  False with a sentence in detail. */
static bool connection_admitted(const struct control_server *s, uid_t uid, char *detail, size_t len) {
        unsigned max = s->opts.max_connections;
        unsigned root_reserve = max > 1 ? (max / 8 > 1 ? max / 8 : 1) : 0;
        unsigned per_uid = s->opts.max_connections_per_uid ? s->opts.max_connections_per_uid
                                                            : (max / 4 > 1 ? max / 4 : 1);
        unsigned by_uid = 0, non_root = 0;
        const struct control_conn *c;
        struct vhub_error err = { 0 };

        if (s->n_conns >= max) {
                snprintf(detail, len, "too many control connections (%u, --max-connections)", max);
                return false;
        }
        if (uid == 0)
                return true;
        TAILQ_FOREACH(c, &s->conns, link) {
                non_root += c->uid != 0;
                by_uid += c->uid == uid;
        }
        if (by_uid >= per_uid) {
                snprintf(detail, len, "uid %u has %u control connections (--max-connections-per-uid)",
                         (unsigned)uid, by_uid);
                return false;
        }
        /* other uids' numbers stay out of the detail: no oracle on them */
        if (non_root >= max - root_reserve) {
                snprintf(detail, len, "the control connections non-root uids may hold are in use");
                return false;
        }
        /* what it stores (its group, its record) must fit uid's share of
         * the fd store: past it, it would not survive a restart */
        if (vhub_fd_store_check(s->ctx, uid, VHUB_CONNECTION_STORE_ENTRIES, &err) < 0) {
                snprintf(detail, len, "%s", err.detail);
                return false;
        }
        return true;
}

void cs_accept_cb(evutil_socket_t lfd, short what, void *userdata) {
        struct control_server *s = userdata;
        struct vhub_error err = { 0 };
        struct control_conn *c;
        char detail[256];
        struct ucred cred;
        socklen_t len = sizeof(cred);
        int fd, r;

        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
                int e = errno;

                if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
                        if (!s->out_of_fds)
                                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                                              "cannot accept control connections: %s", strerror(e));
                        s->out_of_fds = true;
                        if ((e != EMFILE && e != ENFILE) || !accept_refuse_with_spare(s, lfd))
                                accept_pause(s);
                }
                return;
        }
        if (s->out_of_fds) {
                s->out_of_fds = false;
                vhub_log_full(LOG_NOTICE, NULL, NULL, NULL, "accepting control connections again");
        }
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
                vhu_safe_close(fd);
                return;
        }
        if (!connection_admitted(s, cred.uid, detail, sizeof(detail))) {
                unsigned long long left_out;

                refuse_connection(fd, detail);
                /* a uid can make this happen at will: rate-limited */
                if (vhub_log_ratelimit(&s->refusal_log, vhub_now_usec(), &left_out))
                        vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                                      "refused a control connection of uid %u pid %d: %s (%llu refusals not logged)",
                                      (unsigned)cred.uid, (int)cred.pid, detail, left_out);
                return;
        }
        /* the connection is an fd of its uid's too */
        if (cs_server_check_fds(s, cred.uid, 1, cred.uid == 0 ? cs_fd_slack(s, 0) : 0, &err) < 0) {
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "refused a control connection of uid %u pid %d: %s", (unsigned)cred.uid,
                              (int)cred.pid, err.detail);
                refuse_connection(fd, err.detail);
                return;
        }
        c = control_conn_alloc(s, ++s->next_conn_id);
        if (!c) {
                vhu_safe_close(fd);
                return;
        }
        r = vhub_cred_from_socket(fd, &c->cred);
        if (r < 0) {
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "refused a control connection: its credentials: %s", strerror(-r));
                vhu_safe_close(fd);
                free(c);
                return;
        }
        r = rpc_conn_new(vhub_context_base(s->ctx), fd, &s->opts.limits, &control_conn_ops, c, &c->rpc);
        if (r < 0) { /* rpc_conn_new closed fd */
                vhub_cred_done(&c->cred);
                free(c);
                return;
        }
        control_conn_join(c);
        control_conn_changed(c);        /* its record, before anything is read */
        vhub_changed(s->ctx, NULL);     /* the connection counter */
        vhub_log_full(LOG_DEBUG, NULL, NULL, NULL, "control connection %llu from uid %u pid %d",
                      (unsigned long long)c->id, (unsigned)c->uid, (int)c->pid);
}
