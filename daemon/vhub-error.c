/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "vhub-error.h"

int vhub_error_errno(int code) {
        switch (code) {
        case VHUB_ERR_NO_VM:
        case VHUB_ERR_NO_DEVICE:
                return -ENOENT;
        case VHUB_ERR_EXISTS:
                return -EEXIST;
        case VHUB_ERR_STATE:
                return -EBUSY;
        case VHUB_ERR_UNSUPPORTED:
                return -EOPNOTSUPP;
        case VHUB_ERR_BACKEND:
                return -EIO;
        case VHUB_ERR_TIMEOUT:
                return -ETIMEDOUT;
        case VHUB_ERR_LIMIT:
                return -ENOSPC;
        case VHUB_ERR_REGION:
                return -ERANGE;
        case VHUB_ERR_NOT_ALLOWED:
                return -EPERM;
        case VHUB_ERR_INTERNAL:
                return -ENOMEM;
        default:
                return -EINVAL;
        }
}

const char *vhub_error_message(int code) {
        const char *m = vhub_contract_error_message(code);

        return m ? m : "error";
}

int vhub_error_setv(struct vhub_error *e, int code, const char *fmt, va_list ap) {
        if (e) {
                memset(e, 0, sizeof(*e));
                e->code = code;
                vsnprintf(e->detail, sizeof(e->detail), fmt, ap);
        }
        return vhub_error_errno(code);
}

int vhub_error_set(struct vhub_error *e, int code, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = vhub_error_setv(e, code, fmt, ap);
        va_end(ap);
        return r;
}

int vhub_error_set_backend(struct vhub_error *e, int code, const char *device,
                           const char *request, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = vhub_error_setv(e, code, fmt, ap);
        va_end(ap);
        if (e) {
                snprintf(e->device, sizeof(e->device), "%s", device ? device : "");
                e->request = request;
        }
        return r;
}

void vhub_error_copy(struct vhub_error *dst, const struct vhub_error *src) {
        if (dst && src && dst != src)
                memcpy(dst, src, sizeof(*dst));
}
