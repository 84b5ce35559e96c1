/* SPDX-License-Identifier: MIT */
/*
 * Control-path benchmark: latency (median, p99) and throughput of control
 * calls through a vhubd of its own, with 1 and with N concurrent clients.
 *
 *   bench-control VHUBD [--calls N] [--clients N] [--qsd PATH] [--build-type T]
 *
 * Scenarios (each client a thread with its own connection, started together
 * behind a barrier, after a warm-up):
 *   daemon.info                     the bare round trip: framing, dispatch, JSON
 *   vm.memory.add + vm.memory.remove of a 2 MiB memfd on the client's own VM
 *                                   (no device: table, fd passing and checks)
 *   the same with one qemu-storage-daemon null-co export attached to the VM
 *                                   (every change goes to a real back-end:
 *                                   ADD_MEM_REG / REM_MEM_REG with REPLY_ACK)
 * Latency is per call (an add+remove pair is two calls, each timed); the
 * rate is calls answered per second of wall time over all clients.
 *
 * Not a test: it prints figures (and exits 0 unless something broke).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench-proc.h"
#include "vhub-client.h"

#define REGION_SIZE (2u << 20)

static pid_t daemon_pid = -1, qsd_pid = -1;

/* ---- measurements ---- */

enum scenario { SC_INFO, SC_MEM, SC_MEM_DEVICE };

static const char *const scenario_name[] = {
        [SC_INFO] = "daemon.info",
        [SC_MEM] = "vm.memory.add+remove (memfd, no device)",
        [SC_MEM_DEVICE] = "vm.memory.add+remove (memfd, 1 qsd device)",
};

struct worker {
        pthread_t thread;
        unsigned index;
        enum scenario sc;
        unsigned calls;          /* calls to time (an add+remove pair counts 2) */
        unsigned warmup;
        const char *control;
        char socket[160];        /* SC_MEM_DEVICE: this client's own export */
        pthread_barrier_t *barrier;
        uint64_t *lat;           /* ns per call */
        unsigned n_lat;
        uint64_t t_start, t_end;
        struct vhub_client *c;
        char vm[32];
        int memfd;
};

static void call_ok(struct worker *w, const char *method, json_t *params, const int *fds, unsigned n) {
        struct vhub_client_error err;
        json_t *res = NULL;
        int r = vhub_client_call(w->c, method, params, fds, n, 30000, &res, NULL, NULL, &err);

        if (r < 0)
                bench_die("client %u: %s failed: %s%s%s (%d %s)", w->index, method, strerror(-r),
                    r == -EREMOTEIO ? ": " : "", r == -EREMOTEIO ? err.detail : "", err.code,
                    err.message);
        json_decref(res);
}

static void one_op(struct worker *w, bool timed) {
        uint64_t t0 = bench_now_ns(), t1;

        if (w->sc == SC_INFO) {
                call_ok(w, "daemon.info", NULL, NULL, 0);
                if (timed)
                        w->lat[w->n_lat++] = bench_now_ns() - t0;
                return;
        }
        call_ok(w, "vm.memory.add",
                json_pack("{s:s, s:i, s:i, s:i}", "vm", w->vm, "gpa", 0x100000, "size", REGION_SIZE, "fd", 0),
                &w->memfd, 1);
        t1 = bench_now_ns();
        call_ok(w, "vm.memory.remove", json_pack("{s:s, s:i}", "vm", w->vm, "gpa", 0x100000), NULL, 0);
        if (timed) {
                w->lat[w->n_lat++] = t1 - t0;
                w->lat[w->n_lat++] = bench_now_ns() - t1;
        }
}

static void *worker_main(void *p) {
        struct worker *w = p;
        unsigned ops = w->sc == SC_INFO ? w->calls : w->calls / 2;

        for (unsigned i = 0; i < w->warmup; i++)
                one_op(w, false);
        pthread_barrier_wait(w->barrier);
        w->t_start = bench_now_ns();
        for (unsigned i = 0; i < ops; i++)
                one_op(w, true);
        w->t_end = bench_now_ns();
        return NULL;
}

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

        return x < y ? -1 : x > y;
}

struct result {
        double median_us, p99_us, max_us, rate;
        unsigned calls;
        double seconds;
};

