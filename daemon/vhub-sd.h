/* SPDX-License-Identifier: MIT */
/* The systemd glue: readiness and status notifications, the watchdog, and
 * the control socket passed by socket activation. */
#pragma once

#include <stdbool.h>

struct event_base;
struct vhub_sd;

int vhub_sd_new(struct event_base *base, struct vhub_sd **ret);
struct vhub_sd *vhub_sd_free(struct vhub_sd *sd);
void vhub_sd_ready(struct vhub_sd *sd, const char *status);
void vhub_sd_status(struct vhub_sd *sd, const char *status);
/* Whether a service manager listens ($NOTIFY_SOCKET at start): without one
 * there is no point in formatting a status. */
bool vhub_sd_notifying(const struct vhub_sd *sd);
void vhub_sd_stopping(struct vhub_sd *sd);
/* The fd named "control" (or the only one) from LISTEN_FDS, or -1. */
int vhub_sd_listen_fd(void);
