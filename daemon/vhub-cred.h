/* SPDX-License-Identifier: MIT */
/*
 * Whom the daemon acts for: the uid, gid and supplementary groups of a
 * control connection's peer (SO_PEERCRED, SO_PEERGROUPS), kept with each VM
 * so that a reconnect later acts with the same identity.
 *
 * vhub_cred_enter() makes the file-system operations that follow run with
 * those rights (setgroups, setfsgid, setfsuid: the daemon is
 * single-threaded), so that the kernel itself decides what that uid may
 * create, remove or connect to; a non-zero fsuid also drops
 * CAP_DAC_OVERRIDE, CAP_CHOWN and CAP_FOWNER from the effective set.
 * vhub_cred_leave() returns to the daemon's own identity.  When the peer is
 * the daemon's own uid (root for root) nothing is switched.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct vhub_cred {
        uid_t uid;
        gid_t gid;
        gid_t *groups;          /* supplementary groups (owned), NULL when none */
        size_t n_groups;
};

/* The peer of a connected AF_UNIX socket, as of its connect(). */
int vhub_cred_from_socket(int fd, struct vhub_cred *ret);
int vhub_cred_copy(const struct vhub_cred *src, struct vhub_cred *ret);
/* Frees the groups; NULL-safe; leaves c empty. */
void vhub_cred_done(struct vhub_cred *c);

/* What vhub_cred_leave() restores. */
struct vhub_cred_scope {
        bool switched;
        uid_t fsuid;
        gid_t fsgid;
        gid_t *groups;
        int n_groups;
};

/*
 * Act with c's file-system identity until vhub_cred_leave(s).  Returns 0,
 * or a negative errno with nothing changed (e.g. -EPERM: the daemon lacks
 * CAP_SETUID/CAP_SETGID to act for another uid).
 */
int vhub_cred_enter(const struct vhub_cred *c, struct vhub_cred_scope *s);
/*
 * Back to the daemon's own identity.  A daemon that cannot get back would
 * go on acting for the wrong uid: that aborts.
 */
void vhub_cred_leave(struct vhub_cred_scope *s);
