/* SPDX-License-Identifier: MIT */
/* The daemon's side of systemd's fd store: see vhub-fdstore.h and
 * docs/restart.md.  Here: the notify socket, push/remove, the queue and
 * aliases; the name tables and the file index are in vhub-fdstore-index.c,
 * groups in vhub-fdstore-group.c, the restore in vhub-fdstore-restore.c
 * (vhub-fdstore-internal.h: what they share). */
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "vhub-fdstore-internal.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhu-fd.h"
#include "vhu-scm.h"

bool vhub_fdstore_name_valid(const char *name) {
        size_t n = 0;

        if (!name || !*name)
                return false;
        for (const char *p = name; *p; p++, n++) {
                /* control characters would break the newline-separated message */
                if (*p < ' ' || *p >= 127 || *p == ':')
                        return false;
        }
        return n <= VHUB_FDSTORE_NAME_MAX;
}

/* ---- messages */

static void msg_free(struct fds_msg *m) {
        vhu_safe_close(m->fd);
        free(m);
}

static int sock_send(struct vhub_fdstore *s, const char *text, size_t len, int fd) {
        VHU_SCM_BUF(control, 1);
        struct iovec iov = { .iov_base = (void *) text, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

        if (fd >= 0)
                vhu_scm_attach(&mh, control.buf, sizeof(control.buf), &fd, 1);
        /* the manager learns our pid from SCM_CREDENTIALS, which the kernel
         * adds because its socket has SO_PASSCRED */
        for (;;) {
                if (sendmsg(s->sock, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0)
                        return 0;
                if (errno != EINTR)
                        return -errno;
        }
}

static bool send_again_later(int r) {
        return r == -EAGAIN || r == -ENOBUFS;
}

/* A STORED entry whose name has an owner counts for the owner's share. */
static void entry_count(struct vhub_fdstore *s, struct fds_entry *e) {
        uid_t uid;

        if (e->counted || !vhub_fdstore_share_owner(&s->share, e->name, &uid) ||
            vhub_fdstore_share_count(&s->share, uid, +1) < 0)
                return;
        e->counted = true;
        e->owner = uid;
}

void fds_stored_add(struct vhub_fdstore *s, struct fds_entry *e) {
        e->state = ENTRY_STORED;
        s->n_stored++;
        s->names_bytes += strlen(e->name) + 1;
        entry_count(s, e);
}

static void stored_del(struct vhub_fdstore *s, struct fds_entry *e) {
        s->n_stored--;
        s->names_bytes -= strlen(e->name) + 1;
        if (e->counted)
                (void)vhub_fdstore_share_count(&s->share, e->owner, -1);
        e->counted = false;
}

void fds_entry_set_failed(struct vhub_fdstore *s, struct fds_entry *e, int r) {
        if (e->state == ENTRY_STORED) {
                fds_files_remove(s, e);
                stored_del(s, e);
        }
        e->state = ENTRY_FAILED;
        s->n_failed++;
        s->stats.push_failures++;
        log_warning("fd store: %s not stored (%s): it will not survive a restart",
                    e->name, strerror(-r));
}

/* The queue's head went out (or failed for good): account for it. */
static void msg_done(struct vhub_fdstore *s, struct fds_msg *m, int r) {
        TAILQ_REMOVE(&s->queue, m, link);
        s->queued--;
        if (m->entry) {
                m->entry->pending = NULL;
                if (r < 0)
                        fds_entry_set_failed(s, m->entry, r);
        } else if (r < 0) {
                /* a stale name the next start removes */
                s->stats.remove_failures++;
                log_warning("fd store: could not send a removal (%s)", strerror(-r));
        }
        msg_free(m);
}

static void queue_drain(struct vhub_fdstore *s) {
        struct fds_msg *m;

        while ((m = TAILQ_FIRST(&s->queue))) {
                int r = sock_send(s, m->text, m->len, m->fd);

                if (send_again_later(r)) {
                        s->stats.send_retries++;
                        break;
                }
                msg_done(s, m, r);
        }
        if (TAILQ_FIRST(&s->queue) && s->ev_write)
                event_add(s->ev_write, NULL);
}

static void write_cb(evutil_socket_t fd, short what, void *userdata) {
        queue_drain(userdata);
}

/* Send now if nothing waits before it, else queue (with a dup of fd, so the
 * owner may close its own at any time).  0 sent or queued, or < 0. */
int fds_msg_send(struct vhub_fdstore *s, struct fds_entry *push_entry, int fd, enum msg_kind kind,
                 const char *name) {
        struct fds_msg *m;
        char text[VHUB_FDSTORE_NAME_MAX + 64];
        int len, r;

        /* FDPOLL=0: the daemon alone decides when a stored fd goes (systemd
         * would otherwise drop a back-end socket on its first hang-up) */
        if (kind == MSG_PUSH)
                len = snprintf(text, sizeof(text), "FDSTORE=1\nFDNAME=%s\nFDPOLL=0", name);
        else
                len = snprintf(text, sizeof(text), "FDSTOREREMOVE=1\nFDNAME=%s", name);
        if (len < 0 || (size_t) len >= sizeof(text))
                return -EINVAL;
        if (!TAILQ_FIRST(&s->queue)) {
                r = sock_send(s, text, (size_t) len, fd);
                if (!send_again_later(r))
                        return r;
                s->stats.send_retries++;
        }
        if (s->queued >= s->max_queue)
                return -ENOBUFS;
        m = malloc(sizeof(*m) + (size_t) len + 1);
        if (!m)
                return -ENOMEM;
        m->entry = push_entry;
        m->len = (size_t) len;
        memcpy(m->text, text, (size_t) len + 1);
        m->fd = -1;
        if (fd >= 0) {
                m->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
                if (m->fd < 0) {
                        r = -errno;
                        free(m);
                        return r;
                }
        }
        TAILQ_INSERT_TAIL(&s->queue, m, link);
        s->queued++;
        if (push_entry)
                push_entry->pending = m;
        if (s->ev_write)
                event_add(s->ev_write, NULL);
        return 0;
}

/* Hand e (a new primary whose file is not stored) to the manager: its own
 * fd, inserted at pos of the file index, or for a stash entry the stash
 * socket fd (which the manager alone keeps: the caller closes its copy). */
void fds_entry_store_fd(struct vhub_fdstore *s, struct fds_entry *e, size_t pos, int fd) {
        uid_t uid;
        int r;

        if (s->n_stored >= s->max_fds) {
                r = -EXFULL;    /* systemd would drop it silently */
                goto fail;
        }
        /* what an owner's calls were not refused for (a VM's regions, a
         * burst of connections before their groups were stored) still
         * stops at its share: the rest of the store stays everyone else's */
        if (vhub_fdstore_share_owner(&s->share, e->name, &uid) && vhub_fdstore_share_room(&s->share, uid, 1) < 0) {
                r = -EDQUOT;
                goto fail;
        }
        if (s->names_bytes + strlen(e->name) + 1 > VHUB_FDSTORE_NAMES_BUDGET) {
                r = -E2BIG;     /* the next exec would fail: LISTEN_FDNAMES too long */
                goto fail;
        }
        if (!e->stash) {
                r = fds_files_insert(s, e, pos);
                if (r < 0)
                        goto fail;
        }
        fds_stored_add(s, e);
        r = fds_msg_send(s, e, fd, MSG_PUSH, e->name);
        if (r < 0)
                fds_entry_set_failed(s, e, r);
        return;
fail:
        e->state = ENTRY_FAILED;
        s->n_failed++;
        s->stats.push_failures++;
        log_warning("fd store: %s not stored (%s): it will not survive a restart", e->name, strerror(-r));
}

static void entry_store(struct vhub_fdstore *s, struct fds_entry *e, size_t pos) {
        fds_entry_store_fd(s, e, pos, e->fd);
}

/* ---- the alias table */

static void aliases_write(struct vhub_fdstore *s) {
        struct vhub_snap_writer *w = &s->alias_writer;
        int r;

        if (s->alias_file.fd < 0) {
                struct fds_entry *e;
                bool same;
                size_t pos;

                if (s->n_aliases == 0)
                        return;
                r = vhub_snap_file_create(VHUB_FDSTORE_ALIASES, &s->alias_file);
                if (r >= 0)
                        r = fds_entry_new(s, VHUB_FDSTORE_ALIASES, s->alias_file.fd, &e);
                if (r >= 0)
                        r = fds_entry_inode(e);
                if (r >= 0)
                        r = fds_files_search(s, e->fd, e->dev, e->ino, &pos, &same);
                if (r < 0) {
                        s->alias_file_failed = true;
                        log_warning("fd store: no alias table (%s): shared fds will not survive a restart",
                                    strerror(-r));
                        return;
                }
                entry_store(s, e, pos);
        }
        vhub_snap_writer_reset(w);
        NAME_TABLE_FOREACH(&s->names, node) {
                        struct fds_entry *e = fds_entry_of(node);

                        if (e->state != ENTRY_ALIAS)
                                continue;
                        vhub_snap_begin(w, TAG_ALIAS);
                        vhub_snap_put_fdname(w, TAG_ALIAS_NAME, e->name);
                        vhub_snap_put_fdname(w, TAG_ALIAS_TARGET, e->primary->name);
                        vhub_snap_end(w);
                }
        r = vhub_snap_file_commit(&s->alias_file, w);
        s->alias_file_failed = r < 0;
        if (r < 0)
                log_warning("fd store: alias table not written (%s)", strerror(-r));
}

void fds_alias_attach(struct vhub_fdstore *s, struct fds_entry *e, struct fds_entry *primary) {
        e->state = ENTRY_ALIAS;
        e->primary = primary;
        e->alias_next = primary->first_alias;
        primary->first_alias = e;
        s->n_aliases++;
}

static void alias_detach(struct vhub_fdstore *s, struct fds_entry *e) {
        struct fds_entry **pp = &e->primary->first_alias;

        for (; *pp; pp = &(*pp)->alias_next)
                if (*pp == e) {
                        *pp = e->alias_next;
                        break;
                }
        e->primary = NULL;
        e->alias_next = NULL;
        s->n_aliases--;
}

/* ---- the public calls */

int vhub_fdstore_new(struct event_base *base, const struct vhub_fdstore_options *o,
                     struct vhub_fdstore **ret) {
        const char *path = o && o->notify_socket ? o->notify_socket : getenv("NOTIFY_SOCKET");
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct vhub_fdstore *s;
        const char *env_max;
        socklen_t salen;
        size_t n;
        int r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->sock = -1;
        s->alias_file.fd = -1;
        s->pid = getpid();
        s->files_valid = true;
        TAILQ_INIT(&s->queue);
        TAILQ_INIT(&s->hot);
        vhub_snap_writer_init(&s->alias_writer);
        s->max_queue = o && o->max_queue ? o->max_queue : VHUB_FDSTORE_DEFAULT_QUEUE;
        s->max_fds = VHUB_FDSTORE_DEFAULT_MAX;
        env_max = getenv("FDSTORE");
        if (o && o->max_fds)
                s->max_fds = o->max_fds;
        else if (env_max && atoi(env_max) > 0)
                s->max_fds = (unsigned) atoi(env_max);
        r = vhub_fdstore_share_init(&s->share, s->max_fds);
        if (r < 0) {
                vhub_snap_writer_done(&s->alias_writer);
                free(s);
                return r;
        }
        if ((o && o->disabled) || !path || !*path) {
                *ret = s;
                return 0;
        }

        n = strlen(path);
        if (path[0] == '@') {
                if (n > sizeof(sa.sun_path)) {
                        r = -EINVAL;
                        goto fail;
                }
                sa.sun_path[0] = 0;
                memcpy(sa.sun_path + 1, path + 1, n - 1);
                salen = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + n);
        } else if (path[0] == '/') {
                if (n >= sizeof(sa.sun_path)) {
                        r = -EINVAL;
                        goto fail;
                }
                memcpy(sa.sun_path, path, n);
                salen = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + n + 1);
        } else {
                r = -EAFNOSUPPORT;
                goto fail;
        }
        s->sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (s->sock < 0) {
                r = -errno;
                goto fail;
        }
        /* connected: a full manager queue makes the socket unwritable, so
         * the loop can wait for it (an unconnected sender can only retry) */
        if (connect(s->sock, (struct sockaddr *) &sa, salen) < 0) {
                r = -errno;
                goto fail;
        }
        if (syscall(SYS_kcmp, s->pid, s->pid, KCMP_FILE, s->sock, s->sock) != 0) {
                r = -EOPNOTSUPP;
                goto fail;
        }
        if (base) {
                s->ev_write = event_new(base, s->sock, EV_WRITE, write_cb, s);
                s->ev_sync = event_new(base, -1, 0, fds_sync_cb, s);
                s->ev_sweep = evtimer_new(base, fds_sweep_cb, s);
                if (!s->ev_write || !s->ev_sync || !s->ev_sweep) {
                        r = -ENOMEM;
                        goto fail;
                }
        }
        s->exact_keys = fds_eventfd_ids_shown();
        s->enabled = true;
        *ret = s;
        return 0;
fail:
        vhub_fdstore_free(s);
        return r;
}

