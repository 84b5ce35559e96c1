/* SPDX-License-Identifier: MIT */
/*
 * vhubd: the vhost-user front-end for many back-ends, driven by VMMs over a
 * JSON-RPC control socket.  Runs in the foreground; exits 0 on SIGTERM or
 * SIGINT after every VM is torn down and every back-end connection closed.
 * What the other signals do: vhub-signals.h.
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vhub-commit.h"
#include "vhub-config.h"
#include "vhub-context.h"
#include "vhub-eventfd.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-restart.h"
#include "vhub-sd.h"
#include "vhub-signals.h"
#include "vhub-time.h"
#include "vhubd.h"
#include "vhu-fd.h"

struct daemon_main {
        struct vhub_config config;
        struct vhubd vhubd;           /* the model and its faces */
        struct event_base *base;
        struct vhub_sd *sd;
        struct vhub_signals *signals;
        struct event *ev_deadline;
        bool stopping;
        unsigned status_vms, status_devices;  /* what STATUS= last said */
        char *control_path;           /* the control socket we created; NULL if inherited */
        /* cleared before the teardown frees what the crash cleanup walks */
        volatile sig_atomic_t crash_cleanup_armed;
        /* the fd store keeps everything: a crash is a restart, nothing is removed */
        volatile sig_atomic_t crash_is_restart;
};

static void update_status(void *userdata) {
        struct daemon_main *m = userdata;
        char status[128];

        if (m->stopping) {
                if (m->vhubd.ctx.n_vms == 0)
                        event_base_loopexit(m->base, NULL);
                return;
        }
        /* called on every device state change too: say only what is new */
        if (!m->sd || !vhub_sd_notifying(m->sd) ||
            (m->vhubd.ctx.n_vms == m->status_vms && m->vhubd.ctx.n_devices == m->status_devices))
                return;
        m->status_vms = m->vhubd.ctx.n_vms;
        m->status_devices = m->vhubd.ctx.n_devices;
        snprintf(status, sizeof(status), "%u VMs, %u devices", m->status_vms, m->status_devices);
        vhub_sd_status(m->sd, status);
}

static void deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        struct daemon_main *m = userdata;

        log_warning("back-ends did not let go in time; closing the rest now");
        event_base_loopexit(m->base, NULL);
}

/* The planned restart's last step: every snapshot written and handed to
 * the service manager with every fd, the process ends without closing or
 * telling anyone anything (no vhost-user message, no event, no removal
 * from the store, no unlink): the manager's copies keep every socket,
 * eventfd and memfd open for the next process. */
static void restart_ready(void *userdata) {
        struct daemon_main *m = userdata;

        vhub_restart_finish(&m->vhubd);
        log_info("vhubd stopped for a restart: %u VMs and %u devices are kept by the service manager",
                 m->vhubd.ctx.n_vms, m->vhubd.ctx.n_devices);
        fflush(stderr);
        _exit(EXIT_SUCCESS);
}

static void shutdown_cb(void *userdata, int sig) {
        struct daemon_main *m = userdata;
        struct timeval tv;

        if (m->stopping)
                return;
        m->stopping = true;
        vhub_sd_stopping(m->sd);
        if (vhub_commit_enabled(&m->vhubd.ctx)) {
                log_info("signal %d (%s): stopping for a restart (the fd store keeps everything)", sig,
                         strsignal(sig));
                if (vhub_restart_begin(&m->vhubd, restart_ready, m) == 0)
                        return;
                restart_ready(m);       /* out of memory: write what is and go */
        }
        log_info("signal %d (%s): shutting down", sig, strsignal(sig));
        vhubd_stop_faces(&m->vhubd);
        /* every VM stops its devices and closes its back-ends, in parallel */
        vhub_context_destroy_vms(&m->vhubd.ctx);
        if (m->vhubd.ctx.n_vms == 0) {
                event_base_loopexit(m->base, NULL);
                return;
        }
        /* a second more than a back-end may take to answer its last stop */
        tv = vhub_timeval_from_ms((uint64_t)m->config.backend_timeout_ms + 1000);
        m->ev_deadline = evtimer_new(m->base, deadline_cb, m);
        if (!m->ev_deadline || evtimer_add(m->ev_deadline, &tv) < 0)
                event_base_loopexit(m->base, NULL);
}

/* The level in the --log-level-file: 0, -ENOENT if there is none, -EINVAL
 * if it holds no level name, other -errno. */
static int log_level_from_file(const char *path, int *ret_level) {
        char buf[64];
        struct stat st;
        ssize_t n;
        int level;
        /* O_NONBLOCK: a FIFO put there must not stall the loop */
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);

        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
                return -EINVAL;
        n = read(fd, buf, sizeof(buf) - 1);
        if (n < 0)
                return -errno;
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
                n--;
        buf[n] = '\0';
        level = vhub_log_level_from_string(buf);
        if (level < 0)
                return -EINVAL;
        *ret_level = level;
        return 0;
}

/* The log level: the --log-level-file's if it exists, else --log-level.  A
 * file that cannot be read or holds no level changes nothing. */
static void load_log_level(struct daemon_main *m, int report_level) {
        const char *path = m->config.log_level_file;
        int level = m->config.log_level, r;

        if (path) {
                r = log_level_from_file(path, &level);
                if (r == -ENOENT)
                        path = NULL;
                else if (r < 0) {
                        log_warning("log level stays %s: %s %s",
                                    vhub_log_level_to_string(vhub_log_get_level()), path,
                                    r == -EINVAL ? "holds no log level" : strerror(-r));
                        return;
                }
        }
        vhub_log_set_level(level);
        log_full(report_level, "log level %s (from %s)", vhub_log_level_to_string(level),
                 path ? path : "--log-level");
}

