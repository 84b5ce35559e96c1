/* SPDX-License-Identifier: MIT */
/* The fd store's groups (vhub-fdstore-internal.h): an owner's fds in one
 * stash, kept in line with its members (add/leave, compaction, the sweep). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include "vhub-fdstore-internal.h"
#include "vhub-log.h"
#include "vhub-time.h"
#include "vhu-fd.h"
#include "vhu-scm.h"

/* ---- groups: an owner's fds in one stash socket under one short name
 *
 * The members are sent (SCM_RIGHTS, in order) into one end of a fresh
 * SOCK_SEQPACKET socketpair, that end is closed, and the other -- whose
 * queue now holds them -- is what the manager stores under the group's
 * name.  LISTEN_FDNAMES then counts groups, not fds, and no two stored
 * fds are ever the same open file (systemd's same_fd() has nothing to
 * drop: an fd two owners share is simply in both stashes).  A change
 * marks the group dirty; the stash is rebuilt once, after the loop's
 * current callback (or at vhub_fdstore_sync()): removed, then pushed again.
 */

struct fds_group *fds_group_of(struct name_node *node) {
        return node ? (struct fds_group *)((char *)node - offsetof(struct fds_group, node)) : NULL;
}

struct fds_group *fds_group_find(const struct vhub_fdstore *s, const char *name) {
        return fds_group_of(fds_name_table_find(&s->groups, name));
}

int fds_group_new(struct vhub_fdstore *s, const char *name, struct fds_group **ret) {
        *ret = fds_name_table_new(&s->groups, sizeof(**ret), offsetof(struct fds_group, node),
                                  offsetof(struct fds_group, name), name);
        if (*ret)
                (*ret)->wend = -1;
        return *ret ? 0 : -ENOMEM;
}

/* g no longer follows its stash by appending: the writing end closed (a
 * stored stash keeps what was sent into it). */
static void group_cool(struct vhub_fdstore *s, struct fds_group *g) {
        if (g->wend < 0)
                return;
        TAILQ_REMOVE(&s->hot, g, hot_link);
        g->wend = vhu_safe_close(g->wend);
}

void fds_group_unlink_free(struct vhub_fdstore *s, struct fds_group *g) {
        group_cool(s, g);
        fds_name_table_unlink(&s->groups, &g->node);
        free(g->fds);
        free(g->keys);
        free(g->at);
        free(g);
}

static size_t fd_slot(int fd, size_t n_at) {
        return ((uint32_t)fd * 2654435761u) & (n_at - 1);
}

static void group_index_put(struct fds_group *g, size_t i) {
        size_t k = fd_slot(g->fds[i], g->n_at);

        while (g->at[k])
                k = (k + 1) & (g->n_at - 1);
        g->at[k] = (uint32_t)i + 1;
}

/* The index made again for the members as they are now (after a member
 * left: the later ones moved down).  Without memory for it the members are
 * searched one by one (group_pos()). */
void fds_group_index(struct fds_group *g) {
        size_t n_at = g->n_at ? g->n_at : 16;

        while (n_at < 2 * g->n)
                n_at *= 2;
        if (n_at != g->n_at) {
                uint32_t *at = realloc(g->at, n_at * sizeof(*at));

                if (!at) {
                        free(g->at);
                        g->at = NULL;
                        g->n_at = 0;
                        return;
                }
                g->at = at;
                g->n_at = n_at;
        }
        memset(g->at, 0, g->n_at * sizeof(*g->at));
        for (size_t i = 0; i < g->n; i++)
                group_index_put(g, i);
}

/* Where fd is among g's members, or -1. */
static ssize_t group_pos(const struct fds_group *g, int fd) {
        if (!g->n_at) {
                for (size_t i = g->n; i > 0; i--)
                        if (g->fds[i - 1] == fd)
                                return (ssize_t)i - 1;
                return -1;
        }
        for (size_t k = fd_slot(fd, g->n_at); g->at[k]; k = (k + 1) & (g->n_at - 1))
                if (g->fds[g->at[k] - 1] == fd)
                        return (ssize_t)g->at[k] - 1;
        return -1;
}

