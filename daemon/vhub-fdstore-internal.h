/* SPDX-License-Identifier: MIT */
/*
 * The fd store's insides, private to its files (included by no other):
 * vhub-fdstore.c (the notify socket, push/remove, the queue, aliases),
 * vhub-fdstore-index.c (the name tables, the file index),
 * vhub-fdstore-group.c (groups and their stashes: add/leave, compaction,
 * the sweep) and vhub-fdstore-restore.c (reading LISTEN_FDS and stashes
 * back, take/drop group).  See vhub-fdstore.h and docs/restart.md.
 */
#pragma once

#include <event2/event.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "vhub-fdstore.h"
#include "vhub-fdstore-share.h"
#include "vhub-snapshot.h"

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

enum msg_kind { MSG_PUSH, MSG_REMOVE };

/* ---- vhub-fdstore-index.c: the name tables and the file index */

bool fds_name_reserved(const char *name);
uint32_t fds_name_hash(const char *name);
struct name_node *fds_name_table_find(const struct name_table *t, const char *name);
void fds_name_table_unlink(struct name_table *t, struct name_node *node);
void *fds_name_table_new(struct name_table *t, size_t size, size_t node_at, size_t name_at,
                         const char *name);
struct fds_entry *fds_entry_of(struct name_node *node);
struct fds_entry *fds_entry_find(const struct vhub_fdstore *s, const char *name);
int fds_entry_new(struct vhub_fdstore *s, const char *name, int fd, struct fds_entry **ret);
void fds_entry_unlink_free(struct vhub_fdstore *s, struct fds_entry *e);
int fds_entry_inode(struct fds_entry *e);
int fds_files_search(const struct vhub_fdstore *s, int fd, dev_t dev, ino_t ino,
                     size_t *ret_pos, bool *ret_same);
int fds_files_rebuild(struct vhub_fdstore *s);
int fds_files_insert(struct vhub_fdstore *s, struct fds_entry *e, size_t pos);
void fds_files_remove(struct vhub_fdstore *s, struct fds_entry *e);

/* ---- vhub-fdstore.c: the messages, the queue, aliases */

void fds_stored_add(struct vhub_fdstore *s, struct fds_entry *e);
void fds_entry_set_failed(struct vhub_fdstore *s, struct fds_entry *e, int r);
int fds_msg_send(struct vhub_fdstore *s, struct fds_entry *push_entry, int fd, enum msg_kind kind,
                 const char *name);
void fds_entry_store_fd(struct vhub_fdstore *s, struct fds_entry *e, size_t pos, int fd);
void fds_alias_attach(struct vhub_fdstore *s, struct fds_entry *e, struct fds_entry *primary);
int fds_remove_internal(struct vhub_fdstore *s, struct fds_entry *e, bool tell_manager);

/* ---- vhub-fdstore-group.c: groups and their stashes */

struct fds_group *fds_group_of(struct name_node *node);
struct fds_group *fds_group_find(const struct vhub_fdstore *s, const char *name);
int fds_group_new(struct vhub_fdstore *s, const char *name, struct fds_group **ret);
void fds_group_unlink_free(struct vhub_fdstore *s, struct fds_group *g);
void fds_group_index(struct fds_group *g);
void fds_group_stash(struct vhub_fdstore *s, struct fds_group *g);
void fds_group_alt_name(char buf[VHUB_FDSTORE_NAME_MAX + 1], const char *group);
void fds_sync_cb(evutil_socket_t fd, short what, void *userdata);
void fds_sweep_cb(evutil_socket_t fd, short what, void *userdata);
bool fds_eventfd_ids_shown(void);
