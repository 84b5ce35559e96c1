/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-signals.h"
#include "vhub-time.h"

enum signal_action {
        SIGNAL_SHUTDOWN,
        SIGNAL_RELOAD,
        SIGNAL_LOG,
};

static const struct {
        int sig;
        enum signal_action action;
} loop_signals[] = {
        { SIGTERM, SIGNAL_SHUTDOWN },
        { SIGINT, SIGNAL_SHUTDOWN },
        /* the soft CPU limit: SIGKILL follows at the hard one */
        { SIGXCPU, SIGNAL_SHUTDOWN },
        { SIGHUP, SIGNAL_RELOAD },
        { SIGUSR1, SIGNAL_LOG },
        { SIGUSR2, SIGNAL_LOG },
        { SIGTSTP, SIGNAL_LOG },
        { SIGTTIN, SIGNAL_LOG },
        { SIGTTOU, SIGNAL_LOG },
        { SIGVTALRM, SIGNAL_LOG },
        { SIGPROF, SIGNAL_LOG },
        { SIGIO, SIGNAL_LOG },
        { SIGPWR, SIGNAL_LOG },
        { SIGSTKFLT, SIGNAL_LOG },
};

static const int ignored_signals[] = { SIGPIPE, SIGXFSZ };

static const int fatal_signals[] = {
        SIGQUIT, SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, SIGTRAP,
};

struct vhub_signals {
        const struct vhub_signals_ops *ops;
        void *userdata;
        struct event **events;
        size_t n_events;
        /* a sender may repeat a signal as often as it likes */
        struct vhub_log_ratelimit log_limit[_NSIG];
};

static enum signal_action action_of(int sig) {
        for (size_t i = 0; i < sizeof(loop_signals) / sizeof(loop_signals[0]); i++)
                if (loop_signals[i].sig == sig)
                        return loop_signals[i].action;
        return SIGNAL_LOG; /* the real-time signals */
}

static void signal_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_signals *s = userdata;
        unsigned long long suppressed;
        int sig = (int)fd;

        switch (action_of(sig)) {
        case SIGNAL_SHUTDOWN:
                s->ops->shutdown(s->userdata, sig);
                return;
        case SIGNAL_RELOAD:
                s->ops->reload(s->userdata, sig);
                return;
        case SIGNAL_LOG:
                if (sig < 0 || sig >= _NSIG ||
                    !vhub_log_ratelimit(&s->log_limit[sig], vhub_now_usec(), &suppressed))
                        return;
                if (suppressed)
                        log_notice("signal %d (%s) ignored (%llu more of it not logged)",
                                   sig, strsignal(sig), suppressed);
                else
                        log_notice("signal %d (%s) ignored", sig, strsignal(sig));
                return;
        }
}

static int watch(struct vhub_signals *s, struct event_base *base, int sig) {
        struct event *ev = evsignal_new(base, sig, signal_cb, s);

        if (!ev)
                return -ENOMEM;
        if (evsignal_add(ev, NULL) < 0) {
                vhub_event_freep(&ev);
                return -EINVAL;
        }
        s->events[s->n_events++] = ev;
        return 0;
}

int vhub_signals_new(struct event_base *base, const struct vhub_signals_ops *ops, void *userdata,
                     struct vhub_signals **ret) {
        size_t n_loop = sizeof(loop_signals) / sizeof(loop_signals[0]);
        size_t n_rt = (size_t)(SIGRTMAX - SIGRTMIN + 1);
        struct vhub_signals *s = calloc(1, sizeof(*s));
        int r = -ENOMEM;

        if (!s)
                return -ENOMEM;
        s->ops = ops;
        s->userdata = userdata;
        s->events = calloc(n_loop + n_rt, sizeof(*s->events));
        if (!s->events)
                goto fail;
        for (size_t i = 0; i < sizeof(ignored_signals) / sizeof(ignored_signals[0]); i++)
                if (signal(ignored_signals[i], SIG_IGN) == SIG_ERR) {
                        r = -errno;
                        goto fail;
                }
        for (size_t i = 0; i < n_loop; i++)
                if ((r = watch(s, base, loop_signals[i].sig)) < 0)
                        goto fail;
        /* glibc keeps the first real-time signals for itself: SIGRTMIN is
         * already past them */
        for (int sig = SIGRTMIN; sig <= SIGRTMAX; sig++)
                if ((r = watch(s, base, sig)) < 0)
                        goto fail;
        *ret = s;
        return 0;
fail:
        vhub_signals_free(s);
        return r;
}

struct vhub_signals *vhub_signals_free(struct vhub_signals *s) {
        if (!s)
                return NULL;
        for (size_t i = 0; i < s->n_events; i++)
                vhub_event_freep(&s->events[i]);
        free(s->events);
        free(s);
        return NULL;
}

/* ---- fatal signals ---- */

/* The signal handler's only way to the daemon: set once, before the
 * handlers are installed. */
static struct {
        vhub_crash_cleanup_fn cleanup;
        void *userdata;
        struct sigaction previous[_NSIG];
} crash;

static void crash_handler(int sig, siginfo_t *info, void *uctx) {
        int saved = errno;

        /* first: a second fault in the cleanup goes straight to the
         * previous disposition (default: core; or a sanitizer's report) */
        (void)sigaction(sig, &crash.previous[sig], NULL);
        if (crash.cleanup)
                crash.cleanup(crash.userdata);
        errno = saved;
        /* A fault re-executes the instruction on return, and the previous
         * disposition sees it with its real address; anything sent (kill,
         * abort(), a watchdog) is sent again. */
        if (info && info->si_code > 0 &&
            (sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE))
                return;
        (void)raise(sig);
}

int vhub_signals_crash_setup(vhub_crash_cleanup_fn cleanup, void *userdata) {
        struct sigaction sa = { .sa_sigaction = crash_handler, .sa_flags = SA_SIGINFO };

        crash.cleanup = cleanup;
        crash.userdata = userdata;
        sigemptyset(&sa.sa_mask);
        for (size_t i = 0; i < sizeof(fatal_signals) / sizeof(fatal_signals[0]); i++) {
                int sig = fatal_signals[i];

                if (sigaction(sig, NULL, &crash.previous[sig]) < 0)
                        return -errno;
                /* what our parent ignored stays ignored (and is not fatal) */
                if (!(crash.previous[sig].sa_flags & SA_SIGINFO) &&
                    crash.previous[sig].sa_handler == SIG_IGN)
                        continue;
                if (sigaction(sig, &sa, NULL) < 0)
                        return -errno;
        }
        return 0;
}
