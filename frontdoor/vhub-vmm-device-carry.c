/* SPDX-License-Identifier: MIT */
/*
 * What a restart of the daemon carries of a front-door device's session
 * (docs/restart.md): the requests a crash may carry, whether the session is
 * at rest, the face's record in the VM's snapshot, and the adoption of it
 * all by the next process (vhub-vmm-device.c for the object).
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

/*
 * Requests a crash may carry and the next process handle again (docs/
 * restart.md, "A crash with VMM requests in flight"): read whole, no fds,
 * and handling one twice changes nothing -- set requests whose record is
 * the value they set, and queries answered from the back-end or the
 * records (GET_VRING_BASE records its ring stopped only with its answer,
 * in the same callback).  SET_CONFIG is not: its effect is the back-end's
 * own, which no record replays.
 */
static const uint32_t carriable[] = {
        VHU_REQ_SET_FEATURES,   VHU_REQ_SET_VRING_NUM,   VHU_REQ_SET_VRING_BASE, VHU_REQ_SET_VRING_ADDR,
        VHU_REQ_SET_VRING_ENDIAN, VHU_REQ_SET_VRING_ENABLE, VHU_REQ_SET_STATUS,  VHU_REQ_NET_SET_MTU,
        VHU_REQ_GET_VRING_BASE, VHU_REQ_GET_STATUS,      VHU_REQ_GET_CONFIG,     VHU_REQ_VRING_KICK,
};

bool vd_request_carriable(const struct vhu_msg *m) {
        for (size_t i = 0; m->n_fds == 0 && i < sizeof(carriable) / sizeof(carriable[0]); i++)
                if (carriable[i] == m->hdr.request)
                        return true;
        return false;
}

/* ---- a restart of the daemon carries the VMM's session ---- */

/* The face's record in the device's carried session (vhub_vmm_face_ops.save):
 * its fds by key in group f<device id>, what the VMM acked. */
enum {
        F_LISTEN = 1,
        F_CONN,
        F_CHAN,
        F_UID_DIR,
        F_VM_DIR,
        F_INODE,
        F_PROTOCOL_FEATURES,
        F_REQUEST,      /* bytes: a request in flight, header and payload, in order */
};

/* What the VMM sent is all answered and gone, nothing half-read, nothing
 * awaited on its channel: the sockets alone hold the session.  Or it is busy
 * only with requests it carries (docs/restart.md, "A crash with VMM requests
 * in flight"): each read whole, without fds, handled again by the next
 * process; the connection owes their answers and nothing else.  Asked as
 * its VM's snapshot is written, which then carries the session or not. */
bool vd_carriable(const struct vhub_vmm_device *vd) {
        return !vd->leaving_rest && !vd->dead && vd->n_held == 0 && vd->n_carried == vd->n_calls &&
               vd->n_calls + vd->n_redo <= CARRY_MAX && vd->relay_count == 0 && vd->conn && vd->listener &&
               vd->sock && vhub_vmm_conn_quiet(vd->conn, vd->n_owed) &&
               (!vd->channel || vhub_vmm_channel_at_rest(vd->channel)) &&
               /* settled; a planned restart's last snapshot does not wait,
                * nor do requests in flight (their op's start writes one
                * anyway: QEMU's stop asks for each ring's base in turn) */
               (vd->frozen || vd->n_calls + vd->n_redo > 0 || !evtimer_pending(vd->ev_rest, NULL));
}

bool vd_at_rest(void *face) {
        struct vhub_vmm_device *vd = face;
        bool was = vd->rest_saved;

        vd->rest_older = vd_rest_stored(vd);
        vd->rest_serial = vhub_device_vmm_snapshot_serial(vd->dev);
        vd->rest_saved = vd_carriable(vd);
        if (vd->rest_saved && !was)
                vd_log(vd, LOG_DEBUG, NULL, "the VM's snapshot carries the VMM's session (%s)",
                       vd->n_calls + vd->n_redo ? "requests in flight" : "at rest");
        return vd->rest_saved;
}

static void put_request(struct vhub_snap_writer *w, const struct vhu_msg *m) {
        uint8_t b[sizeof(m->hdr) + VHU_MAX_PAYLOAD];

        memcpy(b, &m->hdr, sizeof(m->hdr));
        memcpy(b + sizeof(m->hdr), m->payload.raw, m->hdr.size);
        vhub_snap_put_bytes(w, F_REQUEST, b, sizeof(m->hdr) + m->hdr.size);
}

struct socket_save {
        const struct vhub_vmm_device *vd;
        struct vhub_snap_writer *w;
};

static void socket_fd_save(int fd, const char *what, void *userdata) {
        const struct socket_save *ss = userdata;
        uint32_t tag = strcmp(what, "dir/uid") == 0 ? F_UID_DIR : strcmp(what, "dir/vm") == 0 ? F_VM_DIR : F_INODE;

        vhub_snap_put_fd(ss->w, tag, vhub_context_fdstore(ss->vd->ctx), ss->vd->fd_group, fd);
}

