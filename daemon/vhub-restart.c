/* SPDX-License-Identifier: MIT */
/* Restart with guests running, the composition root's part: see vhub-restart.h. */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control-server.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fdstore.h"
#include "vhub-frontdoor.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-model-snapshot.h"
#include "vhub-restart.h"
#include "vhub-snapshot.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhubd.h"
#include "vhu-fd.h"

/* The daemon's snapshot ("S"). */
enum {
        S_RESTARTS = 1,         /* restarts carried so far */
        S_NEXT_VM_ID,
        S_NEXT_DEVICE_ID,
        S_NEXT_REGION_ID,
        S_NEXT_TOKEN,           /* written by the first format's daemons: back-end request
                                 * tokens are each VM's own now (its VM_NEXT_TOKEN) */
        S_START_USEC,           /* CLOCK_MONOTONIC (one clock for every process of a boot) */
        S_START_REALTIME_USEC,
        S_WRITTEN_USEC,         /* CLOCK_MONOTONIC: the downtime is counted from here */
        S_PLANNED,              /* written by a planned restart's last step */
        S_CONTROL,              /* nest: the JSON-RPC face's (control_server_serialize()) */
};

/* A snapshot a start was passed, read and checked. */
struct loaded {
        char name[VHUB_FD_GROUP_MAX];
        int fd;                 /* the snapshot file (taken from the map) */
        void *buf;
        size_t len;
        struct vhub_snap_doc doc;
};

struct vhub_restart_state {
        struct loaded daemon;
        struct loaded *vms;
        size_t n_vms;
        struct loaded *conns;   /* the control connections' records ("k<id>", format 2) */
        size_t n_conns;
        bool carried;
        uint64_t downtime_ms;
        /* a planned restart */
        bool planned;
        bool conns_inline;      /* its last snapshot holds the connections' records
                                 * (the oldest format that can: a downgrade works) */
        struct event *ev_poll;
        uint64_t deadline_usec;
        void (*done)(void *userdata);
        void *userdata;
};

static struct vhub_restart_state *state(struct vhubd *v) {
        if (!v->restart)
                v->restart = calloc(1, sizeof(*v->restart));
        return v->restart;
}

/* ---- writing ---- */

/* The daemon's snapshot: in format 2 (its connections' records in their
 * own files), or with them inline, as format 1 wrote it, at a planned
 * stop's end (docs/restart.md, "Versions"). */
static int commit_daemon(struct vhubd *v) {
        struct vhub_context *ctx = &v->ctx;
        struct vhub_snap_writer *w = &ctx->snap_writer;
        bool oldest = v->restart && v->restart->conns_inline, conns_inline = oldest;
        int r = 0;

        /* the faces are not back yet: the snapshot of the last run stays */
        if (ctx->restoring)
                return 0;
        /* connections carried from inline records get their own files
         * before a snapshot that no longer holds them, and S keeps them
         * while a file's push is still queued (a crash would lose it);
         * the records go first (same writer) */
        if (v->control && !conns_inline) {
                control_server_commit(v->control, false);
                if (control_server_unfiled(v->control)) {
                        struct vhub_fdstore_stats st;

                        vhub_fdstore_get_stats(v->fdstore, &st);
                        if (st.queued > 0)
                                conns_inline = true;
                        else
                                control_server_filed(v->control);
                }
        }
        if (v->snap.fd < 0) {
                r = vhub_snap_file_create(VHUB_SNAP_NAME_DAEMON, &v->snap);
                if (r >= 0) {
                        r = vhub_fdstore_push(v->fdstore, v->snap.fd, VHUB_SNAP_NAME_DAEMON);
                        if (r < 0)
                                vhub_snap_file_close(&v->snap);
                }
        }
        if (r >= 0) {
                vhub_snap_writer_reset(w);
                /* a running daemon's S stays format 2 even inline: a
                 * record may leave a long partial line out (C_MID_LINE),
                 * which a version-1 reader would not know */
                if (oldest)
                        w->compat = VHUB_SNAP_COMPAT_V1;
                vhub_snap_put_u64(w, S_RESTARTS, ctx->restarts);
                vhub_snap_put_u64(w, S_NEXT_VM_ID, ctx->next_vm_id);
                vhub_snap_put_u64(w, S_NEXT_DEVICE_ID, ctx->next_device_id);
                vhub_snap_put_u64(w, S_NEXT_REGION_ID, ctx->next_region_id);
                vhub_snap_put_u64(w, S_START_USEC, ctx->start_usec);
                vhub_snap_put_u64(w, S_START_REALTIME_USEC, ctx->start_realtime_usec);
                vhub_snap_put_u64(w, S_WRITTEN_USEC, vhub_now_usec());
                vhub_snap_put_bool(w, S_PLANNED, v->restart && v->restart->planned);
                if (v->control) {
                        vhub_snap_begin(w, S_CONTROL);
                        if (conns_inline)
                                control_server_serialize_inline(v->control, w);
                        else
                                control_server_serialize(v->control, w);
                        vhub_snap_end(w);
                }
                r = vhub_snap_file_commit(&v->snap, w);
        }
        return r;
}

