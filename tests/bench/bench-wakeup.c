/* SPDX-License-Identifier: MIT */
/*
 * What one wake-up costs on this machine: the price of every hop between
 * processes (VMM -> vhubd -> back-end), measured without vhubd.
 *
 * Two processes ping-pong one byte over a unix socketpair (a request and
 * its reply, as a front-end and a back-end do), N round trips, pinned:
 *
 *   same CPU      both on CPU 0: each side sleeps, the other runs at once
 *                 (a context switch, no inter-processor wake-up)
 *   two CPUs      CPU 0 and CPU 1, each side sleeping in read() between
 *                 messages: every message wakes a sleeping CPU (an IPI; in a
 *                 VM that is an exit to the hypervisor, and with guest halt
 *                 polling off the woken vCPU was halted)
 *   two CPUs, polling   the same, each side polling with MSG_DONTWAIT for up
 *                 to 50 us before it sleeps: the peer is running when the
 *                 message arrives
 *
 * Per scenario: the wall time per round trip and the CPU time the first
 * process spent per round trip (its own sends, receives and wake-ups).
 * Needs two CPUs; on one it says so and measures the first scenario only.
 *
 *     build/tests/bench/bench-wakeup [--round-trips N]
 *     meson test -C build --benchmark --suite bench -v wakeup
 */
#include <err.h>
#include <getopt.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t clock_ns(clockid_t id) {
        struct timespec ts;

        clock_gettime(id, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu) {
        cpu_set_t set;

        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set) < 0)
                err(1, "sched_setaffinity(%d)", cpu);
}

/* One byte from fd: polled for up to poll_ns first (0: straight to sleep). */
static void recv_one(int fd, uint64_t poll_ns) {
        char b;

        if (poll_ns) {
                uint64_t end = clock_ns(CLOCK_MONOTONIC) + poll_ns;

                do {
                        if (recv(fd, &b, 1, MSG_DONTWAIT) == 1)
                                return;
                } while (clock_ns(CLOCK_MONOTONIC) < end);
        }
        if (recv(fd, &b, 1, 0) != 1)
                err(1, "recv");
}

static void send_one(int fd) {
        if (send(fd, "x", 1, MSG_NOSIGNAL) != 1)
                err(1, "send");
}

struct figures {
        double wall_us, cpu_us;
};

static struct figures ping_pong(int cpu_a, int cpu_b, uint64_t poll_ns, unsigned n) {
        struct figures f;
        uint64_t t0, c0;
        int sv[2];
        pid_t pid;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                err(1, "socketpair");
        pid = fork();
        if (pid < 0)
                err(1, "fork");
        if (pid == 0) {
                close(sv[0]);
                pin(cpu_b);
                for (unsigned i = 0; i < n; i++) {
                        recv_one(sv[1], poll_ns);
                        send_one(sv[1]);
                }
                _exit(0);
        }
        close(sv[1]);
        pin(cpu_a);
        /* a few round trips to settle both sides on their CPUs */
        for (unsigned i = 0; i < 100 && i < n; i++) {
                send_one(sv[0]);
                recv_one(sv[0], poll_ns);
        }
        t0 = clock_ns(CLOCK_MONOTONIC);
        c0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
        for (unsigned i = 100; i < n; i++) {
                send_one(sv[0]);
                recv_one(sv[0], poll_ns);
        }
        f.wall_us = (double)(clock_ns(CLOCK_MONOTONIC) - t0) / 1e3 / (n - 100);
        f.cpu_us = (double)(clock_ns(CLOCK_THREAD_CPUTIME_ID) - c0) / 1e3 / (n - 100);
        close(sv[0]);
        if (waitpid(pid, NULL, 0) != pid)
                err(1, "waitpid");
        return f;
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                { "round-trips", required_argument, NULL, 'n' },
                {}
        };
        static const struct {
                const char *name;
                int cpu_b;
                unsigned poll_us;
        } scen[] = {
                { "same CPU", 0, 0 },
                { "two CPUs", 1, 0 },
                { "two CPUs, polling 50 us", 1, 50 },
        };
        unsigned n = 20000, n_scen = 3;
        char load[64] = "";
        struct utsname un;
        long n_cpus = sysconf(_SC_NPROCESSORS_ONLN);
        FILE *f;
        int o;

        while ((o = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                if (o != 'n') {
                        fprintf(stderr, "usage: bench-wakeup [--round-trips N]\n");
                        return 2;
                }
                n = (unsigned)strtoul(optarg, NULL, 0);
        }
        if (n <= 100) {
                fprintf(stderr, "bench-wakeup: --round-trips must be over 100\n");
                return 2;
        }
        uname(&un);
        f = fopen("/proc/loadavg", "r");
        if (f) {
                if (!fgets(load, sizeof(load), f))
                        load[0] = '\0';
                load[strcspn(load, "\n")] = '\0';
                fclose(f);
        }
        printf("# machine: %ld CPUs, %s %s; load average %s\n", n_cpus, un.sysname, un.release, load);
        if (n_cpus < 2) {
                printf("# one CPU: only the first scenario\n");
                n_scen = 1;
        }
        printf("# %u round trips of one byte each way over a unix socketpair, after 100 to settle\n\n", n - 100);
        printf("| scenario | wall us per round trip | CPU us per round trip (one side) |\n");
        printf("|---|---:|---:|\n");
        for (unsigned i = 0; i < n_scen; i++) {
                struct figures fig = ping_pong(0, scen[i].cpu_b, (uint64_t)scen[i].poll_us * 1000u, n);

                printf("| %s | %.1f | %.1f |\n", scen[i].name, fig.wall_us, fig.cpu_us);
                fflush(stdout);
        }
        return 0;
}
