/* SPDX-License-Identifier: MIT */
/* The systemd glue: readiness and status notifications and the watchdog
 * (the fds the service manager passes are vhubd.c's, through the fd store's
 * restore map). */
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
