/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "control-server.h"
#include "vhub-commit.h"
#include "vhub-config.h"
#include "vhub-fd-track.h"
#include "vhub-fdstore.h"
#include "vhub-frontdoor.h"
#include "vhub-log.h"
#include "vhub-restart.h"
#include "vhubd.h"
#include "vhu-fd.h"

/* How long a clean exit waits for the fd store to take what is queued. */
#define VHUBD_FDSTORE_FLUSH_MS 1000

/* The JSON-RPC face's options, from the daemon's configuration. */
static void control_options(const struct vhub_config *config, const struct vhubd_options *o,
                            int listen_fd, struct control_server_options *ret) {
        *ret = (struct control_server_options){
                .path = o->control_path,
                .listen_fd = listen_fd,
                .mode = config->control_mode,
                .gid = config->control_gid,
                .gid_set = config->control_gid_set,
                .max_connections = config->limits.connections,
                .max_connections_per_uid = config->limits.connections_per_uid,
                .max_pending = config->limits.pending_per_connection,
        };
        rpc_conn_limits_default(&ret->limits);
        ret->limits.max_line = config->limits.max_line;
        ret->limits.max_out_bytes = config->limits.max_output_bytes;
}

/* The front door (docs/front-door.md): its sockets under --vmm-dir, made
 * when the first device asks for one. */
static int frontdoor_init(struct vhubd *v, const struct vhub_config *config) {
        struct vhub_frontdoor_options fo = { .backend_timeout_ms = config->backend_timeout_ms };
        char *dir = config->vmm_dir ? NULL : vhub_frontdoor_default_dir();
        int r;

        fo.vmm_dir = config->vmm_dir ? config->vmm_dir : dir;
        if (!fo.vmm_dir)
                return -ENOMEM;
        r = vhub_frontdoor_new(&v->ctx, &fo, &v->frontdoor);
        free(dir);
        return r;
}

/* A name the daemon itself gives fds in the store (vhub-fd-track.h): a
 * kind letter and a base-36 id, "L", or the store's own "fdstore/...". */
static bool name_is_ours(const char *name) {
        size_t n = strlen(name);

        if (strcmp(name, VHUB_FD_GROUP_LISTENER) == 0 || strcmp(name, VHUB_SNAP_NAME_DAEMON) == 0 ||
            strncmp(name, VHUB_FDSTORE_RESERVED, strlen(VHUB_FDSTORE_RESERVED)) == 0)
                return true;
        /* a group's copy stored while its stash was rebuilt (vhub-fdstore.h) */
        if (n > strlen(VHUB_FDSTORE_GROUP_ALT) &&
            strcmp(name + n - strlen(VHUB_FDSTORE_GROUP_ALT), VHUB_FDSTORE_GROUP_ALT) == 0)
                n -= strlen(VHUB_FDSTORE_GROUP_ALT);
        if (n < 2 || !strchr("cdfvos", name[0]))
                return false;
        return strspn(name + 1, "0123456789abcdefghijklmnopqrstuvwxyz") == n - 1;
}

/* Some of the state the store kept could not be taken back for want of fd
 * numbers (RLIMIT_NOFILE lower than what the earlier run held, e.g. a
 * lower LimitNOFILE= after an upgrade): going on would lose those VMs'
 * devices and connections for good.  So the start fails, saying why, with
 * the store as it was (what was re-stored already is flushed to it), and
 * Restart=on-failure tries again -- with the limit raised, everything comes
 * back.  -EMFILE if so (v->keep_store set), else 0. */
static int restore_short_of_fds(struct vhubd *v, struct vhub_fdstore_restore *r) {
        const char *first = NULL;
        unsigned n = vhub_fdstore_restore_short_of_fds(r, &first);
        struct rlimit rl = { 0 };

        if (n == 0)
                return 0;
        (void)getrlimit(RLIMIT_NOFILE, &rl);
        log_error("cannot restore the state of the earlier run: out of fds (RLIMIT_NOFILE %llu) -- %u fd-store "
                  "groups could not be taken back (the first: %s); the stored fds are kept for the next start: "
                  "raise LimitNOFILE= (or the hard limit) above what the earlier run held",
                  (unsigned long long)rl.rlim_cur, n, first ? first : "?");
        if (vhub_fdstore_restore_give_up(r, VHUBD_FDSTORE_FLUSH_MS) < 0)
                log_warning("the fd store did not take every group stored again before exit");
        v->keep_store = true;
        return -EMFILE;
}

