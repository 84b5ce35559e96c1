/* SPDX-License-Identifier: MIT */
/* The daemon's side of systemd's fd store: see vhub-fdstore.h and
 * docs/restart.md. */
#include <errno.h>
#include <event2/event.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/queue.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "vhub-fdstore.h"
#include "vhub-fdstore-share.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-snapshot.h"
#include "vhub-time.h"
#include "vhu-fd.h"
#include "vhu-scm.h"

/* the alias table's records (in "fdstore/aliases") */
enum {
        TAG_ALIAS = 1,          /* nest: one alias */
        TAG_ALIAS_NAME = 1,     /* fdname: the alias */
        TAG_ALIAS_TARGET = 2,   /* fdname: the stored name it shares a file with */
};

enum entry_state {
        ENTRY_STORED,   /* the manager holds it, or will once its message leaves the queue */
        ENTRY_ALIAS,    /* its file is stored under entry->primary's name */
        ENTRY_FAILED,   /* the manager does not hold it */
};

/* A hash table of names whose nodes live in what they name (an entry, a
 * group): one implementation for both. */
struct name_node {
        struct name_node *hnext;
        uint32_t hash;
        const char *name;                       /* the container's */
};

struct name_table {
        struct name_node **buckets;
        size_t n_buckets, n;
};

#define NAME_TABLE_FOREACH(t, node)                                                              \
        for (size_t _b = 0; _b < (t)->n_buckets; _b++)                                           \
                for (struct name_node *node = (t)->buckets[_b], *_next;                          \
                     node && ((_next = node->hnext), true); node = _next)

struct fds_msg;

struct fds_entry {
        struct name_node node;                  /* in s->names */
        bool stash;                             /* a group's stash socket: the manager's
                                                 * alone (fd -1), in no file index */
        struct fds_entry *primary;              /* ENTRY_ALIAS: whose file it shares */
        struct fds_entry *first_alias;          /* a primary's aliases ... */
        struct fds_entry *alias_next;           /* ... chained here */
        struct fds_msg *pending;                /* its FDSTORE=1 still queued */
        int fd;                                 /* the owner's number (borrowed) */
        bool have_inode;
        dev_t dev;
        ino_t ino;
        enum entry_state state;
        bool counted;                           /* STORED: counts for owner's share */
        uid_t owner;
        char name[];
};

struct fds_msg {
        TAILQ_ENTRY(fds_msg) link;
        struct fds_entry *entry;        /* a push: marked stored once sent */
        int fd;                         /* a push: our own dup, closed once sent */
        size_t len;
        char text[];
};

TAILQ_HEAD(fds_queue, fds_msg);

/*
 * How a stored stash follows its group's changes without the manager (each
 * message to it wakes it, and a rebuild is three datagrams' worth of work):
 * the stash's writing end is kept while the group changes, and a member
 * added is sent into it (one sendmsg()); a member removed stays in the
 * stash as a dead one (nothing sent: a restore closes what no snapshot
 * claims), unless it is a socket, whose peer must see it close now (or
 * by the sweep, if the stash was rebuilt less than STASH_SWEEP_MS ago: a
 * peer churning sockets costs a rebuild a sweep, not one a socket).  The
 * stash is compacted -- rebuilt with the members alone, as before -- once
 * it holds STASH_DEAD_MAX dead fds or STASH_APPENDS_MAX appended messages,
 * and by the sweep, STASH_SWEEP_MS after a removal (what a dead fd holds,
 * guest memory, is let go soon); a group unchanged for STASH_IDLE_MS is
 * settled -- compacted into one message if it was appended to, its
 * writing end closed -- and a planned restart settles every group
 * (vhub_fdstore_settle()): a start peeks a stash of one message and pushes
 * nothing, where one of several is read and stored again.  Only where every fd's identity key
 * is exact (the kernel shows eventfd ids): a restore tells the live
 * members from the dead ones by key, no longer by their order.
 */