void vhub_restart_commit_daemon(void *userdata) {
        int r = commit_daemon(userdata);

        if (r < 0)
                log_warning("the daemon's restart snapshot was not written: %s", strerror(-r));
}

void vhub_restart_commit_faces(void *userdata, bool all) {
        struct vhubd *v = userdata;

        if (v->ctx.restoring)
                return;
        if (v->control)
                control_server_commit(v->control, all);
}

/* ---- a start ---- */

static bool snapshot_name(const char *name, char kind) {
        size_t n = strlen(name);

        return n >= 2 && name[0] == kind && strspn(name + 1, "0123456789abcdefghijklmnopqrstuvwxyz") == n - 1;
}

static int load_one(struct vhub_fdstore_restore *r, const char *name, struct loaded *ret);

/* Load every snapshot of one kind the map holds into *ret. */
static int load_kind(struct vhub_fdstore_restore *r, char kind, struct loaded **ret, size_t *n_ret) {
        const char *name;
        int k = 0;

        for (size_t i = 0; k >= 0 && (name = vhub_fdstore_restore_name(r, i)); i++) {
                struct loaded *p;

                if (!snapshot_name(name, kind))
                        continue;
                p = reallocarray(*ret, *n_ret + 1, sizeof(*p));
                if (!p)
                        return -ENOMEM;
                *ret = p;
                k = load_one(r, name, &p[*n_ret]);
                (*n_ret)++;
        }
        return k;
}

/* Connections in the order they were made (the map's is the store's). */
static int by_conn_id(const void *a, const void *b) {
        unsigned long long x = strtoull(((const struct loaded *)a)->name + 1, NULL, 36);
        unsigned long long y = strtoull(((const struct loaded *)b)->name + 1, NULL, 36);

        return x < y ? -1 : x > y;
}

/* The version numbers of the copy a snapshot file was refused for (the
 * file reader does not hand out what it refuses), for the log line. */
static void newer_numbers(int fd, struct vhub_snap_doc *ret) {
        struct stat st;

        if (fstat(fd, &st) < 0 || st.st_size < 2 * VHUB_SNAP_HEADER_SIZE)
                return;
        for (int i = 0; i < 2; i++) {
                struct vhub_snap_doc doc = { 0 };
                size_t slot = (size_t)st.st_size / 2;
                size_t n = slot < VHUB_SNAP_MAX_SIZE ? slot : VHUB_SNAP_MAX_SIZE;
                uint8_t *buf = malloc(n);

                if (!buf)
                        return;
                if (pread(fd, buf, n, (off_t)(i * slot)) == (ssize_t)n &&
                    vhub_snap_check_header(buf, n, &doc, NULL) == -EPROTONOSUPPORT && doc.compat > ret->compat)
                        *ret = doc;
                free(buf);
        }
}

