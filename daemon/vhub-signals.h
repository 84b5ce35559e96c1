/* SPDX-License-Identifier: MIT */
/*
 * What each signal does to vhubd.  No signal that can be caught ends the
 * daemon without removing the sockets a clean exit removes:
 *
 * - shutdown (SIGTERM, SIGINT, SIGXCPU): the clean teardown, from the loop;
 * - reload (SIGHUP): logged, the log level reloaded, from the loop;
 * - logged and ignored, from the loop: SIGUSR1, SIGUSR2, the job-control
 *   stops SIGTSTP/SIGTTIN/SIGTTOU (a stopped daemon stalls every VM), and
 *   the other signals whose default would end the process (SIGVTALRM,
 *   SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, real-time signals);
 * - ignored outright: SIGPIPE (writes use MSG_NOSIGNAL), SIGXFSZ (a write
 *   fails with EFBIG instead); SIGALRM belongs to vhub-eventfd's guard;
 * - fatal, with a core as by default (SIGQUIT, SIGABRT, SIGSEGV, SIGBUS,
 *   SIGILL, SIGFPE, SIGSYS, SIGTRAP): the crash cleanup runs in the signal
 *   handler first (async-signal-safe: it only unlinks), then the previous
 *   disposition (default, or a sanitizer's) takes the signal.
 *
 * SIGKILL cannot be caught: the next start replaces what it leaves.
 */
#pragma once

#include <event2/event.h>

struct vhub_signals;

struct vhub_signals_ops {
        void (*shutdown)(void *userdata, int sig);
        void (*reload)(void *userdata, int sig);
};

int vhub_signals_new(struct event_base *base, const struct vhub_signals_ops *ops, void *userdata,
                     struct vhub_signals **ret);
/* Stops watching; the dispositions of the loop's signals go back to default. */
struct vhub_signals *vhub_signals_free(struct vhub_signals *s);

/* Runs in a fatal signal's handler: must be async-signal-safe, and must
 * cope with state that was being changed when the signal came. */
typedef void (*vhub_crash_cleanup_fn)(void *userdata);
/* Installs the fatal signals' handler with its cleanup.  Returns 0 or -errno. */
int vhub_signals_crash_setup(vhub_crash_cleanup_fn cleanup, void *userdata);