#define STASH_DEAD_MAX     32u
#define STASH_APPENDS_MAX  32u
#define STASH_SWEEP_MS     250u
#define STASH_IDLE_MS      1000u

/* A group: the fds of one owner object, stored as one stash socket under
 * the group's name (docs/restart.md, "Groups"). */
struct fds_group {
        struct name_node node;          /* in s->groups */
        struct fds_group *dirty_next;   /* on s->dirty while its stash is out of date */
        bool dirty;
        bool rebuild;                   /* the next sync rebuilds the stash */
        int *fds;                       /* the members: their owners' numbers (borrowed) */
        struct vhub_fd_key *keys;       /* each member's identity, for the snapshot */
        size_t n, cap;
        /* fd -> its position + 1 (0: empty), open addressing, n_at a power
         * of two at least twice n (0: none, the members are searched): a
         * VM's group holds its devices' fds too, and each commit of the VM
         * looks every one of them up (vhub_fdstore_group_key()) */
        uint32_t *at;
        size_t n_at;
        int wend;                       /* the stored stash's writing end, or -1 */
        size_t unsent;                  /* the last members, not in the stash yet */
        size_t dead;                    /* fds in the stash that are members no more */
        size_t appends;                 /* messages sent into the stash since it was built */
        uint64_t changed_usec;          /* its last change (the sweep) */
        uint64_t rebuilt_usec;          /* its stash's last rebuild (0: first pushed as it is) */
        TAILQ_ENTRY(fds_group) hot_link; /* on s->hot while it keeps wend */
        char name[];
};

TAILQ_HEAD(fds_group_list, fds_group);

struct vhub_fdstore {
        bool enabled;
        int sock;
        pid_t pid;
        struct event *ev_write;
        struct fds_queue queue;
        size_t queued, max_queue;
        unsigned max_fds;

        struct name_table names;                /* fds_entry: every tracked name */

        /* STORED primaries sorted by (dev, ino, kcmp order): finding the
         * stored entry of an fd's open file costs O(log n) */
        struct fds_entry **files;
        size_t n_files, cap_files;
        bool files_valid;

        size_t n_stored, n_aliases, n_failed;
        size_t names_bytes;                     /* sum of (name + ':') over STORED entries */
        struct vhub_fdstore_stats stats;
        struct vhub_fdstore_share share;        /* each uid's part of max_fds */

        struct vhub_snap_file alias_file;       /* fd < 0 until the first alias */
        struct vhub_snap_writer alias_writer;
        bool alias_file_failed;

        struct name_table groups;               /* fds_group */
        size_t n_members;
        struct fds_group *dirty;                /* stashes to rebuild at the next sync */
        struct event *ev_sync;                  /* activated when a group changes */
        bool exact_keys;                        /* eventfds have ids: stashes may hold dead fds */
        struct fds_group_list hot;              /* groups keeping their stash's writing end */
        struct event *ev_sweep;                 /* compacts them, closes idle writing ends */
};

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

static bool name_reserved(const char *name) {
        return strncmp(name, VHUB_FDSTORE_RESERVED, strlen(VHUB_FDSTORE_RESERVED)) == 0;
}

static uint32_t name_hash(const char *name) {
        uint32_t h = 2166136261u;

        for (; *name; name++)
                h = (h ^ (uint8_t) *name) * 16777619u;
        return h;
}

/* ---- the name tables */

static struct name_node *name_table_find(const struct name_table *t, const char *name) {
        uint32_t h;

        if (!t->n_buckets)
                return NULL;
        h = name_hash(name);
        for (struct name_node *n = t->buckets[h & (t->n_buckets - 1)]; n; n = n->hnext)
                if (n->hash == h && strcmp(n->name, name) == 0)
                        return n;
        return NULL;
}