struct vhub_fdstore *vhub_fdstore_free(struct vhub_fdstore *s) {
        struct fds_msg *m;

        if (!s)
                return NULL;
        while ((m = TAILQ_FIRST(&s->queue))) {
                TAILQ_REMOVE(&s->queue, m, link);
                msg_free(m);
        }
        NAME_TABLE_FOREACH(&s->names, node)
                free(fds_entry_of(node));
        free(s->names.buckets);
        free(s->files);
        NAME_TABLE_FOREACH(&s->groups, node) {
                struct fds_group *g = fds_group_of(node);

                vhu_safe_close(g->wend);
                free(g->fds);
                free(g->keys);
                free(g->at);
                free(g);
        }
        free(s->groups.buckets);
        vhub_event_freep(&s->ev_sync);
        vhub_event_freep(&s->ev_sweep);
        vhub_event_freep(&s->ev_write);
        s->sock = vhu_safe_close(s->sock);
        vhub_snap_file_close(&s->alias_file);
        vhub_snap_writer_done(&s->alias_writer);
        vhub_fdstore_share_done(&s->share);
        free(s);
        return NULL;
}

bool vhub_fdstore_enabled(const struct vhub_fdstore *s) {
        return s && s->enabled;
}

void vhub_fdstore_foreach_fd(const struct vhub_fdstore *s,
                             void (*fn)(int fd, const char *what, const char *stored_as, void *userdata),
                             void *userdata) {
        const struct fds_group *g;
        const struct fds_msg *m;

        if (!s)
                return;
        if (s->sock >= 0)
                fn(s->sock, "notify", NULL, userdata);
        TAILQ_FOREACH(m, &s->queue, link)
                if (m->fd >= 0)
                        fn(m->fd, "queued", NULL, userdata);
        if (s->alias_file.fd >= 0)
                fn(s->alias_file.fd, "aliases", VHUB_FDSTORE_ALIASES, userdata);
        TAILQ_FOREACH(g, &s->hot, hot_link)
                fn(g->wend, "stash", NULL, userdata);
}

