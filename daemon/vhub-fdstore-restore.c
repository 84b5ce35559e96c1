/* SPDX-License-Identifier: MIT */
/* The fd store after a restart (vhub-fdstore-internal.h): LISTEN_FDS and
 * the stashes read back, taken by their new owners or dropped. */
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

#include "vhub-fdstore-internal.h"
#include "vhub-log.h"
#include "vhu-fd.h"
#include "vhu-scm.h"

/* ---- restore */

struct restore_entry {
        char *name;
        int fd;                 /* -1 once taken or closed */
        bool alias;             /* a dup made here for an alias name ... */
        size_t target;          /* ... of this entry's fd */
        bool duplicate;         /* a second fd under a name already seen */
        bool taken;
};

struct vhub_fdstore_restore {
        struct vhub_fdstore *store;     /* NULL: nothing is told to the manager */
        struct restore_entry *v;
        size_t n, cap;
        size_t *index;                  /* open addressing over v, by name; SIZE_MAX = empty */
        size_t n_index;
        unsigned short_of_fds;          /* groups take_group() had no fd numbers for */
        char first_short[32];           /* its name (a group name is shorter) */
};

static int restore_add(struct vhub_fdstore_restore *r, const char *name, int fd, size_t *ret) {
        char *copy;

        if (r->n == r->cap) {
                size_t cap = r->cap ? r->cap * 2 : 64;
                struct restore_entry *v = realloc(r->v, cap * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                r->v = v;
                r->cap = cap;
        }
        copy = strdup(name);
        if (!copy)
                return -ENOMEM;
        r->v[r->n] = (struct restore_entry) { .name = copy, .fd = fd };
        *ret = r->n++;
        return 0;
}

static size_t *restore_slot(const struct vhub_fdstore_restore *r, const char *name) {
        size_t i = fds_name_hash(name) & (r->n_index - 1);

        for (;; i = (i + 1) & (r->n_index - 1))
                if (r->index[i] == SIZE_MAX || strcmp(r->v[r->index[i]].name, name) == 0)
                        return &r->index[i];
}

static int restore_index(struct vhub_fdstore_restore *r, size_t want) {
        size_t n = 64;

        while (n < 2 * want)
                n *= 2;
        free(r->index);
        r->index = malloc(n * sizeof(*r->index));
        if (!r->index)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                r->index[i] = SIZE_MAX;
        r->n_index = n;
        for (size_t i = 0; i < r->n; i++) {
                size_t *slot = restore_slot(r, r->v[i].name);

                if (*slot == SIZE_MAX)
                        *slot = i;
                else
                        r->v[i].duplicate = true;
        }
        return 0;
}

static struct restore_entry *restore_find(const struct vhub_fdstore_restore *r, const char *name) {
        size_t *slot;

        if (!r->n_index)
                return NULL;
        slot = restore_slot(r, name);
        return *slot == SIZE_MAX ? NULL : &r->v[*slot];
}

static void restore_free(struct vhub_fdstore_restore *r) {
        for (size_t i = 0; i < r->n; i++) {
                r->v[i].fd = vhu_safe_close(r->v[i].fd);
                free(r->v[i].name);
        }
        free(r->v);
        free(r->index);
        free(r);
}

/* The store's own alias table came back: adopt it and add a dup of the
 * target's fd for every alias whose target was passed. */
static int restore_aliases(struct vhub_fdstore_restore *r, struct restore_entry *table) {
        struct vhub_fdstore *s = r->store;
        struct vhub_snap_doc doc;
        struct vhub_snap_iter it;
        struct vhub_snap_rec rec;
        const char *why = NULL;
        size_t len, first_new = r->n;
        void *buf = NULL;
        int k, ret;

        /* adopt takes what it is given: a copy, so that an unreadable table
         * stays in the map and finish() removes it as stale */
        ret = fcntl(table->fd, F_DUPFD_CLOEXEC, 3);
        ret = ret < 0 ? -errno : vhub_snap_file_adopt(ret, &s->alias_file, &why);
        if (ret < 0) {
                log_warning("fd store: alias table unreadable (%s): names sharing a file are lost",
                            why ? why : strerror(-ret));
                return 0;
        }
        table->taken = true; /* the store has its copy; the map's closes with the map */
        if (s->alias_file.newest < 0)
                return 0;
        ret = vhub_snap_file_read(s->alias_file.fd, &buf, &len, &why);
        if (ret >= 0)
                ret = vhub_snap_parse(buf, len, &doc, &why);
        if (ret < 0) {
                log_warning("fd store: alias table unreadable (%s): names sharing a file are lost", why);
                free(buf);
                return 0;
        }
        vhub_snap_doc_iter(&doc, &it);
        while ((k = vhub_snap_next(&it, &rec)) > 0) {
                char name[VHUB_FDSTORE_NAME_MAX + 1] = "", target[VHUB_FDSTORE_NAME_MAX + 1] = "";
                struct vhub_snap_iter in;
                struct vhub_snap_rec f;
                struct restore_entry *t;
                size_t idx, target_idx;
                int fd;

                if (rec.tag != TAG_ALIAS || vhub_snap_enter(&rec, &in) < 0)
                        continue;
                while (vhub_snap_next(&in, &f) > 0) {
                        if (f.tag == TAG_ALIAS_NAME)
                                (void) vhub_snap_get_fdname(&f, name, sizeof(name));
                        else if (f.tag == TAG_ALIAS_TARGET)
                                (void) vhub_snap_get_fdname(&f, target, sizeof(target));
                }
                t = restore_find(r, target);
                if (!*name || !t || t->duplicate || t->fd < 0 || restore_find(r, name) || fds_name_reserved(name))
                        continue;
                for (size_t i = first_new; i < r->n; i++)
                        if (strcmp(r->v[i].name, name) == 0)
                                goto next;
                target_idx = (size_t) (t - r->v);
                fd = fcntl(t->fd, F_DUPFD_CLOEXEC, 3);
                if (fd < 0 || restore_add(r, name, fd, &idx) < 0) {
                        vhu_safe_close(fd);
                        free(buf);
                        return -ENOMEM;
                }
                r->v[idx].alias = true;
                r->v[idx].target = target_idx;
        next:;
        }
        free(buf);
        return 0;
}

/* Track every passed name in the store, as if pushed (the manager holds
 * them); the file index is rebuilt at the next push. */
static int restore_register(struct vhub_fdstore_restore *r) {
        struct vhub_fdstore *s = r->store;

        for (size_t i = 0; i < r->n; i++) {
                struct restore_entry *re = &r->v[i];
                struct fds_entry *e;
                int k;

                if (re->duplicate || re->taken || re->alias || !vhub_fdstore_name_valid(re->name) ||
                    fds_entry_find(s, re->name))
                        continue;
                k = fds_entry_new(s, re->name, re->fd, &e);
                if (k < 0)
                        return k;
                fds_stored_add(s, e);
                s->files_valid = false;
        }
        if (s->alias_file.fd >= 0) {
                struct fds_entry *e;
                int k = fds_entry_new(s, VHUB_FDSTORE_ALIASES, s->alias_file.fd, &e);

                if (k < 0)
                        return k;
                fds_stored_add(s, e);
        }
        for (size_t i = 0; i < r->n; i++) {
                struct restore_entry *re = &r->v[i];
                struct fds_entry *e, *target;

                if (!re->alias || fds_entry_find(s, re->name))
                        continue;
                target = fds_entry_find(s, r->v[re->target].name);
                if (!target || target->state != ENTRY_STORED)
                        continue;
                if (fds_entry_new(s, re->name, re->fd, &e) < 0)
                        return -ENOMEM;
                fds_alias_attach(s, e, target);
        }
        return 0;
}

int vhub_fdstore_restore_from(struct vhub_fdstore *s, const int *fds, char *const *names, size_t n,
                              struct vhub_fdstore_restore **ret) {
        struct vhub_fdstore_restore *r;
        struct restore_entry *table = NULL;
        size_t table_idx = SIZE_MAX;
        int k;

        r = calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        r->store = vhub_fdstore_enabled(s) ? s : NULL;
        for (size_t i = 0; i < n; i++) {
                size_t idx;

                k = restore_add(r, names[i] ? names[i] : "", fds[i], &idx);
                if (k < 0)
                        goto fail;
        }
        k = restore_index(r, r->n);
        if (k < 0)
                goto fail;
        table = restore_find(r, VHUB_FDSTORE_ALIASES);
        table_idx = table ? (size_t) (table - r->v) : SIZE_MAX;
        if (r->store && table && r->store->alias_file.fd < 0) {
                k = restore_aliases(r, table);
                if (k >= 0)
                        k = restore_index(r, r->n);
                if (k >= 0)
                        k = restore_register(r);
                if (k < 0)
                        goto fail;
        } else if (r->store) {
                k = restore_register(r);
                if (k < 0)
                        goto fail;
        }
        *ret = r;
        return 0;
fail:
        /* the fds stay with the caller: nothing was closed, and the store
         * forgets what it registered */
        if (r->store) {
                for (size_t i = 0; i < r->n; i++) {
                        struct fds_entry *e = fds_entry_find(r->store, r->v[i].name);

                        if (e && !r->v[i].duplicate)
                                fds_remove_internal(r->store, e, false);
                }
                if (table_idx != SIZE_MAX && r->v[table_idx].taken)
                        vhub_snap_file_close(&r->store->alias_file);
        }
        for (size_t i = 0; i < r->n; i++)
                if (!r->v[i].alias)
                        r->v[i].fd = -1;
        restore_free(r);
        return k;
}

int vhub_fdstore_restore_from_env(struct vhub_fdstore *s, struct vhub_fdstore_restore **ret) {
        char **names = NULL;
        int *fds, n, r;

        n = sd_listen_fds_with_names(1, &names);
        if (n < 0)
                return n;
        fds = calloc(n > 0 ? (size_t) n : 1, sizeof(*fds));
        if (!fds) {
                r = -ENOMEM;
                goto out;
        }
        for (int i = 0; i < n; i++)
                fds[i] = SD_LISTEN_FDS_START + i;
        r = vhub_fdstore_restore_from(s, fds, names, (size_t) n, ret);
out:
        free(fds);
        if (names) {
                for (int i = 0; i < n; i++)
                        free(names[i]);
                free(names);
        }
        return r;
}

size_t vhub_fdstore_restore_count(const struct vhub_fdstore_restore *r) {
        size_t n = 0;

        for (size_t i = 0; i < r->n; i++)
                if (r->v[i].fd >= 0 && !r->v[i].taken)
                        n++;
        return n;
}

const char *vhub_fdstore_restore_name(const struct vhub_fdstore_restore *r, size_t i) {
        return i < r->n ? r->v[i].name : NULL;
}

int vhub_fdstore_take(struct vhub_fdstore_restore *r, const char *name) {
        struct restore_entry *re;

        if (!name || fds_name_reserved(name))
                return -ENOENT;
        re = restore_find(r, name);
        if (!re || re->taken || re->fd < 0)
                return -ENOENT;
        re->taken = true;
        return VHU_TAKE_FD(re->fd);
}

/* Every fd a stash holds, in order, into *ret (malloc()ed) and *ret_n;
 * the stash is closed.  -errno with nothing left open. */
static int stash_read(int stash, int **ret, size_t *ret_n) {
        size_t n = 0, cap = 0;
        int *v = NULL, k = 0;

        for (;;) {
                int fds[VHU_SCM_MAX_FDS];
                struct vhu_scm_received got;
                char byte;
                struct iovec iov = { &byte, 1 };
                ssize_t x = vhu_scm_recv(stash, &iov, 1, VHU_SCM_MAX_FDS, fds, VHU_SCM_MAX_FDS, &got);

                if (x == -EAGAIN || x == 0)
                        break;  /* every message read (the writing end is closed: EOF) */
                if (x < 0 || got.truncated) {
                        /* room was made for the most a message carries:
                         * the kernel had no fd numbers left for the rest */
                        vhu_close_many(fds, got.n_fds);
                        k = x < 0 ? (int)x : -EMFILE;
                        break;
                }
                if (n + got.n_fds > cap) {
                        size_t c = cap ? cap : 16;
                        int *p;

                        while (c < n + got.n_fds)
                                c *= 2;
                        p = reallocarray(v, c, sizeof(*v));
                        if (!p) {
                                vhu_close_many(fds, got.n_fds);
                                k = -ENOMEM;
                                break;
                        }
                        v = p;
                        cap = c;
                }
                memcpy(v + n, fds, got.n_fds * sizeof(*v));
                n += got.n_fds;
        }
        vhu_safe_close(stash);
        if (k < 0) {
                if (v)
                        vhu_close_many(v, n);
                free(v);
                return k;
        }
        *ret = v;
        *ret_n = n;
        return 0;
}

/* The fds of a stash holding one message (a group of up to
 * VHU_SCM_MAX_FDS fds), peeked: the message stays in the queue, which is
 * the manager's copy's too, so the stored group stays valid as it is and
 * a restart pushes nothing for it (with a thousand devices, re-storing
 * every group kept the manager busy for seconds after each start).  The
 * stash is closed.  -EAGAIN (stash still open) where the queue holds
 * another number of messages: the caller reads it. */
static int stash_peek(int stash, int **ret, size_t *ret_n) {
        VHU_SCM_BUF(control, VHU_SCM_MAX_FDS);
        char byte;
        struct iovec iov = { &byte, 1 };
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = control.buf,
                .msg_controllen = sizeof(control.buf),
        };
        struct cmsghdr *c;
        size_t n = 0;
        int queued = 0, *v;
        ssize_t x;

        /* SIOCINQ of a SOCK_SEQPACKET unix socket: every queued byte, one
         * a message here */
        if (ioctl(stash, SIOCINQ, &queued) < 0 || queued != 1)
                return -EAGAIN;
        do
                x = recvmsg(stash, &mh, MSG_PEEK | MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        while (x < 0 && errno == EINTR);
        if (x != 1)
                return -EAGAIN;
        c = CMSG_FIRSTHDR(&mh);
        if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        v = malloc((n ? n : 1) * sizeof(*v));
        if (!v || (mh.msg_flags & MSG_CTRUNC)) {
                /* truncated with room for the most a message carries: the
                 * kernel had no fd numbers left (the message stays queued) */
                if (n)
                        vhu_close_many((int *)(void *)CMSG_DATA(c), n);
                free(v);
                return v ? -EMFILE : -ENOMEM;
        }
        if (n)
                memcpy(v, CMSG_DATA(c), n * sizeof(*v));
        vhu_safe_close(stash);
        *ret = v;
        *ret_n = n;
        return 0;
}

/* Fd numbers this process may still open (0 if it cannot even tell). */
static size_t fds_free(void) {
        struct rlimit rl;
        struct dirent *de;
        size_t open_now = 0;
        DIR *d;

        if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
                return 0;
        d = opendir("/proc/self/fd");
        if (!d)
                return 0;
        while ((de = readdir(d)))
                open_now += de->d_name[0] != '.';
        closedir(d);
        return rl.rlim_cur > open_now ? (size_t)(rl.rlim_cur - open_now) : 0;
}

/* A stash of several messages is emptied as it is read, for the manager
 * too: read only if every fd it can hold gets a number, else a shortage
 * half-way through would lose the group. */
static int stash_read_all_or_nothing(int stash, int **ret, size_t *ret_n) {
        int queued = 0;

        if (ioctl(stash, SIOCINQ, &queued) < 0)
                queued = 1;
        if (fds_free() < (size_t)queued * VHU_SCM_MAX_FDS + 16) {
                vhu_safe_close(stash);  /* our copy: the manager's keeps the queue */
                return -EMFILE;
        }
        return stash_read(stash, ret, ret_n);
}

static void note_short_of_fds(struct vhub_fdstore_restore *r, const char *group) {
        if (r->short_of_fds++ == 0)
                snprintf(r->first_short, sizeof(r->first_short), "%s", group);
}

unsigned vhub_fdstore_restore_short_of_fds(const struct vhub_fdstore_restore *r, const char **ret_first) {
        if (ret_first)
                *ret_first = r->short_of_fds ? r->first_short : NULL;
        return r->short_of_fds;
}

/* A taken stash's entry: its fd is ours (closed), the name the manager's. */
static struct fds_entry *stash_entry_taken(struct vhub_fdstore *s, const char *name) {
        struct fds_entry *e = s ? fds_entry_find(s, name) : NULL;

        if (e) {
                e->stash = true;
                e->fd = -1;
        }
        return e;
}

/* The stash of group the earlier run stored last: the copy under the
 * alternate name where a crash cut a rebuild (fds_group_stash(): that copy is
 * pushed before the old stash is removed, and removed once the new one is
 * pushed, so it is never older than the group's own), the group's own
 * then dropped; else the group's own. */
static int take_group_stash(struct vhub_fdstore_restore *r, const char *group, bool *ret_alt) {
        char alt_name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *e;
        int alt, old;

        *ret_alt = false;
        fds_group_alt_name(alt_name, group);
        alt = vhub_fdstore_take(r, alt_name);
        if (alt < 0)
                return vhub_fdstore_take(r, group);
        log_info("fd store: group %s was being rebuilt when the earlier run stopped: its copy %s taken",
                 group, alt_name);
        *ret_alt = true;
        (void)stash_entry_taken(r->store, alt_name);
        old = vhub_fdstore_take(r, group);
        vhu_safe_close(old);    /* ours: the manager's goes with the name */
        e = old >= 0 ? stash_entry_taken(r->store, group) : NULL;
        if (e)
                fds_remove_internal(r->store, e, true);
        return alt;
}

/* The group is stored under its own name again (or queued, before this):
 * the alternate copy goes. */
static void alt_stash_done(struct vhub_fdstore *s, const char *group) {
        char alt_name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *e;

        fds_group_alt_name(alt_name, group);
        e = stash_entry_taken(s, alt_name);
        if (e)
                fds_remove_internal(s, e, true);
}

int vhub_fdstore_take_group(struct vhub_fdstore_restore *r, const char *group,
                            struct vhub_fdstore_member **ret, size_t *ret_n) {
        struct vhub_fdstore *s = r->store;
        struct vhub_fdstore_member *m;
        int stash, *fds = NULL, k;
        size_t n = 0;

        bool peeked, from_alt;

        stash = take_group_stash(r, group, &from_alt);
        if (stash < 0)
                return stash;
        k = stash_peek(stash, &fds, &n);
        peeked = k == 0;
        if (k == -EAGAIN)
                k = stash_read_all_or_nothing(stash, &fds, &n);
        else if (k < 0)
                vhu_safe_close(stash);
        if (k == -EMFILE || k == -ENFILE)
                note_short_of_fds(r, group);
        if (k < 0)
                return k;
        m = calloc(n ? n : 1, sizeof(*m));
        if (!m) {
                if (fds)
                        vhu_close_many(fds, n);
                free(fds);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++) {
                m[i].fd = fds[i];
                if (vhub_fd_key_of(fds[i], &m[i].key) < 0)
                        m[i].key = (struct vhub_fd_key){ 0 };
        }
        if (s) {
                /* a stash read (not peeked) is empty in the manager too (one
                 * socket, one queue): store the group again now, its members
                 * the caller's fds, which stay open under these numbers */
                struct fds_entry *e = fds_entry_find(s, group);
                struct fds_group *g = NULL;

                if (e) {
                        e->stash = true;
                        e->fd = -1;     /* read and closed */
                }
                if (fds_group_new(s, group, &g) < 0) {
                        if (e)
                                fds_remove_internal(s, e, true);
                        log_warning("fd store: group %s could not be stored again: it will not survive the next restart",
                                    group);
                } else if (n > 0 && !(g->keys = calloc(n, sizeof(*g->keys)))) {
                        fds_group_unlink_free(s, g);
                        if (e)
                                fds_remove_internal(s, e, true);
                        log_warning("fd store: group %s could not be stored again: it will not survive the next restart",
                                    group);
                } else {
                        for (size_t i = 0; i < n; i++)
                                g->keys[i] = m[i].key;
                        g->fds = fds;   /* the group takes the array */
                        fds = NULL;
                        g->n = g->cap = n;
                        fds_group_index(g);
                        s->n_members += n;
                        /* this group alone, now: other groups a restore
                         * changed wait for the loop (a start that gives up
                         * must not store them, vhub_fdstore_restore_give_up()) */
                        if (!peeked || !e || e->state != ENTRY_STORED)
                                fds_group_stash(s, g);
                }
                if (from_alt)
                        alt_stash_done(s, group);
        }
        free(fds);
        *ret = m;
        *ret_n = n;
        return 0;
}

int vhub_fdstore_drop_group(struct vhub_fdstore_restore *r, const char *group) {
        struct fds_entry *e;
        int stash = vhub_fdstore_take(r, group), *fds = NULL;
        size_t n = 0;

        if (stash < 0)
                return stash;
        if (stash_read(stash, &fds, &n) == 0 && fds)
                vhu_close_many(fds, n);
        free(fds);
        e = r->store ? fds_entry_find(r->store, group) : NULL;
        if (e) {
                e->stash = true;        /* its fd was the stash, closed above */
                e->fd = -1;
                fds_remove_internal(r->store, e, true);
        }
        return 0;
}

int vhub_fdstore_restore_finish(struct vhub_fdstore_restore *r) {
        struct vhub_fdstore *s = r->store;
        int stale = 0;

        /* untaken aliases first: dropping them moves no file */
        for (int pass = 0; pass < 2; pass++)
                for (size_t i = 0; i < r->n; i++) {
                        struct restore_entry *re = &r->v[i];
                        struct fds_entry *e;

                        if (re->taken || re->duplicate || re->fd < 0 || re->alias != (pass == 0))
                                continue;
                        log_info("fd store: %s was passed back but nothing claimed it: closed", re->name);
                        if (!re->alias)
                                stale++;
                        e = s ? fds_entry_find(s, re->name) : NULL;
                        if (e)
                                fds_remove_internal(s, e, true);
                        else if (s && vhub_fdstore_name_valid(re->name))
                                (void) fds_msg_send(s, NULL, -1, MSG_REMOVE, re->name);
                        re->fd = vhu_safe_close(re->fd);
                }
        /* the same name passed twice (a store that lost track): FDSTOREREMOVE
         * drops every fd of a name, so the claimed one is stored again */
        for (size_t i = 0; i < r->n; i++) {
                struct restore_entry *re = &r->v[i];
                struct fds_entry *e;

                if (!re->duplicate)
                        continue;
                stale++;
                log_warning("fd store: %s was passed back more than once: extra copies closed", re->name);
                e = s ? fds_entry_find(s, re->name) : NULL;
                if (e && e->state == ENTRY_STORED && !e->pending) {
                        int k = fds_msg_send(s, NULL, -1, MSG_REMOVE, re->name);

                        if (k >= 0)
                                k = fds_msg_send(s, e, e->fd, MSG_PUSH, e->name);
                        if (k < 0)
                                fds_entry_set_failed(s, e, k);
                }
                re->fd = vhu_safe_close(re->fd);
        }
        restore_free(r);
        return stale;
}

int vhub_fdstore_restore_give_up(struct vhub_fdstore_restore *r, int timeout_ms) {
        struct vhub_fdstore *s = r->store;
        struct fds_group *g;

        vhub_fdstore_restore_abort(r);
        if (!s)
                return 0;
        /* what the restore changed in its groups stays out of the store:
         * the manager keeps the earlier run's stashes as they were */
        while ((g = s->dirty)) {
                s->dirty = g->dirty_next;
                g->dirty_next = NULL;
                g->dirty = false;
        }
        /* what is queued: the stashes take_group() had to read, stored again */
        return vhub_fdstore_flush(s, timeout_ms);
}

void vhub_fdstore_restore_abort(struct vhub_fdstore_restore *r) {
        struct vhub_fdstore *s = r->store;

        /* forget what was registered for fds that go away with the map */
        for (size_t i = 0; s && i < r->n; i++) {
                struct restore_entry *re = &r->v[i];
                struct fds_entry *e;

                if (re->taken || re->duplicate || re->fd < 0)
                        continue;
                e = fds_entry_find(s, re->name);
                if (e)
                        fds_remove_internal(s, e, false);
        }
        restore_free(r);
}
