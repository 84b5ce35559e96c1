/* SPDX-License-Identifier: MIT */
/*
 * What the C benchmarks share about processes: the children they start
 * (vhubd, qemu-storage-daemon) with their output in a log, a work directory,
 * and dying with both cleaned up.  Header-only: each benchmark is one
 * program that includes it once.
 *
 *   bench_init("bench-attach");           names messages and the directory
 *   bench_workdir_make();                 /tmp/vhub-<name>-XXXXXX in bench_workdir
 *   pid = bench_spawn(argv, log);         stopped by bench_cleanup() while running
 *   bench_wait_for_socket(path, pid, what, probe);
 *   bench_stop(&pid);                     SIGTERM, wait, forget
 *   bench_die("...");                     cleanup, message, exit 1
 *   bench_machine(&m);                    CPU model, CPUs, kernel, load average
 */
#pragma once

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BENCH_MAX_CHILDREN 8

static const char *bench_name = "bench";
static char bench_workdir[64];
static pid_t bench_children[BENCH_MAX_CHILDREN];
static unsigned bench_n_children;

static void bench_init(const char *name) {
        bench_name = name;
}

/* SIGTERM pid, wait for it, set it to -1; nothing if it is not running. */
static void bench_stop(pid_t *pid) {
        if (*pid <= 0)
                return;
        kill(*pid, SIGTERM);
        waitpid(*pid, NULL, 0);
        for (unsigned i = 0; i < bench_n_children; i++)
                if (bench_children[i] == *pid)
                        bench_children[i] = -1;
        *pid = -1;
}

/* Every child still running stopped, the work directory removed. */
static void bench_cleanup(void) {
        char cmd[128];

        for (unsigned i = 0; i < bench_n_children; i++)
                bench_stop(&bench_children[i]);
        bench_n_children = 0;
        if (bench_workdir[0]) {
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", bench_workdir);
                if (system(cmd) != 0)
                        fprintf(stderr, "%s: could not remove %s\n", bench_name, bench_workdir);
                bench_workdir[0] = '\0';
        }
}

static void bench_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void bench_die(const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        fprintf(stderr, "%s: ", bench_name);
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        va_end(ap);
        bench_cleanup();
        exit(1);
}

static void bench_workdir_make(void) {
        snprintf(bench_workdir, sizeof(bench_workdir), "/tmp/vhub-%s-XXXXXX", bench_name);
        if (!mkdtemp(bench_workdir)) {
                bench_workdir[0] = '\0';
                bench_die("mkdtemp: %s", strerror(errno));
        }
}

static uint64_t bench_now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* argv[0] exec'd without a PATH search, stdout and stderr to log_path; it
 * dies with this process. */
static pid_t bench_spawn(char *const argv[], const char *log_path) {
        pid_t pid;

        if (bench_n_children == BENCH_MAX_CHILDREN)
                bench_die("more than %d children", BENCH_MAX_CHILDREN);
        pid = fork();
        if (pid < 0)
                bench_die("fork: %s", strerror(errno));
        if (pid == 0) {
                int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (fd >= 0) {
                        dup2(fd, 1);
                        dup2(fd, 2);
                }
                execv(argv[0], argv);
                _exit(127);
        }
        bench_children[bench_n_children++] = pid;
        return pid;
}

/* Until path is a socket (and, with probe, accepts a connection) or pid
 * exits; 10 s at the most.  qsd serves one front-end per export: never
 * probe one of its sockets. */
static void bench_wait_for_socket(const char *path, pid_t pid, const char *what, bool probe) {
        for (int i = 0; i < 1000; i++) {
                struct stat st;

                if (stat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
                        struct sockaddr_un sa = { .sun_family = AF_UNIX };
                        int fd;
                        bool ok;

                        if (!probe)
                                return;
                        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
                        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                        ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
                        if (fd >= 0)
                                close(fd);
                        if (ok)
                                return;
                }
                if (waitpid(pid, NULL, WNOHANG) == pid)
                        bench_die("%s exited before listening on %s", what, path);
                usleep(10000);
        }
        bench_die("%s did not listen on %s within 10 s", what, path);
}

/* What the figures were measured on, for the header of a benchmark's output. */
struct bench_machine {
        char cpu[128];          /* /proc/cpuinfo's first "model name" */
        long n_cpus;
        struct utsname un;
        char load[64];          /* /proc/loadavg, without its newline */
};

static void bench_machine(struct bench_machine *m) {
        char line[256];
        FILE *f;

        snprintf(m->cpu, sizeof(m->cpu), "unknown");
        m->load[0] = '\0';
        m->n_cpus = sysconf(_SC_NPROCESSORS_ONLN);
        uname(&m->un);
        f = fopen("/proc/cpuinfo", "r");
        if (f) {
                while (fgets(line, sizeof(line), f))
                        if (strncmp(line, "model name", 10) == 0) {
                                char *p = strchr(line, ':');

                                if (p) {
                                        snprintf(m->cpu, sizeof(m->cpu), "%s", p + 2);
                                        m->cpu[strcspn(m->cpu, "\n")] = '\0';
                                }
                                break;
                        }
                fclose(f);
        }
        f = fopen("/proc/loadavg", "r");
        if (f) {
                if (fgets(m->load, sizeof(m->load), f))
                        m->load[strcspn(m->load, "\n")] = '\0';
                else
                        m->load[0] = '\0';
                fclose(f);
        }
}