static int push_internal(struct vhub_fdstore *s, int fd, const char *name) {
        struct fds_entry *e;
        struct stat st;
        size_t pos;
        bool same;
        int r;

        if (!vhub_fdstore_name_valid(name))
                return -EINVAL;
        if (fd < 0)
                return -EBADF;
        if (fds_entry_find(s, name) || fds_group_find(s, name))
                return -EEXIST;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!s->files_valid) {
                r = fds_files_rebuild(s);
                if (r < 0)
                        return r;
        }
        r = fds_files_search(s, fd, st.st_dev, st.st_ino, &pos, &same);
        if (r < 0)
                return r;
        r = fds_entry_new(s, name, fd, &e);
        if (r < 0)
                return r;
        e->dev = st.st_dev;
        e->ino = st.st_ino;
        e->have_inode = true;
        s->stats.pushes++;
        if (same) {
                fds_alias_attach(s, e, s->files[pos]);
                aliases_write(s);
                return 1;
        }
        entry_store(s, e, pos);
        return 0;
}

int vhub_fdstore_push(struct vhub_fdstore *s, int fd, const char *name) {
        /* names are checked even without a manager, so that a bad one shows
         * in every test, not only under systemd */
        if (!vhub_fdstore_name_valid(name) || fds_name_reserved(name))
                return -EINVAL;
        if (fd < 0)
                return -EBADF;
        if (!vhub_fdstore_enabled(s))
                return 0;
        return push_internal(s, fd, name);
}

