/* SPDX-License-Identifier: MIT */
/*
 * Scripted misbehaviour: per socket, per request name, a rule says what to do
 * instead of behaving, optionally only the next N times.
 */
#include <errno.h>
#include <string.h>

#include "backend.h"

static const char *const action_names[_TB_ACT_MAX] = {
        [TB_ACT_REFUSE]        = "refuse",
        [TB_ACT_BAD_FLAGS]     = "bad-flags",
        [TB_ACT_WRONG_REQUEST] = "wrong-request",
        [TB_ACT_OVERSIZED]     = "oversized",
        [TB_ACT_EXTRA_FDS]     = "extra-fds",
        [TB_ACT_SILENCE]       = "silence",
        [TB_ACT_CLOSE]         = "close",
        [TB_ACT_HANG]          = "hang",
        [TB_ACT_DELAY]         = "delay",
        [TB_ACT_IGNORE_FD]     = "ignore-fd",
};

const char *tb_action_name(enum tb_action a) {
        return a < _TB_ACT_MAX ? action_names[a] : "unknown";
}

int tb_action_from_name(const char *s) {
        for (int i = 0; i < _TB_ACT_MAX; i++)
                if (strcmp(action_names[i], s) == 0)
                        return i;
        return -EINVAL;
}

int tb_rule_add(struct tb_sock *s, const struct tb_rule *r) {
        if (s->n_rules >= TB_MAX_MISBEHAVE)
                return -ENOSPC;
        s->rules[s->n_rules++] = *r;
        return 0;
}

void tb_rules_clear(struct tb_sock *s, uint32_t request) {
        unsigned j = 0;
        for (unsigned i = 0; i < s->n_rules; i++)
                if (request != 0 && s->rules[i].request != request)
                        s->rules[j++] = s->rules[i];
        s->n_rules = j;
}

bool tb_rule_take(struct tb_sock *s, uint32_t request, struct tb_rule *ret) {
        for (unsigned i = 0; i < s->n_rules; i++) {
                struct tb_rule *r = &s->rules[i];
                if (r->request != request || r->count == 0)
                        continue;
                *ret = *r;
                if (r->count > 0 && --r->count == 0) {
                        memmove(r, r + 1, (s->n_rules - i - 1) * sizeof(*r));
                        s->n_rules--;
                }
                return true;
        }
        return false;
}

/* "ADD_MEM_REG", "VHOST_USER_ADD_MEM_REG", or a number. */
int tb_request_from_name(enum vhu_direction dir, const char *name, uint32_t *ret) {
        unsigned max = dir == VHU_DIR_FRONTEND ? _VHU_REQ_MAX : _VHU_BREQ_MAX;

        if (strncmp(name, "VHOST_USER_", 11) == 0)
                name += 11;
        for (unsigned i = 1; i < max; i++) {
                const struct vhu_request_info *info = vhu_request_info(dir, i);
                if (info && strcmp(info->name, name) == 0) {
                        *ret = i;
                        return 0;
                }
        }
        return -EINVAL;
}
