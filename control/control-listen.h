/* SPDX-License-Identifier: MIT */
/*
 * The control socket's file (--control), when the daemon creates it itself.
 *
 * Root binds it and then sets its mode and group: if anybody else could
 * change the directory, it could rename a symlink onto the name between
 * bind() and the chmod/chown (root would apply --control-mode and
 * --control-group to the symlink's target), or simply listen there first
 * and be sent every VMM's memory.  So the directory must belong to root or
 * to the daemon's uid and be writable by nobody else, and so must every
 * directory above it (a sticky one, like /tmp, may be writable by all: no
 * one else can rename what root put there); anything else is refused with
 * a log line saying why.
 *
 * The directory is opened once and everything after goes through that fd:
 * the stale socket of a daemon that died is removed (only a socket nobody
 * listens on: anything else stays), the socket is bound under umask 0177
 * (never reachable by others, not even for a moment), and its mode and
 * group are set on the inode just bound, through an O_PATH fd opened with
 * O_NOFOLLOW (fchmod/fchown on the socket's own fd would change the
 * socket, not the file).
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

/* The listening fd (non-blocking, CLOEXEC), or -errno: -EPERM for a
 * directory others can change, -EADDRINUSE for a live socket at path,
 * -EEXIST for something there that is not a socket. */
int control_listen_create(const char *path, mode_t mode, gid_t gid, bool gid_set);
