/* SPDX-License-Identifier: MIT */
/*
 * A front-door device's VMM requests: each with a call of its own through
 * the model (vhub_device_vmm_request()), answered in order after the turn's
 * commit; the session's end and the redo of carried requests
 * (vhub-vmm-device.c for the object).
 */

#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fd-claim.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-snapshot.h"
#include "vhub-vmm-channel.h"
#include "vhub-vmm-conn.h"
#include "vhub-vmm-device.h"
#include "vhub-vmm-listener.h"
#include "vhu-fd.h"

#include "vhub-vmm-device-internal.h"

/* ---- the VMM's requests ---- */

static void call_forget(struct vmm_call *c) {
        struct vhub_vmm_device *vd = c->vd;

        if (vd) {
                TAILQ_REMOVE(&vd->calls, c, link);
                vd->n_calls--;
                vd->n_carried -= c->carried != NULL;
                vd->n_owed -= c->answer_id != 0;
                /* perhaps at rest again: written so that a crash carries it */
                if (vd->n_calls == 0)
                        vd_settle(vd);
                /* reading resumes once half the backlog is answered */
                if (vd->paused && !vd->frozen && vd->conn && vd->n_calls <= vd->limits.max_requests / 2) {
                        vd->paused = false;
                        vhub_vmm_conn_pause(vd->conn, false);
                }
        }
        vhub_vmm_answer_done(&c->call.out.vmm_request);
        free(c->carried);
        free(c);
}

/* A held call's answer will not go out (its session ended): it goes. */
static void call_drop_held(struct vmm_call *c) {
        vhub_vmm_answer_done(&c->call.out.vmm_request);
        free(c->carried);
        free(c);
}

/* The calls leave vd: those the model still holds find no device when
 * done, the held ones go (their answers with them). */
void vd_calls_let_go(struct vhub_vmm_device *vd) {
        struct vmm_call *c;

        while ((c = TAILQ_FIRST(&vd->calls))) {
                TAILQ_REMOVE(&vd->calls, c, link);
                if (c->held)
                        call_drop_held(c);
                else
                        c->vd = NULL;
        }
        vd->n_held = 0;
}

static void call_answer(struct vmm_call *c);

/* The model answered: the answer goes to the VMM, if the same VMM still waits. */
static void call_done(struct vhub_call *call) {
        struct vmm_call *c = (struct vmm_call *)((char *)call - offsetof(struct vmm_call, call));
        struct vhub_vmm_device *vd = c->vd;

        if (!vd || !vd->conn || c->session != vd->session || vhub_vmm_conn_is_lost(vd->conn)) {
                call_forget(c);
                return;
        }
        /* a snapshot carrying this request must not outlive its answer (a
         * crash would handle it again, and the VMM get two): one that drops
         * it is written first -- the turn's commit, which the other requests
         * read and answered in this wake-up share (vd_turn_committed());
         * an answer behind a held one waits with it (the VMM's order) */
        if (!vd->dead && (vd->n_held > 0 || (c->carried && c->answer_id != 0 && vd_rest_stored(vd))) &&
            vhub_device_vmm_commit_after(vd->dev, &vd->turn_wait)) {
                c->held = true;
                vd->n_held++;
                return;
        }
        /* (no snapshots to wait for: at once, as before) */
        if (c->carried && c->answer_id != 0 && !vd_leave_rest(vd)) {
                call_forget(c);
                return;
        }
        call_answer(c);
}