/* A primary leaves: its file goes to one of its aliases, if any. */
static void primary_drop(struct vhub_fdstore *s, struct fds_entry *e, bool tell_manager) {
        struct fds_entry *heir = e->first_alias;

        if (e->state == ENTRY_STORED) {
                fds_files_remove(s, e);
                stored_del(s, e);
                if (e->pending) {
                        /* never sent: nothing to remove */
                        TAILQ_REMOVE(&s->queue, e->pending, link);
                        s->queued--;
                        msg_free(e->pending);
                        e->pending = NULL;
                } else if (tell_manager && fds_msg_send(s, NULL, -1, MSG_REMOVE, e->name) < 0) {
                        s->stats.remove_failures++;
                        log_warning("fd store: could not remove %s: it stays stale until the next start",
                                    e->name);
                }
        } else if (e->state == ENTRY_FAILED)
                s->n_failed--;
        if (!heir)
                return;
        /* the heir becomes the stored one; the other aliases follow it */
        if (fds_entry_inode(heir) < 0)
                s->files_valid = false;
        alias_detach(s, heir);
        for (struct fds_entry *a; (a = e->first_alias);) {
                alias_detach(s, a);
                fds_alias_attach(s, a, heir);
        }
        if (e->state == ENTRY_FAILED || !tell_manager) {
                if (e->state == ENTRY_FAILED) {
                        heir->state = ENTRY_FAILED;
                        s->n_failed++;
                } else {
                        /* forgetting (restore abort): keep the index honest */
                        fds_stored_add(s, heir);
                        s->files_valid = false;
                }
        } else {
                size_t pos;
                bool same;

                if (s->files_valid && fds_files_search(s, heir->fd, heir->dev, heir->ino, &pos, &same) >= 0)
                        entry_store(s, heir, pos);
                else {
                        s->files_valid = false;
                        entry_store(s, heir, 0);
                }
        }
        aliases_write(s);
}