/* Take and check one snapshot: 0, or -errno after logging why. */
static int load_one(struct vhub_fdstore_restore *r, const char *name, struct loaded *ret) {
        const char *why = NULL;
        int k;

        *ret = (struct loaded){ .fd = -1 };
        snprintf(ret->name, sizeof(ret->name), "%s", name);
        ret->fd = vhub_fdstore_take(r, name);
        if (ret->fd < 0)
                return ret->fd;
        k = vhub_snap_file_read(ret->fd, &ret->buf, &ret->len, &why);
        if (k >= 0)
                k = vhub_snap_parse(ret->buf, ret->len, &ret->doc, &why);
        if (k == -EPROTONOSUPPORT && !ret->buf)
                newer_numbers(ret->fd, &ret->doc);
        if (k == -EPROTONOSUPPORT)
                log_error("cannot restore the state of the earlier run: snapshot %s needs a newer vhubd "
                          "(format version %u, readable from version %u; this vhubd reads version %u): %s",
                          name, ret->doc.version, ret->doc.compat, VHUB_SNAP_VERSION, why ? why : "");
        else if (k < 0)
                log_error("cannot restore the state of the earlier run: snapshot %s is unreadable: %s (%s)", name,
                          why ? why : "no valid copy", strerror(-k));
        return k;
}

static void loaded_free(struct loaded *l) {
        l->fd = vhu_safe_close(l->fd);
        free(l->buf);
        l->buf = NULL;
}

static void state_free_loaded(struct vhub_restart_state *rs) {
        loaded_free(&rs->daemon);
        for (size_t i = 0; i < rs->n_vms; i++)
                loaded_free(&rs->vms[i]);
        free(rs->vms);
        rs->vms = NULL;
        rs->n_vms = 0;
        for (size_t i = 0; i < rs->n_conns; i++)
                loaded_free(&rs->conns[i]);
        free(rs->conns);
        rs->conns = NULL;
        rs->n_conns = 0;
}

int vhub_restart_load(struct vhubd *v, struct vhub_fdstore_restore *r) {
        struct vhub_restart_state *rs;
        const char *name;
        int k;

        for (size_t i = 0;; i++) {
                name = vhub_fdstore_restore_name(r, i);
                if (!name)
                        return 0;       /* a first start, or a daemon that kept no snapshot */
                if (strcmp(name, VHUB_SNAP_NAME_DAEMON) == 0)
                        break;
        }
        rs = state(v);
        if (!rs)
                return -ENOMEM;
        k = load_one(r, VHUB_SNAP_NAME_DAEMON, &rs->daemon);
        if (k >= 0)
                k = load_kind(r, VHUB_SNAP_GROUP_VM, &rs->vms, &rs->n_vms);
        if (k >= 0)
                k = load_kind(r, VHUB_SNAP_GROUP_CONN, &rs->conns, &rs->n_conns);
        if (k >= 0 && rs->n_conns > 1)
                qsort(rs->conns, rs->n_conns, sizeof(*rs->conns), by_conn_id);
        if (k < 0) {
                /* nothing of the store was touched: ours are only copies */
                state_free_loaded(rs);
                return k;
        }
        return 1;
}

int vhub_restart_model(struct vhubd *v, struct vhub_fdstore_restore *r) {
        struct vhub_restart_state *rs = v->restart;
        struct vhub_context *ctx = &v->ctx;
        uint64_t restarts = 0, written = 0, shared_token = 0, u;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        const char *why = NULL;
        bool planned = false;
        int k;

        vhub_snap_doc_iter(&rs->daemon.doc, &it);
        while ((k = vhub_snap_next(&it, &x)) > 0) {
                u = 0;
                switch (x.tag) {
                case S_RESTARTS: k = vhub_snap_get_u64(&x, &restarts); break;
                case S_NEXT_VM_ID: k = vhub_snap_get_u64(&x, &ctx->next_vm_id); break;
                case S_NEXT_DEVICE_ID: k = vhub_snap_get_u64(&x, &ctx->next_device_id); break;
                case S_NEXT_REGION_ID: k = vhub_snap_get_u64(&x, &ctx->next_region_id); break;
                case S_NEXT_TOKEN: k = vhub_snap_get_u64(&x, &shared_token); break;
                case S_START_USEC:
                        k = vhub_snap_get_u64(&x, &u);
                        if (k >= 0 && u && u <= vhub_now_usec())
                                ctx->start_usec = u;
                        break;
                case S_START_REALTIME_USEC: k = vhub_snap_get_u64(&x, &ctx->start_realtime_usec); break;
                case S_WRITTEN_USEC: k = vhub_snap_get_u64(&x, &written); break;
                case S_PLANNED: k = vhub_snap_get_bool(&x, &planned); break;
                case S_CONTROL: break;
                default: k = vhub_snap_unknown(&x); break;
                }
                if (k < 0)
                        break;
        }
        if (k < 0) {
                log_error("cannot restore the state of the earlier run: the daemon's snapshot is malformed");
                return k;
        }
        ctx->restarts = restarts + 1;
        rs->carried = true;
        rs->downtime_ms = written && written <= vhub_now_usec() ? (vhub_now_usec() - written) / 1000 : 0;
        ctx->restoring = true;
        k = vhub_snap_file_adopt(VHU_TAKE_FD(rs->daemon.fd), &v->snap, &why);
        if (k < 0)
                log_warning("the daemon's snapshot file cannot be written again (%s): a new one is made",
                            why ? why : strerror(-k));
        log_info("restoring the state of the earlier run (%s, restart %llu, %zu VMs)",
                 planned ? "a planned restart" : "after a crash", (unsigned long long)ctx->restarts, rs->n_vms);
        for (size_t i = 0; i < rs->n_vms; i++) {
                struct vhub_vm *vm = NULL;

                why = NULL;
                k = vhub_vm_restore(ctx, r, &rs->vms[i].doc, VHU_TAKE_FD(rs->vms[i].fd), &vm, &why);
                if (k < 0 && !vm)
                        log_error("VM snapshot %s: cannot restore it: %s (%s)", rs->vms[i].name,
                                  why ? why : "", strerror(-k));
                /* a snapshot of the shared counter's time: no token of it is
                 * given out again, to whichever VM */
                if (vm && vm->next_token < shared_token)
                        vm->next_token = shared_token;
        }
        return 0;
}