void vd_save(void *face, struct vhub_snap_writer *w) {
        struct vhub_vmm_device *vd = face;
        const struct vhub_fdstore *st = vhub_context_fdstore(vd->ctx);
        const struct vmm_call *c;

        vhub_snap_put_fd(w, F_LISTEN, st, vd->fd_group, vhub_vmm_listener_fd(vd->listener));
        vhub_snap_put_fd(w, F_CONN, st, vd->fd_group, vhub_vmm_conn_fd(vd->conn));
        if (vd->channel)
                vhub_snap_put_fd(w, F_CHAN, st, vd->fd_group, vhub_vmm_channel_fd(vd->channel));
        vhub_vmm_socket_foreach_fd(vd->sock, socket_fd_save, &(struct socket_save){ vd, w });
        vhub_snap_put_u64(w, F_PROTOCOL_FEATURES, vhub_vmm_conn_protocol_features(vd->conn));
        /* in the VMM's order: those not handled again yet came last */
        TAILQ_FOREACH(c, &vd->calls, link)
                put_request(w, c->carried);
        for (unsigned i = 0; i < vd->n_redo; i++)
                put_request(w, vd->redo[i]);
        vd->saved_seq = vd->call_seq;
}

struct carried_fds {
        int listen, conn, chan, uid_dir, vm_dir, inode;
        uint64_t protocol_features;
        struct vhu_msg *req[CARRY_MAX];     /* requests in flight, in order */
        unsigned n_req;
};

/* A request in flight as put_request() wrote it: a header, its payload whole. */
static int read_request(const struct vhub_snap_rec *x, struct carried_fds *c) {
        struct vhu_msg *m;
        const void *raw;
        size_t n;
        int r = vhub_snap_get_bytes(x, &raw, &n);

        if (r < 0)
                return r;
        if (c->n_req == CARRY_MAX || n < sizeof(m->hdr))
                return -EBADMSG;
        m = malloc(sizeof(*m));
        if (!m)
                return -ENOMEM;
        vhu_msg_init(m);
        memcpy(&m->hdr, raw, sizeof(m->hdr));
        if (m->hdr.size > VHU_MAX_PAYLOAD || n - sizeof(m->hdr) != m->hdr.size) {
                free(m);
                return -EBADMSG;
        }
        memcpy(m->payload.raw, (const uint8_t *)raw + sizeof(m->hdr), m->hdr.size);
        c->req[c->n_req++] = m;
        return 0;
}

static int read_carried(struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec, struct carried_fds *c) {
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        struct vhub_fd_key key;
        int r = vhub_snap_enter(rec, &it), *slot;

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case F_LISTEN: slot = &c->listen; break;
                case F_CONN: slot = &c->conn; break;
                case F_CHAN: slot = &c->chan; break;
                case F_UID_DIR: slot = &c->uid_dir; break;
                case F_VM_DIR: slot = &c->vm_dir; break;
                case F_INODE: slot = &c->inode; break;
                case F_PROTOCOL_FEATURES: r = vhub_snap_get_u64(&x, &c->protocol_features); continue;
                case F_REQUEST: r = read_request(&x, c); continue;
                default: r = vhub_snap_unknown(&x); continue;
                }
                r = vhub_snap_get_key(&x, &key);
                if (r >= 0 && *slot < 0 && (r = vhub_fd_claim(claim, &key)) >= 0)
                        *slot = r;
        }
        if (r >= 0 && (c->listen < 0 || c->conn < 0 || c->uid_dir < 0 || c->vm_dir < 0 || c->inode < 0))
                r = -ENOENT;
        return r;
}