/* Room for one more node (the table doubles at one node per bucket). */
static int name_table_reserve(struct name_table *t) {
        size_t n = t->n_buckets ? t->n_buckets * 2 : 256;
        struct name_node **b;

        if (t->n < t->n_buckets)
                return 0;
        b = calloc(n, sizeof(*b));
        if (!b)
                return -ENOMEM;
        NAME_TABLE_FOREACH(t, node) {
                node->hnext = b[node->hash & (n - 1)];
                b[node->hash & (n - 1)] = node;
        }
        free(t->buckets);
        t->buckets = b;
        t->n_buckets = n;
        return 0;
}

/* After name_table_reserve(). */
static void name_table_link(struct name_table *t, struct name_node *node, const char *name) {
        node->name = name;
        node->hash = name_hash(name);
        node->hnext = t->buckets[node->hash & (t->n_buckets - 1)];
        t->buckets[node->hash & (t->n_buckets - 1)] = node;
        t->n++;
}

static void name_table_unlink(struct name_table *t, struct name_node *node) {
        for (struct name_node **pp = &t->buckets[node->hash & (t->n_buckets - 1)]; *pp; pp = &(*pp)->hnext)
                if (*pp == node) {
                        *pp = node->hnext;
                        t->n--;
                        return;
                }
}

/* A new container of `size` bytes whose name (a flexible array at
 * name_at) is name, zeroed and linked into t through its node at node_at;
 * NULL when out of memory. */
static void *name_table_new(struct name_table *t, size_t size, size_t node_at, size_t name_at,
                            const char *name) {
        size_t len = strlen(name);
        char *p;

        if (name_table_reserve(t) < 0 || !(p = calloc(1, size + len + 1)))
                return NULL;
        memcpy(p + name_at, name, len + 1);
        name_table_link(t, (struct name_node *)(p + node_at), p + name_at);
        return p;
}

static struct fds_entry *entry_of(struct name_node *node) {
        return node ? (struct fds_entry *)((char *)node - offsetof(struct fds_entry, node)) : NULL;
}

static struct fds_entry *entry_find(const struct vhub_fdstore *s, const char *name) {
        return entry_of(name_table_find(&s->names, name));
}

static int entry_new(struct vhub_fdstore *s, const char *name, int fd, struct fds_entry **ret) {
        struct fds_entry *e = name_table_new(&s->names, sizeof(*e), offsetof(struct fds_entry, node),
                                             offsetof(struct fds_entry, name), name);

        if (!e)
                return -ENOMEM;
        e->fd = fd;
        *ret = e;
        return 0;
}

static void entry_unlink_free(struct vhub_fdstore *s, struct fds_entry *e) {
        name_table_unlink(&s->names, &e->node);
        free(e);
}

/* ---- the file index */

static int entry_inode(struct fds_entry *e) {
        struct stat st;

        if (e->have_inode)
                return 0;
        if (fstat(e->fd, &st) < 0)
                return -errno;
        e->dev = st.st_dev;
        e->ino = st.st_ino;
        e->have_inode = true;
        return 0;
}

/* Order of (fd's file) against b's: *ret < 0, 0 (the same open file), > 0. */
static int file_cmp(const struct vhub_fdstore *s, int fd, dev_t dev, ino_t ino,
                     const struct fds_entry *b, int *ret) {
        long r;

        if (dev != b->dev) {
                *ret = dev < b->dev ? -1 : 1;
                return 0;
        }
        if (ino != b->ino) {
                *ret = ino < b->ino ? -1 : 1;
                return 0;
        }
        /* same inode (all eventfds share one): only the kernel can tell
         * whether it is the same open file, as systemd's same_fd() asks */
        r = syscall(SYS_kcmp, s->pid, s->pid, KCMP_FILE, fd, b->fd);
        if (r < 0)
                return -errno;
        *ret = r == 0 ? 0 : r == 1 ? -1 : 1;
        return 0;
}

