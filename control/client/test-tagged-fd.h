/* SPDX-License-Identifier: MIT */
/*
 * For the client library's unit tests: an fd that holds a short tag, so the
 * side that receives it can tell it is the fd that was sent (and that it
 * arrived close-on-exec).
 */
#pragma once

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhub-check.h"

/* A memfd holding tag: it can be checked any number of times (pread). */
static inline int tagged_fd(const char *tag) {
        int fd = memfd_create("tag", MFD_CLOEXEC);

        CHECK(fd >= 0);
        CHECK(pwrite(fd, tag, strlen(tag), 0) == (ssize_t)strlen(tag));
        return fd;
}

static inline void check_tag(int fd, const char *tag) {
        char buf[64] = { 0 };

        CHECK(pread(fd, buf, sizeof(buf) - 1, 0) >= 0);
        if (strcmp(buf, tag) != 0) {
                fprintf(stderr, "fd %d holds '%s', expected '%s'\n", fd, buf, tag);
                abort();
        }
        CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
}