static void sweep_arm(struct vhub_fdstore *s) {
        struct timeval tv = { 0, STASH_SWEEP_MS * 1000 };

        if (s->ev_sweep && !evtimer_pending(s->ev_sweep, NULL))
                evtimer_add(s->ev_sweep, &tv);
}

static void group_mark_dirty(struct vhub_fdstore *s, struct fds_group *g) {
        if (!g->dirty) {
                g->dirty = true;
                g->dirty_next = s->dirty;
                s->dirty = g;
        }
        if (s->ev_sync)
                event_active(s->ev_sync, EV_TIMEOUT, 0);
}

/* Send fds into a stash's writing end, VHU_SCM_MAX_FDS a message: the
 * number of messages, or -errno (EBADF: a member closed before it left the
 * group, the owner's bug; ETOOMANYREFS: the in-flight limit, RLIMIT_NOFILE
 * without CAP_SYS_RESOURCE; EAGAIN: the stash's queue is full). */
static int stash_send(int wend, const int *fds, size_t n_fds) {
        int msgs = 0;

        for (size_t i = 0; i < n_fds; i += VHU_SCM_MAX_FDS, msgs++) {
                VHU_SCM_BUF(control, VHU_SCM_MAX_FDS);
                size_t k = n_fds - i < VHU_SCM_MAX_FDS ? n_fds - i : VHU_SCM_MAX_FDS;
                char byte = 0;
                struct iovec iov = { &byte, 1 };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t n;

                vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds + i, k);
                do
                        n = sendmsg(wend, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                while (n < 0 && errno == EINTR);
                if (n != 1)
                        return n < 0 ? -errno : -EIO;
        }
        return msgs;
}

/* A stash holding the members: the end to store, or -errno; *ret_wend the
 * writing end (kept to append to), or -1 where appending is not used. */
static int group_make_stash(const struct vhub_fdstore *s, const struct fds_group *g, int *ret_wend) {
        int sv[2], r;

        *ret_wend = -1;
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
                return -errno;
        r = stash_send(sv[0], g->fds, g->n);
        if (r < 0) {
                vhu_safe_close(sv[0]);
                vhu_safe_close(sv[1]);
                return r;
        }
        if (s->exact_keys && s->ev_sweep)
                *ret_wend = sv[0];
        else
                vhu_safe_close(sv[0]);  /* the queue stays readable at the other end */
        return sv[1];
}

/* The name a group's members are stored under while its stash is rebuilt. */
void fds_group_alt_name(char buf[VHUB_FDSTORE_NAME_MAX + 1], const char *group) {
        snprintf(buf, VHUB_FDSTORE_NAME_MAX + 1, "%s%s", group, VHUB_FDSTORE_GROUP_ALT);
}

/* Before a rebuild removes g's stored stash: the members in a stash of
 * their own under the alternate name, so that the manager holds them at
 * every instant of the rebuild (FDSTOREREMOVE drops every fd of a name, so
 * the new stash cannot join the old one under the group's name; a crash
 * between the removal and the push lost the group -- a VM's guest memory).
 * The alternate's entry, stored (or queued), or NULL where there is no
 * room for one more (then the rebuild goes without). */
static struct fds_entry *group_store_alt(struct vhub_fdstore *s, const struct fds_group *g) {
        char name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *a;
        int fd, wend;

        fds_group_alt_name(name, g->name);
        if (!vhub_fdstore_name_valid(name) || s->n_stored >= s->max_fds ||
            s->names_bytes + strlen(name) + 1 > VHUB_FDSTORE_NAMES_BUDGET)
                return NULL;
        fd = group_make_stash(s, g, &wend);
        vhu_safe_close(wend);   /* nothing is appended to it: it goes right after */
        if (fd < 0)
                return NULL;
        if (fds_entry_new(s, name, -1, &a) < 0) {
                vhu_safe_close(fd);
                return NULL;
        }
        a->stash = true;
        fds_entry_store_fd(s, a, 0, fd);
        vhu_safe_close(fd);
        if (a->state != ENTRY_STORED) {
                fds_remove_internal(s, a, false);
                return NULL;
        }
        return a;
}

/* Bring g's stash in line with its members: remove the stored one, push a
 * new one (FDSTOREREMOVE drops every fd of the name: never both at once),
 * the members stored under the alternate name meanwhile.  An alternate
 * left by a rebuild whose push failed stays until one succeeds: it holds
 * the members' last stored copy. */