int vhub_restart_faces(struct vhubd *v, struct vhub_fdstore_restore *r) {
        struct vhub_restart_state *rs = v->restart;
        struct vhub_snap_iter it, cit;
        struct vhub_snap_rec x;
        uint64_t *filed;
        int k = 0;

        /* a connection both inline in S and in its own file (a planned stop
         * cut short between the two, or a start cut short before it
         * rewrote S): the file is as new or newer, and wins */
        filed = rs->n_conns ? calloc(rs->n_conns, sizeof(*filed)) : NULL;
        if (rs->n_conns && !filed)
                return -ENOMEM;
        for (size_t i = 0; i < rs->n_conns; i++)
                filed[i] = strtoull(rs->conns[i].name + 1, NULL, 36);        /* sorted: by_conn_id() */
        vhub_snap_doc_iter(&rs->daemon.doc, &it);
        while (v->control && vhub_snap_next(&it, &x) > 0)
                if (x.tag == S_CONTROL && (k = vhub_snap_enter(&x, &cit)) >= 0)
                        k = control_server_restore(v->control, r, &cit, filed, rs->n_conns, v->ctx.restarts,
                                                   rs->downtime_ms);
        free(filed);
        for (size_t i = 0; i < rs->n_conns; i++) {
                struct loaded *l = &rs->conns[i];
                int kc;

                if (!v->control) {
                        /* nobody to carry them: their records go */
                        (void)vhub_fdstore_remove(v->fdstore, l->name);
                        continue;
                }
                kc = control_server_restore_conn(v->control, r, l->name, &l->doc, VHU_TAKE_FD(l->fd),
                                                 v->ctx.restarts, rs->downtime_ms);
                if (kc < 0 && k >= 0)
                        k = kc;
        }
        if (k < 0)
                log_warning("the control connections' snapshot is malformed: some were not carried (%s)",
                            strerror(-k));
        if (v->frontdoor)
                vhub_frontdoor_restore(v->frontdoor, r);
        /* connections' groups short of fds: the start fails before the
         * model acts on anything it restored (vhubd.c) */
        if (vhub_fdstore_restore_short_of_fds(r, NULL) > 0)
                return -EMFILE;
        vhub_context_restore_finish(&v->ctx);
        state_free_loaded(rs);
        log_notice("state carried across the restart (restart %llu, down %llu ms): %u VMs, %u devices, "
                   "%u control connections", (unsigned long long)v->ctx.restarts,
                   (unsigned long long)rs->downtime_ms, v->ctx.n_vms, v->ctx.n_devices,
                   v->control ? control_server_n_connections(v->control) : 0);
        return 0;
}