/* The first index whose file is not below fd's; *ret_same if it is fd's. */
static int files_search(const struct vhub_fdstore *s, int fd, dev_t dev, ino_t ino,
                        size_t *ret_pos, bool *ret_same) {
        size_t lo = 0, hi = s->n_files;
        bool same = false;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                int c = 0, r = file_cmp(s, fd, dev, ino, s->files[mid], &c);

                if (r < 0)
                        return r;
                if (c > 0)
                        lo = mid + 1;
                else {
                        hi = mid;
                        same = c == 0;
                }
        }
        *ret_pos = lo;
        *ret_same = same && lo < s->n_files;
        return 0;
}

static int files_reserve(struct vhub_fdstore *s, size_t n) {
        struct fds_entry **f;
        size_t cap;

        if (n <= s->cap_files)
                return 0;
        cap = s->cap_files ? s->cap_files : 64;
        while (cap < n)
                cap *= 2;
        f = realloc(s->files, cap * sizeof(*f));
        if (!f)
                return -ENOMEM;
        s->files = f;
        s->cap_files = cap;
        return 0;
}

static int files_merge(const struct vhub_fdstore *s, struct fds_entry **a, struct fds_entry **tmp,
                       size_t lo, size_t mid, size_t hi) {
        size_t i = lo, j = mid, k = lo;

        while (i < mid && j < hi) {
                int c = 0, r = file_cmp(s, a[i]->fd, a[i]->dev, a[i]->ino, a[j], &c);

                if (r < 0)
                        return r;
                tmp[k++] = c <= 0 ? a[i++] : a[j++];
        }
        while (i < mid)
                tmp[k++] = a[i++];
        while (j < hi)
                tmp[k++] = a[j++];
        memcpy(a + lo, tmp + lo, (hi - lo) * sizeof(*a));
        return 0;
}

/* Build the index from every STORED primary (after a restore registered
 * thousands at once: one sort instead of one insertion each). */
static int files_rebuild(struct vhub_fdstore *s) {
        struct fds_entry **tmp;
        size_t n = 0;
        int r;

        r = files_reserve(s, s->n_stored + 1);
        if (r < 0)
                return r;
        NAME_TABLE_FOREACH(&s->names, node) {
                        struct fds_entry *e = entry_of(node);

                        if (e->state != ENTRY_STORED || e->stash)
                                continue;
                        r = entry_inode(e);
                        if (r < 0) {
                                log_error("fd store: %s (fd %d): %s (closed before it was removed?)",
                                          e->name, e->fd, strerror(-r));
                                return r;
                        }
                        s->files[n++] = e;
                }
        tmp = malloc((n ? n : 1) * sizeof(*tmp));
        if (!tmp)
                return -ENOMEM;
        for (size_t width = 1; width < n; width *= 2)
                for (size_t lo = 0; lo + width < n; lo += 2 * width) {
                        size_t hi = lo + 2 * width < n ? lo + 2 * width : n;

                        r = files_merge(s, s->files, tmp, lo, lo + width, hi);
                        if (r < 0) {
                                free(tmp);
                                return r;
                        }
                }
        free(tmp);
        s->n_files = n;
        s->files_valid = true;
        return 0;
}

static int files_insert(struct vhub_fdstore *s, struct fds_entry *e, size_t pos) {
        int r = files_reserve(s, s->n_files + 1);

        if (r < 0)
                return r;
        memmove(s->files + pos + 1, s->files + pos, (s->n_files - pos) * sizeof(*s->files));
        s->files[pos] = e;
        s->n_files++;
        return 0;
}

