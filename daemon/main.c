/* SPDX-License-Identifier: MIT */
/*
 * vhubd: the vhost-user front-end for many back-ends, driven by VMMs over a
 * JSON-RPC control socket.  Runs in the foreground; exits 0 on SIGTERM or
 * SIGINT after every VM is torn down and every back-end connection closed.
 */
#include <errno.h>
#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control-server.h"
#include "vhub-config.h"
#include "vhub-context.h"
#include "vhub-eventfd.h"
#include "vhub-log.h"
#include "vhub-sd.h"
#include "vhub-vm.h"

struct daemon_main {
        struct vhub_config config;
        struct vhub_context ctx;
        struct event_base *base;
        struct control_server *server;
        struct vhub_sd *sd;
        struct event *ev_sigterm, *ev_sigint, *ev_deadline;
        bool stopping;
        char *control_path;
};

static void update_status(void *userdata) {
        struct daemon_main *m = userdata;
        char status[128];

        if (m->stopping) {
                if (m->ctx.n_vms == 0)
                        event_base_loopexit(m->base, NULL);
                return;
        }
        snprintf(status, sizeof(status), "%u VMs, %u devices", m->ctx.n_vms, m->ctx.n_devices);
        if (m->sd)
                vhub_sd_status(m->sd, status);
}

static void deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        struct daemon_main *m = userdata;

        log_warning("back-ends did not let go in time; closing the rest now");
        event_base_loopexit(m->base, NULL);
}

static void signal_cb(evutil_socket_t sig, short what, void *userdata) {
        struct daemon_main *m = userdata;
        struct vhub_vm *vm, *next;
        struct timeval tv;

        if (m->stopping)
                return;
        m->stopping = true;
        log_info("signal %d: shutting down", (int)sig);
        vhub_sd_stopping(m->sd);
        control_server_shutdown(m->server);
        /* every VM stops its devices and closes its back-ends, in parallel */
        for (vm = TAILQ_FIRST(&m->ctx.vms); vm; vm = next) {
                next = TAILQ_NEXT(vm, link);
                if (!vm->destroying)
                        vhub_vm_destroy(vm, NULL);
        }
        if (m->ctx.n_vms == 0) {
                event_base_loopexit(m->base, NULL);
                return;
        }
        tv.tv_sec = m->config.backend_timeout_ms / 1000 + 1;
        tv.tv_usec = (m->config.backend_timeout_ms % 1000) * 1000;
        m->ev_deadline = evtimer_new(m->base, deadline_cb, m);
        if (!m->ev_deadline || evtimer_add(m->ev_deadline, &tv) < 0)
                event_base_loopexit(m->base, NULL);
}

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
        struct control_server_options opts = { 0 };
        int r, ret = EXIT_FAILURE;

        vhub_config_init(&m.config);
        r = vhub_config_parse_args(&m.config, argc, argv);
        if (r != 0) {
                vhub_config_done(&m.config);
                return r > 0 ? EXIT_SUCCESS : EXIT_FAILURE;
        }
        vhub_log_setup(m.config.log_level, vhub_log_stderr_is_journal());
        /* MSG_NOSIGNAL everywhere; this is a second line of defence */
        signal(SIGPIPE, SIG_IGN);
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
        vhub_context_init(&m.ctx, m.base, &m.config);
        m.ctx.on_counts_changed = update_status;
        m.ctx.counts_userdata = &m;

        opts.listen_fd = vhub_sd_listen_fd();
        if (opts.listen_fd < 0) {
                m.control_path = m.config.control_path ? strdup(m.config.control_path)
                                                        : default_control_path();
                if (!m.control_path) {
                        log_error("no control socket path: pass --control PATH or set XDG_RUNTIME_DIR");
                        goto out;
                }
        }
        opts.path = m.control_path;
        opts.mode = m.config.control_mode;
        opts.gid = m.config.control_gid;
        opts.gid_set = m.config.control_gid_set;
        opts.max_connections = m.config.limits.connections;
        opts.max_pending = m.config.limits.pending_per_connection;
        rpc_conn_limits_default(&opts.limits);
        opts.limits.max_line = m.config.limits.max_line;
        opts.limits.max_out_bytes = m.config.limits.max_output_bytes;
        r = control_server_new(&m.ctx, &opts, &m.server);
        if (r < 0) {
                log_error("cannot set up the control socket %s: %s",
                          m.control_path ? m.control_path : "(inherited)", strerror(-r));
                goto out;
        }
        r = vhub_sd_new(m.base, &m.sd);
        if (r < 0) {
                log_error("cannot set up the watchdog: %s", strerror(-r));
                goto out;
        }
        m.ev_sigterm = evsignal_new(m.base, SIGTERM, signal_cb, &m);
        m.ev_sigint = evsignal_new(m.base, SIGINT, signal_cb, &m);
        if (!m.ev_sigterm || !m.ev_sigint || evsignal_add(m.ev_sigterm, NULL) < 0 ||
            evsignal_add(m.ev_sigint, NULL) < 0) {
                log_error("cannot watch signals");
                goto out;
        }
        log_info("vhubd listening on %s (back-end timeout %u ms)",
                 m.control_path ? m.control_path : "an inherited socket", m.config.backend_timeout_ms);
        vhub_sd_ready(m.sd, "0 VMs, 0 devices");

        event_base_dispatch(m.base);
        ret = EXIT_SUCCESS;
        log_info("vhubd stopped");

out:
        vhub_context_done(&m.ctx);
        m.server = control_server_free(m.server);
        m.sd = vhub_sd_free(m.sd);
        if (m.ev_sigterm)
                event_free(m.ev_sigterm);
        if (m.ev_sigint)
                event_free(m.ev_sigint);
        if (m.ev_deadline)
                event_free(m.ev_deadline);
        if (m.base)
                event_base_free(m.base);
        free(m.control_path);
        vhub_config_done(&m.config);
        return ret;
}