void fds_group_stash(struct vhub_fdstore *s, struct fds_group *g) {
        char alt_name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *e = fds_entry_find(s, g->name), *alt;
        /* a rebuild, not a first push (may_leave_dead()) */
        uint64_t rebuilt_usec = e ? vhub_now_usec() : 0;
        int fd = -1, wend = -1, r;

        group_cool(s, g);
        g->rebuild = false;
        g->unsent = g->dead = g->appends = 0;
        fds_group_alt_name(alt_name, g->name);
        alt = fds_entry_find(s, alt_name);
        if (!alt && e && g->n > 0 && e->stash && e->state == ENTRY_STORED && !e->pending)
                alt = group_store_alt(s, g);
        if (e)
                fds_remove_internal(s, e, true);
        if (g->n == 0) {
                if (alt)
                        fds_remove_internal(s, alt, true);
                fds_group_unlink_free(s, g);
                return;
        }
        r = fds_entry_new(s, g->name, -1, &e);
        if (r < 0) {
                log_warning("fd store: group %s not stored (%s): it will not survive a restart", g->name,
                            strerror(-r));
                return;
        }
        e->stash = true;
        fd = group_make_stash(s, g, &wend);
        if (fd < 0) {
                e->state = ENTRY_FAILED;
                s->n_failed++;
                s->stats.push_failures++;
                log_warning("fd store: group %s (%zu fds) not stored (%s): it will not survive a restart",
                            g->name, g->n, strerror(-fd));
                return;
        }
        fds_entry_store_fd(s, e, 0, fd);
        vhu_safe_close(fd);     /* the manager's now (or the queue's dup) */
        g->rebuilt_usec = rebuilt_usec;
        if (wend >= 0 && e->state == ENTRY_STORED) {
                g->wend = wend;
                TAILQ_INSERT_TAIL(&s->hot, g, hot_link);
                sweep_arm(s);
        } else {
                vhu_safe_close(wend);
        }
        /* the new stash is pushed (or queued: messages go in order): the
         * copy goes after it */
        if (alt && e->state == ENTRY_STORED)
                fds_remove_internal(s, alt, true);
}

/* Bring g's stored stash up to date by appending its new members, if it
 * can (see STASH_*): true, else the caller rebuilds it. */
static bool group_append(struct vhub_fdstore *s, struct fds_group *g) {
        struct fds_entry *e;
        int r;

        if (g->rebuild || g->wend < 0 || g->n == 0 || g->dead > STASH_DEAD_MAX ||
            g->appends >= STASH_APPENDS_MAX)
                return false;
        e = fds_entry_find(s, g->name);
        if (!e || !e->stash || e->state != ENTRY_STORED)
                return false;
        if (g->unsent == 0)
                return true;    /* removals only: they stay in the stash, dead */
        r = stash_send(g->wend, g->fds + g->n - g->unsent, g->unsent);
        if (r < 0)
                return false;   /* a message may have gone in: a rebuild is exact */
        g->appends += (size_t)r;
        g->unsent = 0;
        return true;
}

void vhub_fdstore_sync(struct vhub_fdstore *s) {
        struct fds_group *g;

        if (!vhub_fdstore_enabled(s))
                return;
        while ((g = s->dirty)) {
                s->dirty = g->dirty_next;
                g->dirty_next = NULL;
                g->dirty = false;
                if (!group_append(s, g))
                        fds_group_stash(s, g);
        }
}

void fds_sync_cb(evutil_socket_t fd, short what, void *userdata) {
        vhub_fdstore_sync(userdata);
}

/* g stops changing: its stash as one message of its members (a restart
 * peeks it and pushes nothing; a stash of several messages is read, and so
 * stored again, by every start), its writing end closed. */
static void group_settle(struct vhub_fdstore *s, struct fds_group *g) {
        if (g->appends > 0 || g->dead > 0)
                fds_group_stash(s, g);
        group_cool(s, g);
}

void vhub_fdstore_settle(struct vhub_fdstore *s) {
        struct fds_group *g;

        if (!vhub_fdstore_enabled(s))
                return;
        vhub_fdstore_sync(s);
        while ((g = TAILQ_FIRST(&s->hot)))
                group_settle(s, g);
}