static void files_remove(struct vhub_fdstore *s, struct fds_entry *e) {
        size_t pos = s->n_files;
        bool same = false;

        if (!s->files_valid || e->stash)
                return;
        if (files_search(s, e->fd, e->dev, e->ino, &pos, &same) < 0 || !same || s->files[pos] != e)
                for (pos = 0; pos < s->n_files && s->files[pos] != e; pos++)
                        ;
        if (pos == s->n_files)
                return;
        memmove(s->files + pos, s->files + pos + 1, (s->n_files - pos - 1) * sizeof(*s->files));
        s->n_files--;
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

static void stored_add(struct vhub_fdstore *s, struct fds_entry *e) {
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

static void entry_set_failed(struct vhub_fdstore *s, struct fds_entry *e, int r) {
        if (e->state == ENTRY_STORED) {
                files_remove(s, e);
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
                        entry_set_failed(s, m->entry, r);
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
enum msg_kind { MSG_PUSH, MSG_REMOVE };

static int msg_send(struct vhub_fdstore *s, struct fds_entry *push_entry, int fd, enum msg_kind kind,
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
static void entry_store_fd(struct vhub_fdstore *s, struct fds_entry *e, size_t pos, int fd) {
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
                r = files_insert(s, e, pos);
                if (r < 0)
                        goto fail;
        }
        stored_add(s, e);
        r = msg_send(s, e, fd, MSG_PUSH, e->name);
        if (r < 0)
                entry_set_failed(s, e, r);
        return;
fail:
        e->state = ENTRY_FAILED;
        s->n_failed++;
        s->stats.push_failures++;
        log_warning("fd store: %s not stored (%s): it will not survive a restart", e->name, strerror(-r));
}

static void entry_store(struct vhub_fdstore *s, struct fds_entry *e, size_t pos) {
        entry_store_fd(s, e, pos, e->fd);
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
                        r = entry_new(s, VHUB_FDSTORE_ALIASES, s->alias_file.fd, &e);
                if (r >= 0)
                        r = entry_inode(e);
                if (r >= 0)
                        r = files_search(s, e->fd, e->dev, e->ino, &pos, &same);
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
                        struct fds_entry *e = entry_of(node);

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

static void alias_attach(struct vhub_fdstore *s, struct fds_entry *e, struct fds_entry *primary) {
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

static void sync_cb(evutil_socket_t fd, short what, void *userdata);
static void sweep_cb(evutil_socket_t fd, short what, void *userdata);
static bool eventfd_ids_shown(void);
static struct fds_group *group_of(struct name_node *node);
static struct fds_group *group_find(const struct vhub_fdstore *s, const char *name);

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
                s->ev_sync = event_new(base, -1, 0, sync_cb, s);
                s->ev_sweep = evtimer_new(base, sweep_cb, s);
                if (!s->ev_write || !s->ev_sync || !s->ev_sweep) {
                        r = -ENOMEM;
                        goto fail;
                }
        }
        s->exact_keys = eventfd_ids_shown();
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
                free(entry_of(node));
        free(s->names.buckets);
        free(s->files);
        NAME_TABLE_FOREACH(&s->groups, node) {
                struct fds_group *g = group_of(node);

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
        if (entry_find(s, name) || group_find(s, name))
                return -EEXIST;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!s->files_valid) {
                r = files_rebuild(s);
                if (r < 0)
                        return r;
        }
        r = files_search(s, fd, st.st_dev, st.st_ino, &pos, &same);
        if (r < 0)
                return r;
        r = entry_new(s, name, fd, &e);
        if (r < 0)
                return r;
        e->dev = st.st_dev;
        e->ino = st.st_ino;
        e->have_inode = true;
        s->stats.pushes++;
        if (same) {
                alias_attach(s, e, s->files[pos]);
                aliases_write(s);
                return 1;
        }
        entry_store(s, e, pos);
        return 0;
}

int vhub_fdstore_push(struct vhub_fdstore *s, int fd, const char *name) {
        /* names are checked even without a manager, so that a bad one shows
         * in every test, not only under systemd */
        if (!vhub_fdstore_name_valid(name) || name_reserved(name))
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
                files_remove(s, e);
                stored_del(s, e);
                if (e->pending) {
                        /* never sent: nothing to remove */
                        TAILQ_REMOVE(&s->queue, e->pending, link);
                        s->queued--;
                        msg_free(e->pending);
                        e->pending = NULL;
                } else if (tell_manager && msg_send(s, NULL, -1, MSG_REMOVE, e->name) < 0) {
                        s->stats.remove_failures++;
                        log_warning("fd store: could not remove %s: it stays stale until the next start",
                                    e->name);
                }
        } else if (e->state == ENTRY_FAILED)
                s->n_failed--;
        if (!heir)
                return;
        /* the heir becomes the stored one; the other aliases follow it */
        if (entry_inode(heir) < 0)
                s->files_valid = false;
        alias_detach(s, heir);
        for (struct fds_entry *a; (a = e->first_alias);) {
                alias_detach(s, a);
                alias_attach(s, a, heir);
        }
        if (e->state == ENTRY_FAILED || !tell_manager) {
                if (e->state == ENTRY_FAILED) {
                        heir->state = ENTRY_FAILED;
                        s->n_failed++;
                } else {
                        /* forgetting (restore abort): keep the index honest */
                        stored_add(s, heir);
                        s->files_valid = false;
                }
        } else {
                size_t pos;
                bool same;

                if (s->files_valid && files_search(s, heir->fd, heir->dev, heir->ino, &pos, &same) >= 0)
                        entry_store(s, heir, pos);
                else {
                        s->files_valid = false;
                        entry_store(s, heir, 0);
                }
        }
        aliases_write(s);
}

static int remove_internal(struct vhub_fdstore *s, struct fds_entry *e, bool tell_manager) {
        if (e->state == ENTRY_ALIAS) {
                alias_detach(s, e);
                entry_unlink_free(s, e);
                aliases_write(s);
                return 0;
        }
        primary_drop(s, e, tell_manager);
        entry_unlink_free(s, e);
        return 0;
}

int vhub_fdstore_remove(struct vhub_fdstore *s, const char *name) {
        struct fds_entry *e;

        if (!vhub_fdstore_enabled(s))
                return 0;
        if (!name || name_reserved(name))
                return -EINVAL;
        e = entry_find(s, name);
        if (!e)
                return -ENOENT;
        s->stats.removes++;
        return remove_internal(s, e, true);
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
        e = entry_find(s, name);
        if (e && e->state == ENTRY_STORED)
                entry_count(s, e);
        return 0;
}

bool vhub_fdstore_held(const struct vhub_fdstore *s, const char *name) {
        const struct fds_entry *e = vhub_fdstore_enabled(s) ? entry_find(s, name) : NULL;

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
        return vhub_fdstore_enabled(s) && name && entry_find(s, name);
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

static struct fds_group *group_of(struct name_node *node) {
        return node ? (struct fds_group *)((char *)node - offsetof(struct fds_group, node)) : NULL;
}

static struct fds_group *group_find(const struct vhub_fdstore *s, const char *name) {
        return group_of(name_table_find(&s->groups, name));
}

static int group_new(struct vhub_fdstore *s, const char *name, struct fds_group **ret) {
        *ret = name_table_new(&s->groups, sizeof(**ret), offsetof(struct fds_group, node),
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

static void group_unlink_free(struct vhub_fdstore *s, struct fds_group *g) {
        group_cool(s, g);
        name_table_unlink(&s->groups, &g->node);
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
static void group_index(struct fds_group *g) {
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
static void group_alt_name(char buf[VHUB_FDSTORE_NAME_MAX + 1], const char *group) {
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

        group_alt_name(name, g->name);
        if (!vhub_fdstore_name_valid(name) || s->n_stored >= s->max_fds ||
            s->names_bytes + strlen(name) + 1 > VHUB_FDSTORE_NAMES_BUDGET)
                return NULL;
        fd = group_make_stash(s, g, &wend);
        vhu_safe_close(wend);   /* nothing is appended to it: it goes right after */
        if (fd < 0)
                return NULL;
        if (entry_new(s, name, -1, &a) < 0) {
                vhu_safe_close(fd);
                return NULL;
        }
        a->stash = true;
        entry_store_fd(s, a, 0, fd);
        vhu_safe_close(fd);
        if (a->state != ENTRY_STORED) {
                remove_internal(s, a, false);
                return NULL;
        }
        return a;
}

/* Bring g's stash in line with its members: remove the stored one, push a
 * new one (FDSTOREREMOVE drops every fd of the name: never both at once),
 * the members stored under the alternate name meanwhile.  An alternate
 * left by a rebuild whose push failed stays until one succeeds: it holds
 * the members' last stored copy. */
static void group_stash(struct vhub_fdstore *s, struct fds_group *g) {
        char alt_name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *e = entry_find(s, g->name), *alt;
        /* a rebuild, not a first push (may_leave_dead()) */
        uint64_t rebuilt_usec = e ? vhub_now_usec() : 0;
        int fd = -1, wend = -1, r;

        group_cool(s, g);
        g->rebuild = false;
        g->unsent = g->dead = g->appends = 0;
        group_alt_name(alt_name, g->name);
        alt = entry_find(s, alt_name);
        if (!alt && e && g->n > 0 && e->stash && e->state == ENTRY_STORED && !e->pending)
                alt = group_store_alt(s, g);
        if (e)
                remove_internal(s, e, true);
        if (g->n == 0) {
                if (alt)
                        remove_internal(s, alt, true);
                group_unlink_free(s, g);
                return;
        }
        r = entry_new(s, g->name, -1, &e);
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
        entry_store_fd(s, e, 0, fd);
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
                remove_internal(s, alt, true);
}

/* Bring g's stored stash up to date by appending its new members, if it
 * can (see STASH_*): true, else the caller rebuilds it. */
static bool group_append(struct vhub_fdstore *s, struct fds_group *g) {
        struct fds_entry *e;
        int r;

        if (g->rebuild || g->wend < 0 || g->n == 0 || g->dead > STASH_DEAD_MAX ||
            g->appends >= STASH_APPENDS_MAX)
                return false;
        e = entry_find(s, g->name);
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
                        group_stash(s, g);
        }
}

static void sync_cb(evutil_socket_t fd, short what, void *userdata) {
        vhub_fdstore_sync(userdata);
}

/* g stops changing: its stash as one message of its members (a restart
 * peeks it and pushes nothing; a stash of several messages is read, and so
 * stored again, by every start), its writing end closed. */
static void group_settle(struct vhub_fdstore *s, struct fds_group *g) {
        if (g->appends > 0 || g->dead > 0)
                group_stash(s, g);
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

static void sweep_cb(evutil_socket_t fd, short what, void *userdata) {
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
static bool eventfd_ids_shown(void) {
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
        if (!vhub_fdstore_name_valid(group) || name_reserved(group))
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
        if (!(g = group_find(s, group))) {
                if (entry_find(s, group))
                        return -EEXIST; /* a single fd's name */
                r = group_new(s, group, &g);
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
                                group_unlink_free(s, g);
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
                group_index(g);
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
        struct fds_group *g = r > 0 ? group_find(s, group) : NULL;
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
                group_index(g);
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
        const struct fds_group *g = vhub_fdstore_enabled(s) && group ? group_find(s, group) : NULL;
        ssize_t at = g ? group_pos(g, fd) : -1;

        if (at < 0)
                return -ENOENT;
        *ret = g->keys[at];
        return 0;
}

size_t vhub_fdstore_group_size(const struct vhub_fdstore *s, const char *group) {
        const struct fds_group *g = vhub_fdstore_enabled(s) && group ? group_find(s, group) : NULL;

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
        size_t i = name_hash(name) & (r->n_index - 1);

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
                if (!*name || !t || t->duplicate || t->fd < 0 || restore_find(r, name) || name_reserved(name))
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
                    entry_find(s, re->name))
                        continue;
                k = entry_new(s, re->name, re->fd, &e);
                if (k < 0)
                        return k;
                stored_add(s, e);
                s->files_valid = false;
        }
        if (s->alias_file.fd >= 0) {
                struct fds_entry *e;
                int k = entry_new(s, VHUB_FDSTORE_ALIASES, s->alias_file.fd, &e);

                if (k < 0)
                        return k;
                stored_add(s, e);
        }
        for (size_t i = 0; i < r->n; i++) {
                struct restore_entry *re = &r->v[i];
                struct fds_entry *e, *target;

                if (!re->alias || entry_find(s, re->name))
                        continue;
                target = entry_find(s, r->v[re->target].name);
                if (!target || target->state != ENTRY_STORED)
                        continue;
                if (entry_new(s, re->name, re->fd, &e) < 0)
                        return -ENOMEM;
                alias_attach(s, e, target);
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
                        struct fds_entry *e = entry_find(r->store, r->v[i].name);

                        if (e && !r->v[i].duplicate)
                                remove_internal(r->store, e, false);
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

        if (!name || name_reserved(name))
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
        struct fds_entry *e = s ? entry_find(s, name) : NULL;

        if (e) {
                e->stash = true;
                e->fd = -1;
        }
        return e;
}

/* The stash of group the earlier run stored last: the copy under the
 * alternate name where a crash cut a rebuild (group_stash(): that copy is
 * pushed before the old stash is removed, and removed once the new one is
 * pushed, so it is never older than the group's own), the group's own
 * then dropped; else the group's own. */
static int take_group_stash(struct vhub_fdstore_restore *r, const char *group, bool *ret_alt) {
        char alt_name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *e;
        int alt, old;

        *ret_alt = false;
        group_alt_name(alt_name, group);
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
                remove_internal(r->store, e, true);
        return alt;
}

/* The group is stored under its own name again (or queued, before this):
 * the alternate copy goes. */
static void alt_stash_done(struct vhub_fdstore *s, const char *group) {
        char alt_name[VHUB_FDSTORE_NAME_MAX + 1];
        struct fds_entry *e;

        group_alt_name(alt_name, group);
        e = stash_entry_taken(s, alt_name);
        if (e)
                remove_internal(s, e, true);
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
                struct fds_entry *e = entry_find(s, group);
                struct fds_group *g = NULL;

                if (e) {
                        e->stash = true;
                        e->fd = -1;     /* read and closed */
                }
                if (group_new(s, group, &g) < 0) {
                        if (e)
                                remove_internal(s, e, true);
                        log_warning("fd store: group %s could not be stored again: it will not survive the next restart",
                                    group);
                } else if (n > 0 && !(g->keys = calloc(n, sizeof(*g->keys)))) {
                        group_unlink_free(s, g);
                        if (e)
                                remove_internal(s, e, true);
                        log_warning("fd store: group %s could not be stored again: it will not survive the next restart",
                                    group);
                } else {
                        for (size_t i = 0; i < n; i++)
                                g->keys[i] = m[i].key;
                        g->fds = fds;   /* the group takes the array */
                        fds = NULL;
                        g->n = g->cap = n;
                        group_index(g);
                        s->n_members += n;
                        /* this group alone, now: other groups a restore
                         * changed wait for the loop (a start that gives up
                         * must not store them, vhub_fdstore_restore_give_up()) */
                        if (!peeked || !e || e->state != ENTRY_STORED)
                                group_stash(s, g);
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
        e = r->store ? entry_find(r->store, group) : NULL;
        if (e) {
                e->stash = true;        /* its fd was the stash, closed above */
                e->fd = -1;
                remove_internal(r->store, e, true);
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
                        e = s ? entry_find(s, re->name) : NULL;
                        if (e)
                                remove_internal(s, e, true);
                        else if (s && vhub_fdstore_name_valid(re->name))
                                (void) msg_send(s, NULL, -1, MSG_REMOVE, re->name);
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
                e = s ? entry_find(s, re->name) : NULL;
                if (e && e->state == ENTRY_STORED && !e->pending) {
                        int k = msg_send(s, NULL, -1, MSG_REMOVE, re->name);

                        if (k >= 0)
                                k = msg_send(s, e, e->fd, MSG_PUSH, e->name);
                        if (k < 0)
                                entry_set_failed(s, e, k);
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
                e = entry_find(s, re->name);
                if (e)
                        remove_internal(s, e, false);
        }
        restore_free(r);
}