/*
 * What the service manager passed (LISTEN_FDS/LISTEN_FDNAMES): the control
 * socket of socket activation ("control", or the only fd a socket unit
 * without FileDescriptorName= passed), and what the fd store kept of an
 * earlier run.  With the earlier run's snapshot ("S") every snapshot is
 * read and checked first (one the daemon cannot read: a log line, the map
 * aborted so that the store keeps everything, -errno: the start fails);
 * then the model is rebuilt from them and *ret_carried is set (the faces
 * follow in vhubd_init()).  Without one, each group of an earlier run is
 * closed at once -- its back-ends see their connection go -- and its name
 * removed.  *ret_control: the control socket (-1: none passed);
 * *ret_listener: the daemon's own listener of the earlier run (-1: none).
 */
static int take_passed_fds(struct vhubd *v, struct vhub_fdstore_restore **ret_r, int *ret_control,
                           int *ret_listener) {
        struct vhub_fdstore_restore *r;
        const char *name, *other = NULL;
        unsigned n_other = 0;
        int fd, k;

        *ret_r = NULL;
        *ret_control = *ret_listener = -1;
        k = vhub_fdstore_restore_from_env(v->fdstore, &r);
        if (k < 0) {
                log_warning("cannot read the fds the service manager passed: %s", strerror(-k));
                return 0;
        }
        k = vhub_restart_load(v, r);
        if (k < 0) {
                vhub_fdstore_restore_abort(r);
                return k;
        }
        fd = vhub_fdstore_take(r, "control");
        for (size_t i = 0; (name = vhub_fdstore_restore_name(r, i)); i++)
                if (!name_is_ours(name)) {
                        other = name;
                        n_other++;
                } else if (k == 0 && strncmp(name, VHUB_FDSTORE_RESERVED, strlen(VHUB_FDSTORE_RESERVED)) != 0 &&
                           vhub_fdstore_drop_group(r, name) == 0)
                        log_info("fd store: group %s of an earlier run closed", name);
        if (fd < 0 && n_other == 1)
                fd = vhub_fdstore_take(r, other);
        *ret_control = fd;
        if (k > 0) {
                struct vhub_fdstore_member *m = NULL;
                size_t n = 0;

                if (vhub_fdstore_take_group(r, VHUB_FD_GROUP_LISTENER, &m, &n) == 0 && n >= 1) {
                        *ret_listener = m[0].fd;
                        for (size_t i = 1; i < n; i++) {
                                (void)vhub_fdstore_group_remove(v->fdstore, VHUB_FD_GROUP_LISTENER, m[i].fd);
                                vhu_safe_close(m[i].fd);
                        }
                }
                free(m);
                k = vhub_restart_model(v, r);
                if (k < 0) {
                        vhub_fdstore_restore_abort(r);
                        return k;
                }
                k = restore_short_of_fds(v, r);
                if (k < 0) {
                        *ret_listener = vhu_safe_close(*ret_listener);
                        return k;
                }
                *ret_r = r;
                return 0;
        }
        k = vhub_fdstore_restore_finish(r);
        if (k > 0)
                log_info("%d fds the service manager kept from an earlier run were closed", k);
        return 0;
}