void fds_sweep_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_fdstore *s = userdata;
        uint64_t now = vhub_now_usec();
        struct fds_group *g, *next;

        for (g = TAILQ_FIRST(&s->hot); g; g = next) {
                next = TAILQ_NEXT(g, hot_link);
                if (now - g->changed_usec >= STASH_IDLE_MS * 1000ull && !g->dirty) {
                        group_settle(s, g);
                } else if (g->dead > 0) {
                        /* compacted: what the dead fds hold goes now */
                        g->rebuild = true;
                        group_mark_dirty(s, g);
                }
        }
        vhub_fdstore_sync(s);
        /* a compaction keeps the writing end: the next sweep closes it */
        if (!TAILQ_EMPTY(&s->hot))
                sweep_arm(s);
}

/* Whether the kernel shows an eventfd's id (Linux >= 6.0): then every
 * member's identity key is exact, and a stash may hold dead fds. */
bool fds_eventfd_ids_shown(void) {
        struct vhub_fd_key key = { 0 };
        int fd = eventfd(0, EFD_CLOEXEC);
        bool shown;

        if (fd < 0)
                return false;
        shown = vhub_fd_key_of(fd, &key) == 0 && key.eventfd_id != 0;
        vhu_safe_close(fd);
        return shown;
}

/* 1 if a change of group can be made, 0 if there is no store to make it
 * in (names are checked all the same, so that a bad one shows in every
 * test), or -errno. */
static int group_check(const struct vhub_fdstore *s, const char *group, int fd) {
        if (!vhub_fdstore_name_valid(group) || fds_name_reserved(group))
                return -EINVAL;
        if (fd < 0)
                return -EBADF;
        return vhub_fdstore_enabled(s);
}

int vhub_fdstore_group_add(struct vhub_fdstore *s, const char *group, int fd) {
        struct fds_group *g;
        int r = group_check(s, group, fd);

        if (r <= 0)
                return r;
        if (!(g = fds_group_find(s, group))) {
                if (fds_entry_find(s, group))
                        return -EEXIST; /* a single fd's name */
                r = fds_group_new(s, group, &g);
                if (r < 0)
                        return r;
        }
        if (group_pos(g, fd) >= 0)
                return -EEXIST;
        if (g->n == g->cap) {
                size_t cap = g->cap ? g->cap * 2 : 4;
                int *p = reallocarray(g->fds, cap, sizeof(*p));
                struct vhub_fd_key *k = p ? reallocarray(g->keys, cap, sizeof(*k)) : NULL;

                if (p)
                        g->fds = p;
                if (!k) {
                        if (g->n == 0 && !g->dirty)
                                fds_group_unlink_free(s, g);
                        return -ENOMEM;
                }
                g->keys = k;
                g->cap = cap;
        }
        /* computed once, as it joins: a snapshot names it by this key */
        if (vhub_fd_key_of(fd, &g->keys[g->n]) < 0)
                g->keys[g->n] = (struct vhub_fd_key){ 0 };
        g->fds[g->n++] = fd;
        if (g->n_at >= 2 * g->n)
                group_index_put(g, g->n - 1);
        else
                fds_group_index(g);
        g->unsent++;
        g->changed_usec = vhub_now_usec();
        s->n_members++;
        s->stats.pushes++;
        group_mark_dirty(s, g);
        return 0;
}

/* A connected socket (not a listener: a back-end would go on connecting
 * to it, queued, until it closes), which shutdown() ends for its peer. */
static bool socket_connected(int fd) {
        int listening = 0;
        socklen_t len = sizeof(listening);

        return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && !listening;
}

/* Whether member i may stay in the stash as a dead fd when it leaves (see
 * STASH_*): no live member shares its key (a restore claims by key), and
 * not a socket -- its peer must see it close when the daemon closes it --
 * unless the owner closes it right after (closing) and it is connected:
 * the caller shuts it down, so its peer sees the end at once (a device's
 * connection and channel at its removal: no compaction per device.remove);
 * or unless the stash was rebuilt (not first pushed) less than
 * STASH_SWEEP_MS ago: then the sweep compacts it soon (a peer churning
 * sockets -- a VMM sending SET_BACKEND_REQ_FD, reconnecting -- had its
 * group rebuilt through the manager per socket; now once per sweep, or per
 * STASH_DEAD_MAX). */