/* The answer the model gave goes to the VMM (or closes its connection). */
static void call_answer(struct vmm_call *c) {
        struct vhub_vmm_device *vd = c->vd;
        struct vhub_call *call = &c->call;
        const struct vhub_vmm_answer *a = &call->out.vmm_request;
        int r = 0;

        /* a request the VMM waits for nothing for can still close it */
        if (call->result < 0) {
                vd_log(vd, LOG_WARNING, REQ(c->request), "closing the VMM's connection: %s", call->error.detail);
                vhub_vmm_conn_fail(vd->conn, call->error.detail);
        } else if (a->close || !a->msg) {
                vd_log(vd, LOG_WARNING, REQ(c->request), "closing the VMM's connection: %s", a->why);
                vhub_vmm_conn_fail(vd->conn, a->why);
        } else if (c->answer_id == 0) {
                /* nothing to send */
        } else if (vhub_vmm_conn_answer_kind(vd->conn, c->answer_id) == VHUB_VMM_ANSWER_REPLY) {
                r = vhub_vmm_conn_reply(vd->conn, c->answer_id, a->msg->payload.raw, a->msg->hdr.size,
                                        a->msg->fds, a->msg->n_fds);
        } else {
                r = vhub_vmm_conn_ack(vd->conn, c->answer_id,
                                      a->msg->hdr.size == sizeof(uint64_t) ? a->msg->payload.u64 : 1);
        }
        if (r < 0) {
                char why[200];

                snprintf(why, sizeof(why), "cannot answer %s as the VMM expects it: %s", REQ(c->request),
                         strerror(-r));
                vd_log(vd, LOG_WARNING, REQ(c->request), "closing the VMM's connection: %s", why);
                vhub_vmm_conn_fail(vd->conn, why);
        }
        call_forget(c);
}

/*
 * The turn's commit ran (vhub-commit.h).  The answers held for it go out,
 * in order, if it replaced the snapshot carrying their requests; if that
 * write failed the VMM's connection is closed instead and they are
 * dropped, as in vd_leave_rest().  A request it carries in flight is
 * logged so.
 */
void vd_turn_committed(struct vhub_commit_wait *w) {
        struct vhub_vmm_device *vd =
                (struct vhub_vmm_device *)((char *)w - offsetof(struct vhub_vmm_device, turn_wait));
        struct vmm_call *c, *last;

        if (vd->dead)
                return;         /* its device is gone: vd_free() drops what it holds */
        vd_enter(vd);
        if (vd->n_held > 0 && vd_rest_stored(vd) && vd->conn) {
                vd_log(vd, LOG_WARNING, NULL, "closing the VMM's connection: the VM's snapshot that carries its "
                       "session could not be replaced");
                vhub_vmm_conn_fail(vd->conn, "the VM's snapshot that carries the session could not be replaced");
        }
        while (vd->n_held > 0) {
                TAILQ_FOREACH(c, &vd->calls, link)
                        if (c->held)
                                break;
                if (!c)
                        break;
                c->held = false;
                vd->n_held--;
                if (vd->conn && !vhub_vmm_conn_is_lost(vd->conn))
                        call_answer(c);
                else
                        call_forget(c);
        }
        vd->n_held = 0;
        last = TAILQ_LAST(&vd->calls, vmm_call_list);
        if (last && last->carried && last->seq > vd->logged_seq && vd->saved_seq >= last->seq &&
            vd_rest_stored(vd)) {
                vd->logged_seq = last->seq;
                vd_log(vd, LOG_DEBUG, REQ(last->request), "%s in flight: the VM's snapshot carries it",
                       REQ(last->request));
        }
        vd_leave(vd);
}

