/* SPDX-License-Identifier: MIT */
/*
 * The back-end allowlist (contract: "Identity and isolation"): a back-end
 * socket must resolve -- symlinks and ".." included -- to a path inside one
 * of the --backend-dir directories, and (client mode) be a socket owned by
 * the requesting uid or root.  Anything else is -32010 and nothing is
 * connected.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include "vhub-config.h"
#include "vhub-error.h"

/*
 * Client mode: resolve path, check it, and open it O_PATH so the check and
 * the connect see the same inode (connect through /proc/self/fd/N).
 * Returns the O_PATH fd.
 */
int vhub_backend_path_open(const struct vhub_config *cfg, uid_t uid, const char *path,
                           struct vhub_error *err);
/* Connect a new non-blocking socket to the socket behind an O_PATH fd. */
int vhub_backend_path_connect(int path_fd);
/*
 * Server mode: the parent directory must resolve inside a back-end
 * directory; an existing entry must be a socket owned by uid or root (it is
 * replaced).  Returns the resolved path to listen on (malloc'd).
 */
int vhub_backend_path_for_listen(const struct vhub_config *cfg, uid_t uid, const char *path,
                                 struct vhub_error *err, char **ret_path);
/* Create a listening socket (non-blocking, CLOEXEC) at an allowed path. */
int vhub_backend_path_listen(const char *resolved_path, uid_t uid);