static bool may_leave_dead(const struct vhub_fdstore *s, const struct fds_group *g, size_t i, bool closing) {
        struct stat st;

        if (g->wend < 0 || !s->exact_keys || fstat(g->fds[i], &st) < 0)
                return false;
        if (S_ISSOCK(st.st_mode) && !(closing && socket_connected(g->fds[i])) &&
            vhub_now_usec() - g->rebuilt_usec >= STASH_SWEEP_MS * 1000ull)
                return false;
        for (size_t j = 0; j < g->n; j++)
                if (j != i && g->keys[j].dev == g->keys[i].dev && g->keys[j].ino == g->keys[i].ino &&
                    g->keys[j].eventfd_id == g->keys[i].eventfd_id)
                        return false;
        return true;
}

static int group_leave(struct vhub_fdstore *s, const char *group, int fd, bool closing) {
        int r = group_check(s, group, fd);
        struct fds_group *g = r > 0 ? fds_group_find(s, group) : NULL;
        ssize_t at = g ? group_pos(g, fd) : -1;

        if (r <= 0)
                return r;
        if (at >= 0) {
                size_t i = (size_t)at;

                if (i >= g->n - g->unsent) {
                        g->unsent--;    /* never sent */
                } else if (may_leave_dead(s, g, i, closing)) {
                        /* the stash keeps the open file: its peer sees the
                         * end now, as the close would have shown it */
                        if (closing)
                                (void)shutdown(fd, SHUT_RDWR);
                        g->dead++;
                        sweep_arm(s);
                } else {
                        g->rebuild = true;
                }
                g->changed_usec = vhub_now_usec();
                /* the order is kept: it is the stash's, which a restore returns */
                memmove(g->fds + i, g->fds + i + 1, (g->n - i - 1) * sizeof(*g->fds));
                memmove(g->keys + i, g->keys + i + 1, (g->n - i - 1) * sizeof(*g->keys));
                g->n--;
                fds_group_index(g);
                s->n_members--;
                s->stats.removes++;
                group_mark_dirty(s, g);
                return 0;
        }
        return -ENOENT;
}

int vhub_fdstore_group_remove(struct vhub_fdstore *s, const char *group, int fd) {
        return group_leave(s, group, fd, false);
}

int vhub_fdstore_group_close(struct vhub_fdstore *s, const char *group, int fd) {
        return group_leave(s, group, fd, true);
}

int vhub_fdstore_group_key(const struct vhub_fdstore *s, const char *group, int fd,
                           struct vhub_fd_key *ret) {
        const struct fds_group *g = vhub_fdstore_enabled(s) && group ? fds_group_find(s, group) : NULL;
        ssize_t at = g ? group_pos(g, fd) : -1;

        if (at < 0)
                return -ENOENT;
        *ret = g->keys[at];
        return 0;
}

size_t vhub_fdstore_group_size(const struct vhub_fdstore *s, const char *group) {
        const struct fds_group *g = vhub_fdstore_enabled(s) && group ? fds_group_find(s, group) : NULL;

        return g ? g->n : 0;
}

int vhub_fd_key_of(int fd, struct vhub_fd_key *ret) {
        char path[64], line[128];
        struct stat st;
        FILE *f;

        if (fstat(fd, &st) < 0)
                return -errno;
        *ret = (struct vhub_fd_key){ .dev = (uint64_t)st.st_dev, .ino = (uint64_t)st.st_ino };
        /* only an anonymous inode (no file type: eventfds among them) needs
         * more: sockets, memfds and directories are told apart already */
        if ((st.st_mode & S_IFMT) != 0)
                return 0;
        /* every eventfd shares one anonymous inode: the kernel's own id
         * (Linux >= 6.0 shows "eventfd-id:") tells them apart */
        snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
        f = fopen(path, "re");
        if (!f)
                return 0;
        while (fgets(line, sizeof(line), f)) {
                unsigned long long id;

                if (sscanf(line, "eventfd-id: %llu", &id) == 1) {
                        ret->eventfd_id = (uint64_t)id + 1; /* 0 stays "none" */
                        break;
                }
        }
        fclose(f);
        return 0;
}