int vhub_vmm_device_adopt(struct vhub_context *ctx, struct vhub_vmm_device_list *list, struct vhub_device *dev,
                          struct vhub_vmm_dir *dir, const struct vhub_cred *owner,
                          struct vhub_fdstore_restore *fr, const struct vhub_snap_rec *rec,
                          const struct vhub_vmm_device_limits *limits, struct vhub_vmm_device **ret,
                          const struct vhub_vmm_face_ops **ret_ops, char **ret_path) {
        struct carried_fds c = { -1, -1, -1, -1, -1, -1, 0, { NULL }, 0 };
        struct vhub_vmm_conn_limits l;
        struct vhub_vmm_device *vd = vd_alloc(ctx, dev, limits);
        struct vhub_fd_claim claim;
        int r;

        *ret_path = NULL;
        if (!vd)
                return -ENOMEM;
        vhub_fd_claim_open(fr, vhub_context_fdstore(ctx), vd->fd_group, &claim);
        r = read_carried(&claim, rec, &c);
        vhub_fd_claim_close(&claim);    /* what the record does not name goes */
        if (r < 0) {
                /* what was claimed is a member of the group since the
                 * restore: it leaves it as it closes, or the group would
                 * keep the stale listener stored (and its name "in use") */
                vd->dead = true;
                c.listen = vd_claimed_close(vd, c.listen, "listen");
                c.conn = vd_claimed_close(vd, c.conn, "conn");
                c.chan = vd_claimed_close(vd, c.chan, "chan");
                /* the socket the earlier run made goes too: the next VMM's
                 * is made at once, even while the manager still holds the
                 * old listener (the name is ours: the inode says so) */
                if (c.uid_dir >= 0 && c.vm_dir >= 0 && c.inode >= 0 &&
                    vhub_vmm_socket_adopt(dir, owner, vhub_device_vm_name(dev), vhub_device_name(dev),
                                          c.uid_dir, c.vm_dir, c.inode, &vd->sock, ret_path) >= 0) {
                        vd->sock = vd_socket_remove(vd);
                        free(*ret_path);
                        *ret_path = NULL;
                        c.uid_dir = c.vm_dir = c.inode = -1;
                }
                c.uid_dir = vd_claimed_close(vd, c.uid_dir, "dir/uid");
                c.vm_dir = vd_claimed_close(vd, c.vm_dir, "dir/vm");
                c.inode = vd_claimed_close(vd, c.inode, "inode");
                for (unsigned i = 0; i < c.n_req; i++)
                        free(c.req[i]);
                vhub_event_freep(&vd->ev_rest);
                vhub_event_freep(&vd->ev_redo);
                vhub_fd_group_own(ctx, VHUB_FD_GROUP_FRONTDOOR, vhub_device_id(dev), 0, false);
                free(vd);
                return r;
        }
        /* the object's from here: vd_free() drops them */
        memcpy(vd->redo, c.req, sizeof(c.req));
        vd->n_redo = c.n_req;
        vd->list = list;
        TAILQ_INSERT_TAIL(list, vd, link);
        /* each part is the object's as soon as it exists: vd_free() undoes any prefix */
        r = vhub_vmm_socket_adopt(dir, owner, vhub_device_vm_name(dev), vhub_device_name(dev), c.uid_dir,
                                  c.vm_dir, c.inode, &vd->sock, ret_path);
        if (r >= 0) {
                vhub_vmm_socket_foreach_fd(vd->sock, vd_socket_fd_track, vd);
                r = vhub_vmm_listener_new(vd->base, c.listen, owner->uid, &vd_listener_ops, vd, &vd->listener);
                if (r < 0)
                        vd_claimed_gone(vd, c.listen, "listen");
        } else {
                vd_claimed_close(vd, c.uid_dir, "dir/uid");
                vd_claimed_close(vd, c.vm_dir, "dir/vm");
                vd_claimed_close(vd, c.inode, "inode");
                vd_claimed_close(vd, c.listen, "listen");
        }
        if (r >= 0) {
                vd_fd_note(vd, true, vhub_vmm_listener_fd(vd->listener), "listen");
                vhub_vmm_listener_hold(vd->listener);   /* its VMM is attached */
                vhub_vmm_conn_limits_default(&l);
                l.answer_timeout_ms = 2 * vd->limits.backend_timeout_ms + 1000;
                r = vhub_vmm_conn_new(vd->base, c.conn, &l, &vd_conn_ops, vd, &vd->conn);
                if (r < 0)
                        vd_claimed_gone(vd, c.conn, "conn");
        } else {
                vd_claimed_close(vd, c.conn, "conn");
        }
        if (r >= 0) {
                vd_fd_note(vd, true, vhub_vmm_conn_fd(vd->conn), "conn");
                vhub_vmm_conn_offer_protocol_features(vd->conn, vhub_device_vmm_protocol_features(dev));
                r = vhub_vmm_conn_resume(vd->conn, c.protocol_features);
        }
        if (r >= 0 && c.chan >= 0) {
                r = vhub_vmm_channel_new(vd->base, c.chan, vd->limits.backend_timeout_ms, RELAY_MAX, &vd_channel_ops,
                                         vd, &vd->channel);
                if (r < 0)
                        vd_claimed_gone(vd, c.chan, "chan");
                c.chan = -1;
                if (r >= 0) {
                        vd_fd_note(vd, true, vhub_vmm_channel_fd(vd->channel), "chan");
                        vhub_vmm_channel_set_protocol_features(vd->channel, c.protocol_features);
                }
        }
        vd_claimed_close(vd, c.chan, "chan");
        if (r < 0) {
                vd->dead = true;
                vd_free(vd);
                if (*ret_path) {
                        free(*ret_path);
                        *ret_path = NULL;
                }
                return r;
        }
        vd->session++;
        /* the snapshot it came from carries the session */
        vd->rest_saved = true;
        vd->rest_serial = vhub_device_vmm_snapshot_stored(dev);
        if (vd->n_redo > 0) {
                static const struct timeval now = { 0, 0 };

                /* nothing of the VMM is read before them */
                vhub_vmm_conn_pause(vd->conn, true);
                if (evtimer_add(vd->ev_redo, &now) < 0)
                        vd_redo_cb(-1, 0, vd);
                vd_log(vd, LOG_INFO, NULL, "%u request%s of the VMM in flight at the daemon's restart: "
                       "handled again once the device is restored", vd->n_redo, vd->n_redo == 1 ? "" : "s");
        }
        *ret = vd;
        *ret_ops = &vd_face_ops;
        return 0;
}
