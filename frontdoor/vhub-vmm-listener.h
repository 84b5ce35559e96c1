/* SPDX-License-Identifier: MIT */
/*
 * The listening side of a front-door socket: one VMM at a time.
 *
 * A connection is handed to ops->on_connect only while no VMM is attached;
 * from then on the listener is busy until vhub_vmm_listener_release().  A
 * connect while busy is accepted and closed at once (contract: "another
 * connect while one is open is refused"), so a second VMM -- or QEMU
 * retrying with reconnect=1 while its old connection is still being torn
 * down -- sees EOF and tries again later instead of hanging in the backlog.
 * A peer whose SO_PEERCRED uid is neither the socket's owner nor root is
 * refused the same way (defence in depth: the socket is 0600 in 0700
 * directories, so only they can reach it anyway).
 *
 * Running out of fds (EMFILE, ENFILE) pauses accepting for a moment instead
 * of spinning on a level-triggered listen socket.  A leaf: libevent only.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

struct event_base;
struct vhub_vmm_listener;

enum vhub_vmm_refusal {
        VHUB_VMM_REFUSED_BUSY,       /* a VMM is already attached */
        VHUB_VMM_REFUSED_PEER,       /* the peer's uid may not use this socket */
};

struct vhub_vmm_listener_ops {
        /* A VMM connected: fd is non-blocking, CLOEXEC, and the callee's.
         * The listener is busy from now on. */
        void (*on_connect)(void *userdata, int fd);
        /* A connection was accepted and closed (for the log); may be NULL. */
        void (*on_refused)(void *userdata, enum vhub_vmm_refusal why, uid_t peer_uid);
};

/*
 * listen_fd: a listening AF_UNIX stream socket, taken in every case.
 * owner_uid: the uid allowed besides root.
 */
int vhub_vmm_listener_new(struct event_base *base, int listen_fd, uid_t owner_uid,
                          const struct vhub_vmm_listener_ops *ops, void *userdata,
                          struct vhub_vmm_listener **ret);
/* Closes the listening socket (its name is the socket directory's business).
 * NULL-safe; may be called from inside a callback; returns NULL. */
struct vhub_vmm_listener *vhub_vmm_listener_free(struct vhub_vmm_listener *l);

/* The attached VMM left: the next connection is handed over. */
void vhub_vmm_listener_release(struct vhub_vmm_listener *l);
/* A VMM is attached that no connect handed over (one carried across a
 * restart of the daemon): busy until vhub_vmm_listener_release(). */
void vhub_vmm_listener_hold(struct vhub_vmm_listener *l);
bool vhub_vmm_listener_busy(const struct vhub_vmm_listener *l);
/* The listening socket (for its owner's inventory). */
int vhub_vmm_listener_fd(const struct vhub_vmm_listener *l);