static struct result run(enum scenario sc, unsigned clients, unsigned calls_per_client,
                         const char *control, const char *backend_dir) {
        struct worker *w = calloc(clients, sizeof(*w));
        pthread_barrier_t barrier;
        uint64_t *all, first = UINT64_MAX, last = 0;
        unsigned n = 0;
        struct result res;

        if (!w)
                bench_die("out of memory");
        pthread_barrier_init(&barrier, NULL, clients);
        for (unsigned i = 0; i < clients; i++) {
                int r;

                w[i].index = i;
                w[i].sc = sc;
                w[i].calls = calls_per_client;
                w[i].warmup = sc == SC_INFO ? 200 : 20;
                w[i].control = control;
                w[i].barrier = &barrier;
                w[i].memfd = -1;
                w[i].lat = calloc(calls_per_client + 2, sizeof(uint64_t));
                if (!w[i].lat)
                        bench_die("out of memory");
                snprintf(w[i].vm, sizeof(w[i].vm), "bench%u", i);
                snprintf(w[i].socket, sizeof(w[i].socket), "%s/q%u.sock", backend_dir, i);
                r = vhub_client_connect(control, &w[i].c);
                if (r < 0)
                        bench_die("connect %s: %s", control, strerror(-r));
                if (sc != SC_INFO) {
                        w[i].memfd = memfd_create("bench", MFD_CLOEXEC);
                        if (w[i].memfd < 0 || ftruncate(w[i].memfd, REGION_SIZE) < 0)
                                bench_die("memfd: %s", strerror(errno));
                        call_ok(&w[i], "vm.create", json_pack("{s:s}", "vm", w[i].vm), NULL, 0);
                        if (sc == SC_MEM_DEVICE)
                                call_ok(&w[i], "device.add",
                                        json_pack("{s:s, s:s, s:s}", "vm", w[i].vm, "device", "blk0",
                                                  "socket", w[i].socket),
                                        NULL, 0);
                }
        }
        for (unsigned i = 0; i < clients; i++)
                if (pthread_create(&w[i].thread, NULL, worker_main, &w[i]) != 0)
                        bench_die("pthread_create failed");
        for (unsigned i = 0; i < clients; i++)
                pthread_join(w[i].thread, NULL);

        all = calloc((size_t)clients * (calls_per_client + 2), sizeof(uint64_t));
        if (!all)
                bench_die("out of memory");
        for (unsigned i = 0; i < clients; i++) {
                memcpy(all + n, w[i].lat, w[i].n_lat * sizeof(uint64_t));
                n += w[i].n_lat;
                if (w[i].t_start < first)
                        first = w[i].t_start;
                if (w[i].t_end > last)
                        last = w[i].t_end;
                if (sc != SC_INFO)
                        call_ok(&w[i], "vm.destroy", json_pack("{s:s}", "vm", w[i].vm), NULL, 0);
                vhub_client_free(w[i].c);
                if (w[i].memfd >= 0)
                        close(w[i].memfd);
                free(w[i].lat);
        }
        qsort(all, n, sizeof(uint64_t), cmp_u64);
        res.calls = n;
        res.seconds = (double)(last - first) / 1e9;
        res.median_us = (double)all[n / 2] / 1e3;
        res.p99_us = (double)all[(size_t)((double)n * 0.99)] / 1e3;
        res.max_us = (double)all[n - 1] / 1e3;
        res.rate = (double)n / res.seconds;
        free(all);
        free(w);
        pthread_barrier_destroy(&barrier);
        return res;
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                { "calls", required_argument, NULL, 'n' },
                { "clients", required_argument, NULL, 'c' },
                { "qsd", required_argument, NULL, 'q' },
                { "build-type", required_argument, NULL, 'b' },
                {}
        };
        const char *vhubd, *qsd = "/usr/bin/qemu-storage-daemon", *build_type = "unknown";
        unsigned calls = 20000, many = 64;
        char control[128], bdir[128], logp[160], qsock[160], qlog[160];
        struct bench_machine m;
        int o;

        bench_init("bench-control");
        while ((o = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (o) {
                case 'n':
                        calls = (unsigned)strtoul(optarg, NULL, 0);
                        break;
                case 'c':
                        many = (unsigned)strtoul(optarg, NULL, 0);
                        break;
                case 'q':
                        qsd = optarg;
                        break;
                case 'b':
                        build_type = optarg;
                        break;
                default:
                        fprintf(stderr, "usage: bench-control VHUBD [--calls N] [--clients N] "
                                        "[--qsd PATH] [--build-type T]\n");
                        return 2;
                }
        }
        if (optind + 1 != argc || calls < 200 || many < 2) {
                fprintf(stderr, "usage: bench-control VHUBD [--calls N>=200] [--clients N>=2] "
                                "[--qsd PATH] [--build-type T]\n");
                return 2;
        }
        vhubd = argv[optind];
        signal(SIGPIPE, SIG_IGN);

        bench_workdir_make();
        snprintf(control, sizeof(control), "%s/control.sock", bench_workdir);
        snprintf(bdir, sizeof(bdir), "%s/backends", bench_workdir);
        snprintf(logp, sizeof(logp), "%s/vhubd.log", bench_workdir);
        if (mkdir(bdir, 0755) < 0)
                bench_die("mkdir: %s", strerror(errno));
        {
                char *const dargv[] = { (char *)vhubd, "--control", control, "--backend-dir", bdir,
                                        "--log-level", "warning", "--max-vms-per-uid", "1024",
                                        "--max-connections", "1024", NULL };

                daemon_pid = bench_spawn(dargv, logp);
        }
        bench_wait_for_socket(control, daemon_pid, "vhubd", true);

        bench_machine(&m);
        printf("# vhubd control-call benchmark\n");
        printf("# load average before the run: %s\n", m.load);
        printf("# machine: %s, %ld CPUs, %s %s; vhubd build type: %s\n", m.cpu, m.n_cpus, m.un.sysname,
               m.un.release, build_type);
        printf("# every call timed separately, after a warm-up; \"calls\": timed calls in all; "
               "calls/s: all clients together over wall time\n");
        printf("%-45s %7s %8s %10s %10s %10s %12s\n", "scenario", "clients", "calls", "median_us",
               "p99_us", "max_us", "calls/s");

        for (int sc = SC_INFO; sc <= SC_MEM_DEVICE; sc++) {
                unsigned counts[2] = { 1, many };

                if (sc == SC_MEM_DEVICE) {
                        /* one null-co export per client: qsd serves one front-end per export */
                        char **qargv;
                        unsigned k = 0, nexp = many;

                        if (access(qsd, X_OK) != 0) {
                                printf("# %s: skipped (%s not installed)\n", scenario_name[sc], qsd);
                                continue;
                        }
                        qargv = calloc(2 + 4 * (size_t)nexp, sizeof(char *));
                        if (!qargv)
                                bench_die("out of memory");
                        qargv[k++] = (char *)qsd;
                        for (unsigned i = 0; i < nexp; i++) {
                                char *a, *b;

                                if (asprintf(&a, "driver=null-co,node-name=n%u,size=1048576", i) < 0 ||
                                    asprintf(&b,
                                             "type=vhost-user-blk,id=e%u,node-name=n%u,addr.type=unix,"
                                             "addr.path=%s/q%u.sock,writable=on,num-queues=1",
                                             i, i, bdir, i) < 0)
                                        bench_die("out of memory");
                                qargv[k++] = "--blockdev";
                                qargv[k++] = a;
                                qargv[k++] = "--export";
                                qargv[k++] = b;
                        }
                        snprintf(qlog, sizeof(qlog), "%s/qsd.log", bench_workdir);
                        qsd_pid = bench_spawn(qargv, qlog);
                        snprintf(qsock, sizeof(qsock), "%s/q%u.sock", bdir, nexp - 1);
                        bench_wait_for_socket(qsock, qsd_pid, "qemu-storage-daemon", false);
                }
                for (int k = 0; k < 2; k++) {
                        unsigned per = k == 0 ? calls : calls / many * 4;
                        struct result r;

                        if (sc != SC_INFO)
                                per /= 4; /* memory changes cost more: fewer of them */
                        r = run((enum scenario)sc, counts[k], per, control, bdir);
                        printf("%-45s %7u %8u %10.1f %10.1f %10.1f %12.0f\n", scenario_name[sc], counts[k],
                               r.calls, r.median_us, r.p99_us, r.max_us, r.rate);
                        fflush(stdout);
                }
        }
        bench_cleanup();
        return 0;
}