static void inventory_fd(const struct vhub_fd_info *fd, void *userdata) {
        unsigned *n = userdata;

        (*n)++;
        log_debug("fd %d: %s (%s%s)", fd->fd, fd->name, fd->group ? "group " : "not stored",
                  fd->group ? fd->group : "");
}

/* At debug level, every fd the daemon holds with its owner's name (what is
 * not listed is libevent's or stdio). */
static void log_fd_inventory(struct daemon_main *m) {
        unsigned n = 0;

        if (vhub_log_get_level() < LOG_DEBUG)
                return;
        log_debug("fd inventory:");
        vhubd_foreach_fd(&m->vhubd, &(struct vhub_fd_visitor){ inventory_fd, &n });
        log_debug("fd inventory: %u fds", n);
}

static void reload_cb(void *userdata, int sig) {
        struct daemon_main *m = userdata;

        log_notice("signal %d (%s): reloading the log level", sig, strsignal(sig));
        load_log_level(m, LOG_NOTICE);
        log_fd_inventory(m);
}

/* In a fatal signal's handler: remove the sockets a clean exit removes.
 * Only async-signal-safe calls (unlink, fstatat, unlinkat); the lists may
 * be mid-change, and a fault here just ends the process as the signal
 * would have. */
static void crash_cleanup(void *userdata) {
        struct daemon_main *m = userdata;

        if (!m->crash_cleanup_armed || m->crash_is_restart)
                return;
        if (m->control_path)
                (void)unlink(m->control_path);
        vhub_context_crash_unlink(&m->vhubd.ctx);
}

static const struct vhub_signals_ops signal_ops = {
        .shutdown = shutdown_cb,
        .reload = reload_cb,
};

/* The contract's default control socket path. */
static char *default_control_path(void) {
        const char *rd = getenv("RUNTIME_DIRECTORY");
        char *p = NULL;

        if (rd && *rd) {
                /* RUNTIME_DIRECTORY may list several, colon-separated */
                size_t n = strcspn(rd, ":");

                if (asprintf(&p, "%.*s/control.sock", (int)n, rd) < 0)
                        return NULL;
                return p;
        }
        if (geteuid() == 0)
                return strdup("/run/vhub/control.sock");
        rd = getenv("XDG_RUNTIME_DIR");
        if (rd && *rd && asprintf(&p, "%s/vhub/control.sock", rd) >= 0)
                return p;
        return NULL;
}

int main(int argc, char **argv) {
        struct daemon_main m = { 0 };
        struct vhubd_options opts = { .control_listen_fd = -1 };
        int r, ret = EXIT_FAILURE;

        vhub_config_init(&m.config);
        r = vhub_config_parse_args(&m.config, argc, argv);
        if (r != 0) {
                vhub_config_done(&m.config);
                return r > 0 ? EXIT_SUCCESS : EXIT_FAILURE;
        }
        vhub_log_setup(m.config.log_level, vhub_log_stderr_is_journal());
        load_log_level(&m, LOG_INFO);
        r = vhub_eventfd_guard_setup();
        if (r < 0) {
                log_error("cannot install the SIGALRM handler: %s", strerror(-r));
                goto out;
        }

        m.base = event_base_new();
        if (!m.base) {
                log_error("cannot create the event loop");
                goto out;
        }
        /* used unless socket activation passes the control socket (vhubd_init) */
        m.control_path = m.config.control_path ? strdup(m.config.control_path) : default_control_path();
        opts.control_path = m.control_path;
        if (vhubd_init(&m.vhubd, m.base, &m.config, &opts) < 0) {
                if (m.vhubd.keep_store) {
                        /* the earlier run's state is in the model: no
                         * teardown (it would close it for the next try) */
                        fflush(stderr);
                        _exit(EXIT_FAILURE);
                }
                goto out;
        }
        if (!vhubd_control_path(&m.vhubd)) {
                free(m.control_path);   /* inherited: not ours to unlink */
                m.control_path = NULL;
        }
        m.vhubd.ctx.on_counts_changed = update_status;
        m.vhubd.ctx.counts_userdata = &m;
        r = vhub_sd_new(m.base, &m.sd);
        if (r < 0) {
                log_error("cannot set up the watchdog: %s", strerror(-r));
                goto out;
        }
        r = vhub_signals_new(m.base, &signal_ops, &m, &m.signals);
        if (r < 0) {
                log_error("cannot watch signals: %s", strerror(-r));
                goto out;
        }
        m.crash_is_restart = vhub_commit_enabled(&m.vhubd.ctx);
        m.crash_cleanup_armed = 1;
        r = vhub_signals_crash_setup(crash_cleanup, &m);
        if (r < 0) {
                log_error("cannot install the fatal signals' handler: %s", strerror(-r));
                goto out;
        }
        log_info("vhubd listening on %s (back-end timeout %u ms)",
                 m.control_path ? m.control_path : "an inherited socket", m.config.backend_timeout_ms);
        {
                /* after a restart the model is back already: say so */
                char status[128];

                snprintf(status, sizeof(status), "%u VMs, %u devices", m.vhubd.ctx.n_vms, m.vhubd.ctx.n_devices);
                vhub_sd_ready(m.sd, status);
        }

        event_base_dispatch(m.base);
        ret = EXIT_SUCCESS;
        log_info("vhubd stopped");

out:
        m.crash_cleanup_armed = 0;
        vhubd_done(&m.vhubd);
        m.sd = vhub_sd_free(m.sd);
        /* last: a signal during the teardown still finds its handler */
        m.signals = vhub_signals_free(m.signals);
        vhub_event_freep(&m.ev_deadline);
        if (m.base)
                event_base_free(m.base);
        free(m.control_path);
        vhub_config_done(&m.config);
        return ret;
}
