/* SPDX-License-Identifier: MIT */
/*
 * Open a path below a directory fd without ever leaving it and without
 * following a symlink anywhere on the way: openat2() with RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, or, where the kernel (or a
 * seccomp filter) has no openat2, a walk that opens one component at a time
 * with O_NOFOLLOW.  The object opened is the object a caller then checks and
 * uses through the fd: nothing is looked up by name again.
 */
#pragma once

/*
 * rel: relative, no "." or ".." component ("" is dir_fd's directory itself).
 * flags: O_PATH and/or O_DIRECTORY, and the like (O_NOFOLLOW and O_CLOEXEC
 * are added).  Returns the fd, or a negative errno (-ELOOP or -ENOTDIR for
 * a symlink on the way, -EINVAL for a bad rel).
 */
int vhub_open_beneath(int dir_fd, const char *rel, int flags);
/* The O_NOFOLLOW walk alone (what vhub_open_beneath() falls back to). */
int vhub_open_beneath_walk(int dir_fd, const char *rel, int flags);
