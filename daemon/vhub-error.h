/* SPDX-License-Identifier: MIT */
/*
 * Errors the daemon reports to its callers.  The codes and their messages are
 * the control contract's (vhub-contract.h, shared with the client library);
 * the model only fills a struct vhub_error, it never builds JSON.
 */
#pragma once

#include <stdarg.h>
#include <stddef.h>

#include "vhub-contract.h"

#define VHUB_NAME_MAX 64

struct vhub_error {
        int code;                        /* enum vhub_err_code, 0 when unset */
        char detail[256];                /* one human-readable sentence */
        char device[VHUB_NAME_MAX + 1];  /* for -32006/-32007: the device */
        const char *request;             /* for -32006/-32007: vhost-user request name */
};

/* Fill e (if not NULL) and return the negative errno that matches code. */
int vhub_error_set(struct vhub_error *e, int code, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
int vhub_error_setv(struct vhub_error *e, int code, const char *fmt, va_list ap)
        __attribute__((format(printf, 3, 0)));
/* Same, for back-end failures: records the device and the request name. */
int vhub_error_set_backend(struct vhub_error *e, int code, const char *device,
                           const char *request, const char *fmt, ...)
        __attribute__((format(printf, 5, 6)));
void vhub_error_copy(struct vhub_error *dst, const struct vhub_error *src);
/* The negative errno a contract code stands for (-EINVAL for unknown). */
int vhub_error_errno(int code);
/* The contract's short message for a code ("no such VM", ...; "error" if unknown). */
const char *vhub_error_message(int code);