int fds_remove_internal(struct vhub_fdstore *s, struct fds_entry *e, bool tell_manager) {
        if (e->state == ENTRY_ALIAS) {
                alias_detach(s, e);
                fds_entry_unlink_free(s, e);
                aliases_write(s);
                return 0;
        }
        primary_drop(s, e, tell_manager);
        fds_entry_unlink_free(s, e);
        return 0;
}

int vhub_fdstore_remove(struct vhub_fdstore *s, const char *name) {
        struct fds_entry *e;

        if (!vhub_fdstore_enabled(s))
                return 0;
        if (!name || fds_name_reserved(name))
                return -EINVAL;
        e = fds_entry_find(s, name);
        if (!e)
                return -ENOENT;
        s->stats.removes++;
        return fds_remove_internal(s, e, true);
}

int vhub_fdstore_own(struct vhub_fdstore *s, const char *name, uid_t uid) {
        struct fds_entry *e;
        int r;

        if (!vhub_fdstore_enabled(s))
                return 0;
        r = vhub_fdstore_share_own(&s->share, name, uid);
        if (r < 0)
                return r;
        /* stored before its owner came back (a restart): counted now */
        e = fds_entry_find(s, name);
        if (e && e->state == ENTRY_STORED)
                entry_count(s, e);
        return 0;
}