static void conn_on_request(void *userdata, struct vhu_msg *m, uint64_t answer_id) {
        struct vhub_vmm_device *vd = userdata;
        struct vmm_call *c, *last;
        uint64_t seq;

        vd_log(vd, LOG_DEBUG, REQ(m->hdr.request), "VMM request %s%s", REQ(m->hdr.request),
               answer_id ? " (answer due)" : "");
        if (m->hdr.request == VHU_REQ_SET_PROTOCOL_FEATURES && vd->channel)
                vhub_vmm_channel_set_protocol_features(vd->channel, vhub_vmm_conn_protocol_features(vd->conn));
        if (m->hdr.request == VHU_REQ_SET_BACKEND_REQ_FD) {
                int r = vd_channel_open(vd, m);

                if (r < 0) {
                        vd_log(vd, LOG_WARNING, REQ(m->hdr.request), "closing the VMM's connection: "
                               "its back-end channel: %s", strerror(-r));
                        vhub_vmm_conn_fail(vd->conn, "SET_BACKEND_REQ_FD with an fd that is no stream socket");
                        return;
                }
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
                vhub_vmm_conn_fail(vd->conn, "out of memory");
                return;
        }
        c->call.done = call_done;
        c->vd = vd;
        c->session = vd->session;
        c->answer_id = answer_id;
        c->request = m->hdr.request;
        c->seq = seq = ++vd->call_seq;
        /* carried only behind requests all carried (their order is the VMM's) */
        if (vd->n_carried == vd->n_calls && vd->n_calls < CARRY_MAX && vd_request_carriable(m) &&
            (c->carried = malloc(sizeof(*c->carried)))) {
                vhu_msg_init(c->carried);
                c->carried->hdr = m->hdr;
                memcpy(c->carried->payload.raw, m->payload.raw, m->hdr.size);
                vd->n_carried++;
        }
        vd->n_owed += answer_id != 0;
        TAILQ_INSERT_TAIL(&vd->calls, c, link);
        vd->n_calls++;
        if (!vd->paused && vd->n_calls >= vd->limits.max_requests) {
                /* the VMM waits (nothing is dropped) while the back-end catches up */
                vd->paused = true;
                vhub_vmm_conn_pause(vd->conn, true);
        }
        vd_enter(vd);
        vhub_device_vmm_request(vd->dev, m, &c->call); /* takes m's fds; may answer at once */
        if (!vd_leave(vd))
                return;
        /* still in flight and carried: the turn's commit says so, the one
         * its op waits for if it goes to the back-end (vhub-op-engine.c),
         * shared by every request read in this wake-up; a crash before it
         * falls back */
        last = TAILQ_LAST(&vd->calls, vmm_call_list);
        if (!last || last->seq != seq || !last->carried)
                return;
        if ((!vd->rest_saved || vd->saved_seq < seq) && vd_carriable(vd))
                vhub_device_vmm_commit_after(vd->dev, &vd->turn_wait);
}

/* The VMM's session is over: everything of it goes, the model is told. */
void vd_end_session(struct vhub_vmm_device *vd) {
        vd->session++; /* answers still due are dropped */
        vd_calls_let_go(vd);
        vd->n_calls = vd->n_carried = vd->n_owed = 0;
        vd_redo_drop(vd);
        /* a snapshot carrying it names a connection closed, or unanswered
         * requests: nothing the next session must replace */
        vd->rest_saved = vd->rest_older = false;
        vd->paused = false;
        vd->channel = vd_channel_free(vd);
        vd_relay_fail_all(vd);
        vd->conn = vd_conn_free(vd);
        if (vd->listener)
                vhub_vmm_listener_release(vd->listener);
        if (!vd->dead)
                vhub_device_vmm_disconnected(vd->dev);
}

static void conn_on_lost(void *userdata, const char *reason) {
        struct vhub_vmm_device *vd = userdata;

        vd_log(vd, LOG_INFO, NULL, "VMM connection closed: %s", reason);
        vd_enter(vd);
        vd_end_session(vd);
        vd_leave(vd);
}

static void conn_on_before_read(void *userdata) {
        vd_leave_rest(userdata);        /* false: the connection is lost, nothing is read */
}

const struct vhub_vmm_conn_ops vd_conn_ops = {
        .on_request = conn_on_request,
        .on_lost = conn_on_lost,
        .on_fds_changed = vd_fds_changed,
        .on_before_read = conn_on_before_read,
};

/*
 * An adopted session's requests in flight, handled again in the order the
 * VMM sent them, from the loop: after the restore has marked the device lost
 * (vhub_device_restore_finish()), so that they wait for its back-end's
 * restore as any request in an outage.  The VMM's connection is read again
 * only after them.
 */
void vd_redo_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_device *vd = userdata;

        vd_enter(vd);
        while (vd->n_redo > 0 && vd->conn && !vd->dead) {
                struct vhu_msg *m = vd->redo[0];

                vd->n_redo--;
                memmove(vd->redo, vd->redo + 1, vd->n_redo * sizeof(vd->redo[0]));
                vd->redo[vd->n_redo] = NULL;
                vd_log(vd, LOG_INFO, REQ(m->hdr.request), "%s from the VMM, in flight at the daemon's restart: "
                       "handled again", REQ(m->hdr.request));
                vhub_vmm_conn_redo(vd->conn, m);
                free(m);
        }
        vd_redo_drop(vd);
        if (vd->conn && !vd->paused && !vd->frozen)
                vhub_vmm_conn_pause(vd->conn, false);
        vd_leave(vd);
}
