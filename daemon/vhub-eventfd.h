/* SPDX-License-Identifier: MIT */
/*
 * Signalling an eventfd a peer (a VMM) handed us, without ever blocking.
 *
 * The peer shares the open file description, so it decides O_NONBLOCK and
 * the counter: a blocking eventfd whose counter is at 2^64-2 makes write(1)
 * wait until someone reads, which would stop the whole daemon.
 */
#pragma once

#include <stdbool.h>

/* Installs the no-op SIGALRM handler (without SA_RESTART) that the write
 * guard needs.  Call once at startup; until then writes are guarded by the
 * poll() check alone.  Returns 0 or -errno. */
int vhub_eventfd_guard_setup(void);

/* Adds 1 to the eventfd.  0: done; -EAGAIN: the counter is full, i.e. the
 * eventfd is signalled already and the peer has not read it (nothing is
 * lost, nothing was written); other -errno: the write failed.  Never blocks
 * for longer than a few milliseconds, whatever the peer does meanwhile. */
int vhub_eventfd_signal(int fd);

/* Whether fd is an eventfd (a peer may send any fd where one is due). */
bool vhub_fd_is_eventfd(int fd);