bool vhub_fdstore_held(const struct vhub_fdstore *s, const char *name) {
        const struct fds_entry *e = vhub_fdstore_enabled(s) ? fds_entry_find(s, name) : NULL;

        return e && e->state == ENTRY_STORED && !e->pending;
}

unsigned vhub_fdstore_room(const struct vhub_fdstore *s) {
        return s->n_stored < s->max_fds ? (unsigned)(s->max_fds - s->n_stored) : 0;
}

void vhub_fdstore_disown(struct vhub_fdstore *s, const char *name) {
        if (vhub_fdstore_enabled(s))
                vhub_fdstore_share_disown(&s->share, name);
}

int vhub_fdstore_share_check(const struct vhub_fdstore *s, uid_t uid, unsigned n) {
        return vhub_fdstore_enabled(s) ? vhub_fdstore_share_room(&s->share, uid, n) : 0;
}

unsigned vhub_fdstore_stored_by(const struct vhub_fdstore *s, uid_t uid) {
        return vhub_fdstore_enabled(s) ? vhub_fdstore_share_stored(&s->share, uid) : 0;
}

void vhub_fdstore_share_limits(const struct vhub_fdstore *s, unsigned *per_uid, unsigned *non_root) {
        *per_uid = s->share.per_uid;
        *non_root = s->share.non_root;
}

bool vhub_fdstore_contains(const struct vhub_fdstore *s, const char *name) {
        return vhub_fdstore_enabled(s) && name && fds_entry_find(s, name);
}

bool vhub_fdstore_degraded(const struct vhub_fdstore *s) {
        if (!vhub_fdstore_enabled(s))
                return false;
        return s->n_failed > 0 || (s->alias_file_failed && s->n_aliases > 0);
}

void vhub_fdstore_get_stats(const struct vhub_fdstore *s, struct vhub_fdstore_stats *ret) {
        *ret = (struct vhub_fdstore_stats) { 0 };
        if (!s)
                return;
        *ret = s->stats;
        ret->names = s->names.n;
        ret->names_bytes = s->names_bytes;
        ret->stored = s->n_stored;
        ret->aliases = s->n_aliases;
        ret->failed = s->n_failed;
        ret->queued = s->queued;
        ret->groups = s->groups.n;
        ret->group_members = s->n_members;
}

int vhub_fdstore_flush(struct vhub_fdstore *s, int timeout_ms) {
        struct timespec start, now;

        if (!vhub_fdstore_enabled(s))
                return 0;
        vhub_fdstore_sync(s);
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (;;) {
                struct pollfd p = { .fd = s->sock, .events = POLLOUT };
                long left;

                queue_drain(s);
                if (!TAILQ_FIRST(&s->queue))
                        return 0;
                clock_gettime(CLOCK_MONOTONIC, &now);
                left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 +
                                     (now.tv_nsec - start.tv_nsec) / 1000000);
                if (left <= 0)
                        return -ETIMEDOUT;
                if (poll(&p, 1, (int) left) < 0 && errno != EINTR)
                        return -errno;
        }
}
