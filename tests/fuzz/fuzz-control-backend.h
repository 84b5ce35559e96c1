/* SPDX-License-Identifier: MIT */
/*
 * The control fuzzer's back-end: a listening vhost-user socket inside the
 * fuzzing daemon's back-end directory, served from the fuzzer's own loop
 * (never blocking), so that device.add reaches a real handshake and the
 * device methods reach the engine instead of "no such socket".
 *
 * It answers every request the way a well-behaved back-end does and checks
 * that the daemon sends only requests the spec allows (abort otherwise).
 * Its flavour (which protocol features it offers) is chosen per input.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

struct fuzz_backend;

enum fuzz_backend_flavour {
        FUZZ_BACKEND_FULL,         /* REPLY_ACK, CONFIGURE_MEM_SLOTS, everything the daemon uses */
        FUZZ_BACKEND_NO_REPLY_ACK, /* the same without REPLY_ACK: GET_FEATURES barriers */
        FUZZ_BACKEND_MEM_TABLE,    /* no CONFIGURE_MEM_SLOTS: SET_MEM_TABLE */
        FUZZ_BACKEND_LEGACY,       /* no protocol features at all */
};

/* Listen on path (which must not exist). */
int fuzz_backend_new(const char *path, struct fuzz_backend **ret);
struct fuzz_backend *fuzz_backend_free(struct fuzz_backend *b);
/* For connections accepted from now on. */
void fuzz_backend_set_flavour(struct fuzz_backend *b, enum fuzz_backend_flavour f);
/* Accept, read and answer whatever is pending without blocking. */
void fuzz_backend_pump(struct fuzz_backend *b);
/* Connect to a daemon listening at path (a server-mode device) and serve
 * that connection like an accepted one; nothing if path is not a socket. */
void fuzz_backend_connect(struct fuzz_backend *b, const char *path);
/*
 * Send raw bytes as the newest connection's back-end (a hostile reply, a
 * request out of turn), or on its back-end channel (channel true: a
 * back-end request).  Nothing happens without such a connection.
 */
void fuzz_backend_inject(struct fuzz_backend *b, bool channel, const void *bytes, size_t len);
/* Connections still open (the daemon closes its end when a device goes). */
unsigned fuzz_backend_connections(const struct fuzz_backend *b);