bool vhub_restart_carried(const struct vhubd *v) {
        return v->restart && v->restart->carried;
}

/* ---- a planned restart ---- */

/* What a back-end or the model is still doing for someone. */
static bool busy(struct vhubd *v) {
        return (v->control && control_server_busy(v->control)) || vhub_context_busy(&v->ctx);
}

static void poll_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhubd *v = userdata;
        struct vhub_restart_state *rs = v->restart;
        struct timeval tv = vhub_timeval_from_ms(1);

        if (busy(v) && vhub_now_usec() < rs->deadline_usec) {
                evtimer_add(rs->ev_poll, &tv);
                return;
        }
        if (busy(v))
                log_warning("planned restart: requests still in flight after %u ms: the next process "
                            "answers them -32011 and treats their devices as lost",
                            v->ctx.config->backend_timeout_ms);
        rs->done(rs->userdata);
}

int vhub_restart_begin(struct vhubd *v, void (*done)(void *userdata), void *userdata) {
        struct vhub_restart_state *rs = state(v);
        struct timeval tv = { 0, 0 };

        if (!rs)
                return -ENOMEM;
        rs->done = done;
        rs->userdata = userdata;
        rs->deadline_usec = vhub_now_usec() + (uint64_t)v->ctx.config->backend_timeout_ms * 1000;
        if (v->control)
                control_server_pause(v->control);
        if (v->frontdoor)
                vhub_frontdoor_pause(v->frontdoor);
        vhub_context_pause_channels(&v->ctx);
        rs->ev_poll = evtimer_new(v->ctx.base, poll_cb, v);
        if (!rs->ev_poll)
                return -ENOMEM;
        log_info("planned restart: reading no more requests (control connections, back-end channels); "
                 "waiting for those in flight");
        return evtimer_add(rs->ev_poll, &tv) < 0 ? -ENOMEM : 0;
}

/* The last snapshot again, in the oldest format that holds the state: the
 * connections' records inline in S (compat 1) -- the bytes their files got
 * from the commit just made --, and only then their files out of the
 * store.  A restart into a version-1 vhubd then carries everything; a
 * crash between the two leaves both, and a reader takes the files. */
static void write_oldest_format(struct vhubd *v, struct vhub_restart_state *rs) {
        int r;

        rs->conns_inline = true;
        r = commit_daemon(v);
        if (r < 0) {
                /* S as the commit above wrote it stays the newest copy */
                rs->conns_inline = false;
                log_warning("planned restart: the daemon's snapshot in the format a version-1 vhubd reads was "
                            "not written (%s): the connections' records stay in their own files, and only a "
                            "vhubd of format 2 or newer can take this state back", strerror(-r));
                return;
        }
        if (v->control)
                control_server_records_inline(v->control);
}

void vhub_restart_finish(struct vhubd *v) {
        struct vhub_restart_state *rs = state(v);

        /* what is queued for the VMMs goes out first (bounded: what a
         * client does not read in time is carried in the snapshot) */
        for (int i = 0; v->control && i < 500 && !control_server_flush_now(v->control); i++)
                usleep(1000);
        /* the rest is carried in the last snapshot */
        if (v->control)
                control_server_carry_output(v->control);
        if (rs)
                rs->planned = true;
        /* devices in their VMs' groups: in groups of their own, as format 1
         * has them (pushed by the settle, before the commit names them) */
        vhub_devices_own_groups(&v->ctx);
        /* stashes of one message: the next start peeks them, pushes nothing */
        vhub_fdstore_settle(v->fdstore);
        vhub_commit_all(&v->ctx);
        if (rs)
                write_oldest_format(v, rs);
        /* a connection over what a restart carries was left out of it:
         * closed now, where its client sees it (its group's removal goes
         * with the flush) */
        if (v->control)
                control_server_close_uncarried(v->control);
        if (vhub_fdstore_flush(v->fdstore, 1000) < 0)
                log_warning("planned restart: the service manager did not take every stored fd in time");
}

void vhub_restart_free(struct vhubd *v) {
        struct vhub_restart_state *rs = v->restart;

        if (!rs)
                return;
        state_free_loaded(rs);
        vhub_event_freep(&rs->ev_poll);
        free(rs);
        v->restart = NULL;
}
