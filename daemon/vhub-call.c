/* SPDX-License-Identifier: MIT */
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

#include "vhub-call.h"
#include "vhu-fd.h"
#include "vhu-message.h"

void vhub_call_complete(struct vhub_call *call, int r) {
        if (!call)
                return;
        call->result = r;
        if (r < 0 && call->error.code == 0)
                vhub_error_set(&call->error, VHUB_ERR_INTERNAL, "internal error (%d)", r);
        call->done(call);
}

void vhub_call_fail(struct vhub_call *call, const struct vhub_error *e) {
        if (!call)
                return;
        vhub_error_copy(&call->error, e);
        vhub_call_complete(call, vhub_error_errno(e->code));
}

void vhub_postcopy_out_free(struct vhub_call *call) {
        if (!call || !call->out.postcopy.devices)
                return;
        for (unsigned i = 0; i < call->out.postcopy.n_devices; i++) {
                struct vhub_postcopy_device *pd = &call->out.postcopy.devices[i];

                pd->ufd = vhu_safe_close(pd->ufd);
                free(pd->regions);
        }
        free(call->out.postcopy.devices);
        call->out.postcopy.devices = NULL;
        call->out.postcopy.n_devices = 0;
}

void vhub_vmm_answer_done(struct vhub_vmm_answer *a) {
        if (!a || !a->msg)
                return;
        vhu_msg_clear(a->msg);
        free(a->msg);
        a->msg = NULL;
}