int vhubd_init(struct vhubd *v, struct event_base *base, struct vhub_config *config,
               const struct vhubd_options *o) {
        struct vhub_fdstore_options so = { .disabled = config->no_fd_store };
        struct vhub_fdstore_restore *restore = NULL;
        struct control_server_options co;
        int listen_fd = o->control_listen_fd, own_listener = -1, r;

        memset(v, 0, sizeof(*v));
        v->snap.fd = -1;
        v->snap.newest = -1;
        r = vhub_context_init(&v->ctx, base, config);
        if (r < 0) {
                vhu_safe_close(listen_fd); /* taken in every case */
                log_error("cannot set up the daemon's state: %s", strerror(-r));
                return r;
        }
        v->ctx_ready = true;
        r = vhub_fdstore_new(base, &so, &v->fdstore);
        if (r < 0) {
                /* serving without it beats not serving: only a restart is lost */
                log_warning("cannot use the service manager's fd store (%s): fds will not survive a restart",
                            strerror(-r));
                so.disabled = true;
                r = vhub_fdstore_new(base, &so, &v->fdstore);
                if (r < 0) {
                        vhu_safe_close(listen_fd);
                        log_error("cannot set up the fd store: %s", strerror(-r));
                        return r;
                }
        }
        v->ctx.fdstore = v->fdstore;
        r = vhub_commit_setup(&v->ctx);
        if (r < 0) {
                vhu_safe_close(listen_fd);
                log_error("cannot set up the restart snapshots: %s", strerror(-r));
                return r;
        }
        v->ctx.commit_daemon = vhub_restart_commit_daemon;
        v->ctx.commit_faces = vhub_restart_commit_faces;
        v->ctx.commit_userdata = v;
        if (vhub_fdstore_enabled(v->fdstore))
                log_info("keeping fds in the service manager's fd store");
        r = frontdoor_init(v, config);
        if (r < 0) {
                vhu_safe_close(listen_fd);
                log_error("cannot set up the front door: %s", strerror(-r));
                return r;
        }
        if (listen_fd < 0) {
                r = take_passed_fds(v, &restore, &listen_fd, &own_listener);
                if (r < 0)
                        return r;       /* logged; the store is untouched */
        }
        if (listen_fd < 0 && own_listener < 0 && !o->control_path) {
                log_error("no control socket path: pass --control PATH or set XDG_RUNTIME_DIR");
                return -EINVAL;
        }
        control_options(config, o, listen_fd, &co);
        if (listen_fd < 0 && own_listener >= 0 && o->control_path) {
                /* the socket the earlier run made at the same path: clients
                 * queued in its backlog are accepted as if nothing happened */
                co.listen_fd = own_listener;
                co.listen_fd_ours = true;
                own_listener = -1;
        }
        if (own_listener >= 0) {
                (void)vhub_fdstore_group_remove(v->fdstore, VHUB_FD_GROUP_LISTENER, own_listener);
                vhu_safe_close(own_listener);
        }
        r = control_server_new(&v->ctx, &co, &v->control);
        if (r < 0) {
                log_error("cannot set up the control socket %s: %s",
                          co.listen_fd < 0 ? o->control_path : "(inherited)", strerror(-r));
                if (restore) {
                        /* the model holds the earlier run's state: a
                         * teardown would close it for good */
                        (void)vhub_fdstore_restore_give_up(restore, VHUBD_FDSTORE_FLUSH_MS);
                        v->keep_store = true;
                }
                return r;
        }
        if (restore) {
                r = vhub_restart_faces(v, restore);
                if (r == -EMFILE)
                        return restore_short_of_fds(v, restore);
                r = vhub_fdstore_restore_finish(restore);
                if (r > 0)
                        log_info("%d fds the service manager kept were stale (nothing names them): closed", r);
        }
        /* the first snapshot of this run (the restart count, what came
         * back), written once the loop runs: READY=1 goes first */
        vhub_commit_all_later(&v->ctx);
        return 0;
}

const char *vhubd_control_path(const struct vhubd *v) {
        return v->control ? control_server_path(v->control) : NULL;
}

void vhubd_stop_faces(struct vhubd *v) {
        if (v->control)
                control_server_shutdown(v->control);
        vhub_frontdoor_shutdown(v->frontdoor);
}

void vhubd_foreach_fd(const struct vhubd *v, const struct vhub_fd_visitor *visitor) {
        if (v->ctx_ready)
                vhub_context_foreach_fd(&v->ctx, visitor);
        vhub_fd_visit(visitor, v->snap.fd, VHUB_SNAP_NAME_DAEMON, "daemon/snapshot");
        if (v->control)
                control_server_foreach_fd(v->control, visitor);
        if (v->frontdoor)
                vhub_frontdoor_foreach_fd(v->frontdoor, visitor);
}

void vhubd_done(struct vhubd *v) {
        /* the model first: VMs freed complete their pending calls, which the
         * faces answer (or drop, their connections being closed) */
        if (v->ctx_ready)
                vhub_context_done(&v->ctx);
        v->ctx_ready = false;
        v->control = control_server_free(v->control);
        v->frontdoor = vhub_frontdoor_free(v->frontdoor);
        vhub_commit_done(&v->ctx);
        vhub_restart_free(v);
        /* a clean exit: the next start has nothing to restore */
        if (v->snap.fd >= 0)
                (void)vhub_fdstore_remove(v->fdstore, VHUB_SNAP_NAME_DAEMON);
        vhub_snap_file_close(&v->snap);
        /* last: every owner above has taken its fds out of the store */
        v->ctx.fdstore = NULL;
        if (vhub_fdstore_flush(v->fdstore, VHUBD_FDSTORE_FLUSH_MS) < 0)
                log_warning("the fd store did not take every removal before exit: the next start removes the rest");
        v->fdstore = vhub_fdstore_free(v->fdstore);
}
