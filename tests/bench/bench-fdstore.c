/* SPDX-License-Identifier: MIT */
/*
 * Restart benchmarks (docs/performance.md, "Restart"):
 *
 *   bench-fdstore push       fd store pushes per second: vhub-fdstore (one
 *                            connected non-blocking socket) against
 *                            libsystemd's sd_pid_notify_with_fds() (a socket
 *                            per call), into a receiver process that drains
 *                            like the service manager; then the same with the
 *                            receiver stopped: does a push block the loop?
 *   bench-fdstore snapshot   cost of one commit of a VM's snapshot (8
 *                            regions, 4 devices x 2 rings): serialize,
 *                            checksum, pwrite into its memfd
 *
 * Figures go to stdout as a table; nothing is asserted (speed is measured
 * here, never in tests).
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "vhub-fdstore.h"
#include "vhub-log.h"
#include "vhub-snapshot.h"

/* CPU time this process used (user + system), in seconds */
static double cpu_s(void) {
        struct rusage ru;

        getrusage(RUSAGE_SELF, &ru);
        return (double) (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
               (double) (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static double now_s(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* ---- pushes */

struct receiver {
        pid_t pid;
        int result;             /* pipe: the receiver's count when done */
        char path[108];
};

/* A process draining the socket as the manager does: receive, close the fd
 * (a real manager keeps it: closing costs about the same), until "END=1". */
static void receiver_start(struct receiver *r, const char *dir, const char *name) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int s, p[2];

        snprintf(r->path, sizeof(r->path), "%s/%s", dir, name);
        s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        strcpy(sa.sun_path, r->path);
        if (s < 0 || bind(s, (struct sockaddr *) &sa, sizeof(sa)) < 0 || pipe2(p, O_CLOEXEC) < 0) {
                perror("receiver");
                exit(1);
        }
        r->pid = fork();
        if (r->pid == 0) {
                long count = 0;

                close(p[0]);
                for (;;) {
                        union {
                                struct cmsghdr h;
                                uint8_t buf[CMSG_SPACE(sizeof(int) * 8)];
                        } control;
                        char text[4096];
                        struct iovec iov = { .iov_base = text, .iov_len = sizeof(text) - 1 };
                        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                                             .msg_controllen = sizeof(control.buf) };
                        ssize_t n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);

                        if (n < 0)
                                _exit(1);
                        text[n] = 0;
                        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
                                if (c->cmsg_type == SCM_RIGHTS) {
                                        int fd;

                                        memcpy(&fd, CMSG_DATA(c), sizeof(fd));
                                        close(fd);
                                }
                        if (strcmp(text, "END=1") == 0)
                                break;
                        count++;
                }
                if (write(p[1], &count, sizeof(count)) != sizeof(count))
                        _exit(1);
                _exit(0);
        }
        close(p[1]);
        close(s);
        r->result = p[0];
}

static long receiver_end(struct receiver *r) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        long count = -1;
        int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);

        strcpy(sa.sun_path, r->path);
        if (sendto(s, "END=1", 5, 0, (struct sockaddr *) &sa, sizeof(sa)) != 5)
                perror("END");
        close(s);
        if (read(r->result, &count, sizeof(count)) != sizeof(count))
                count = -1;
        close(r->result);
        waitpid(r->pid, NULL, 0);
        unlink(r->path);
        return count;
}

static double bench_vhub_fdstore(const char *dir, int *fds, int n, const char *kind) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore_options o = { 0 };
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s = NULL;
        struct receiver r;
        char name[64];
        double t0, t, c0, c;
        long got;

        receiver_start(&r, dir, "notify-a");
        o.notify_socket = r.path;
        o.max_fds = (unsigned) n + 16;
        if (vhub_fdstore_new(base, &o, &s) < 0) {
                fprintf(stderr, "vhub_fdstore_new failed\n");
                exit(1);
        }
        t0 = now_s();
        c0 = cpu_s();
        for (int i = 0; i < n; i++) {
                snprintf(name, sizeof(name), "dev/1000/vm0/d%d/ring0.kick", i);
                vhub_fdstore_push(s, fds[i], name);
                /* a daemon returns to its loop between calls */
                event_base_loop(base, EVLOOP_NONBLOCK);
        }
        vhub_fdstore_flush(s, 10000);
        t = now_s() - t0;
        c = cpu_s() - c0;
        vhub_fdstore_get_stats(s, &st);
        got = receiver_end(&r);
        printf("| vhub-fdstore (connected, non-blocking) | %d %s | %.1f ms | %.0f | %.1f µs | %llu |\n", n, kind,
               t * 1e3, n / t, c / n * 1e6, (unsigned long long) st.send_retries);
        if (got != n)
                printf("   (receiver got %ld of %d)\n", got, n);
        vhub_fdstore_free(s);
        event_base_free(base);
        return n / t;
}

static double bench_sd_notify(const char *dir, int *fds, int n, const char *kind) {
        struct receiver r;
        char text[128];
        double t0, t, c0, c;
        long got;

        receiver_start(&r, dir, "notify-b");
        setenv("NOTIFY_SOCKET", r.path, 1);
        t0 = now_s();
        c0 = cpu_s();
        for (int i = 0; i < n; i++) {
                snprintf(text, sizeof(text), "FDSTORE=1\nFDNAME=dev/1000/vm0/d%d/ring0.kick\nFDPOLL=0", i);
                if (sd_pid_notify_with_fds(0, 0, text, &fds[i], 1) <= 0) {
                        fprintf(stderr, "sd_pid_notify_with_fds failed\n");
                        exit(1);
                }
        }
        t = now_s() - t0;
        c = cpu_s() - c0;
        unsetenv("NOTIFY_SOCKET");
        got = receiver_end(&r);
        printf("| sd_pid_notify_with_fds (socket per call) | %d %s | %.1f ms | %.0f | %.1f µs | — |\n", n, kind,
               t * 1e3, n / t, c / n * 1e6);
        if (got != n)
                printf("   (receiver got %ld of %d)\n", got, n);
        return n / t;
}

/* The manager busy (its process stopped): how long do N pushes take? */
static void bench_stalled(const char *dir, int *fds, int n) {
        struct receiver r;
        double t0, t;
        pid_t child;
        int status;

        /* vhub-fdstore: returns at once, the rest waits in its queue */
        {
                struct event_base *base = event_base_new();
                struct vhub_fdstore_options o = { .max_fds = (unsigned) n + 16 };
                struct vhub_fdstore_stats st;
                struct vhub_fdstore *s = NULL;
                char name[64];

                receiver_start(&r, dir, "notify-c");
                kill(r.pid, SIGSTOP);
                o.notify_socket = r.path;
                if (vhub_fdstore_new(base, &o, &s) < 0)
                        exit(1);
                t0 = now_s();
                for (int i = 0; i < n; i++) {
                        snprintf(name, sizeof(name), "d%d", i);
                        vhub_fdstore_push(s, fds[i], name);
                }
                t = now_s() - t0;
                vhub_fdstore_get_stats(s, &st);
                printf("| vhub-fdstore, manager stopped | %d pushes return in %.2f ms | %zu queued |\n", n,
                       t * 1e3, st.queued);
                kill(r.pid, SIGCONT);
                vhub_fdstore_flush(s, 10000);
                receiver_end(&r);
                vhub_fdstore_free(s);
                event_base_free(base);
        }
        /* libsystemd: a blocking sendmsg() once the manager's queue is full;
         * run it in a child with a 1 s alarm */
        receiver_start(&r, dir, "notify-d");
        kill(r.pid, SIGSTOP);
        child = fork();
        if (child == 0) {
                char text[64];
                int i;

                setenv("NOTIFY_SOCKET", r.path, 1);
                alarm(1);
                for (i = 0; i < n; i++) {
                        snprintf(text, sizeof(text), "FDSTORE=1\nFDNAME=d%d\nFDPOLL=0", i);
                        if (sd_pid_notify_with_fds(0, 0, text, &fds[i], 1) <= 0)
                                break;
                        if (i % 10 == 0)
                                fprintf(stderr, "%d\r", i);
                }
                _exit(i == n ? 0 : 2);
        }
        waitpid(child, &status, 0);
        if (WIFSIGNALED(status))
                printf("| sd_pid_notify_with_fds, manager stopped | blocked in sendmsg() until killed by the "
                       "1 s alarm (the manager's queue holds max_dgram_qlen datagrams) | — |\n");
        else
                printf("| sd_pid_notify_with_fds, manager stopped | %d pushes completed (status %d) | — |\n", n,
                       WEXITSTATUS(status));
        kill(r.pid, SIGCONT);
        receiver_end(&r);
}

static int bench_push(void) {
        char dir[] = "/tmp/vhub-bench-fdstore-XXXXXX";
        struct rlimit rl;
        int n = 5000, *fds;
        FILE *q;
        int qlen = -1;

        vhub_log_setup(LOG_ERR, false);
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        if ((rlim_t) n * 3 > rl.rlim_cur)
                n = (int) (rl.rlim_cur / 3);
        if (!mkdtemp(dir))
                return 1;
        fds = calloc((size_t) n, sizeof(*fds));
        for (int i = 0; i < n; i++)
                fds[i] = eventfd(0, EFD_CLOEXEC);
        q = fopen("/proc/sys/net/unix/max_dgram_qlen", "r");
        if (q) {
                if (fscanf(q, "%d", &qlen) != 1)
                        qlen = -1;
                fclose(q);
        }
        printf("## fd store pushes (net.unix.max_dgram_qlen = %d)\n\n", qlen);
        printf("| client | pushes | time | pushes/s | daemon CPU per push | would-blocks retried |\n"
               "|---|---|---|---|---|---|\n");
        /* eventfds share one anonymous inode: telling them apart costs the
         * store kcmp() calls; memfds have an inode each */
        for (int round = 0; round < 2; round++) {
                bench_vhub_fdstore(dir, fds, n, "eventfds");
                bench_sd_notify(dir, fds, n, "eventfds");
        }
        for (int i = 0; i < n; i++) {
                close(fds[i]);
                fds[i] = memfd_create("bench", MFD_CLOEXEC);
        }
        for (int round = 0; round < 2; round++) {
                bench_vhub_fdstore(dir, fds, n, "memfds");
                bench_sd_notify(dir, fds, n, "memfds");
        }
        printf("\n| stalled manager | result | |\n|---|---|---|\n");
        bench_stalled(dir, fds, 1000);
        for (int i = 0; i < n; i++)
                close(fds[i]);
        free(fds);
        rmdir(dir);
        return 0;
}

/* ---- snapshot commits */

enum {
        T_VM = 1, T_VM_NAME = 1, T_VM_UID = 2, T_VM_LINGER = 3, T_REGION = 4, T_DEVICE = 5,
        T_REGION_GPA = 1, T_REGION_SIZE = 2, T_REGION_OFFSET = 3, T_REGION_UADDR = 4, T_REGION_FD = 5,
        T_DEV_NAME = 1, T_DEV_SOCKET = 2, T_DEV_STATE = 3, T_DEV_FEATURES = 4, T_DEV_ACKED = 5,
        T_DEV_PROTO = 6, T_DEV_QUEUES = 7, T_DEV_CONN = 8, T_DEV_CHANNEL = 9, T_DEV_INFLIGHT = 10,
        T_DEV_RING = 11, T_DEV_RECONNECTS = 12,
        T_RING_INDEX = 1, T_RING_SIZE = 2, T_RING_DESC = 3, T_RING_AVAIL = 4, T_RING_USED = 5,
        T_RING_BASE = 6, T_RING_KICK = 7, T_RING_CALL = 8, T_RING_ERR = 9,
};

/* A VM as the model is expected to write itself: every field device.list,
 * vm.memory.list and a restore need.  Each fd's stable name is held by its
 * owner (it was pushed under it), so a commit copies names, it does not
 * format them. */
struct shape_names {
        char region[64][64];
        char dev[64][16];
        char conn[64][64], channel[64][64], inflight[64][64];
        char kick[64][4][64], call[64][4][64], err[64][4][64];
};

static void names_fill(struct shape_names *n, unsigned regions, unsigned devices, unsigned rings) {
        for (unsigned r = 0; r < regions; r++)
                snprintf(n->region[r], sizeof(n->region[r]), "vm/1000/vm0/region/%u", r);
        for (unsigned d = 0; d < devices; d++) {
                snprintf(n->dev[d], sizeof(n->dev[d]), "blk%u", d);
                snprintf(n->conn[d], sizeof(n->conn[d]), "dev/1000/vm0/blk%u/conn", d);
                snprintf(n->channel[d], sizeof(n->channel[d]), "dev/1000/vm0/blk%u/channel", d);
                snprintf(n->inflight[d], sizeof(n->inflight[d]), "dev/1000/vm0/blk%u/inflight", d);
                for (unsigned q = 0; q < rings; q++) {
                        snprintf(n->kick[d][q], sizeof(n->kick[d][q]), "dev/1000/vm0/blk%u/ring%u.kick", d, q);
                        snprintf(n->call[d][q], sizeof(n->call[d][q]), "dev/1000/vm0/blk%u/ring%u.call", d, q);
                        snprintf(n->err[d][q], sizeof(n->err[d][q]), "dev/1000/vm0/blk%u/ring%u.err", d, q);
                }
        }
}

static void write_vm(struct vhub_snap_writer *w, const struct shape_names *n, unsigned regions,
                     unsigned devices, unsigned rings, uint64_t change) {
        vhub_snap_begin(w, T_VM);
        vhub_snap_put_str(w, T_VM_NAME, "vm0");
        vhub_snap_put_u32(w, T_VM_UID, 1000);
        vhub_snap_put_i64(w, T_VM_LINGER, -1);
        for (unsigned r = 0; r < regions; r++) {
                vhub_snap_begin(w, T_REGION);
                vhub_snap_put_u64(w, T_REGION_GPA, (uint64_t) r << 30);
                vhub_snap_put_u64(w, T_REGION_SIZE, 1ull << 30);
                vhub_snap_put_u64(w, T_REGION_OFFSET, 0);
                vhub_snap_put_u64(w, T_REGION_UADDR, 0x7f0000000000ull + ((uint64_t) r << 30));
                vhub_snap_put_fdname(w, T_REGION_FD, n->region[r]);
                vhub_snap_end(w);
        }
        for (unsigned d = 0; d < devices; d++) {
                vhub_snap_begin(w, T_DEVICE);
                vhub_snap_put_str(w, T_DEV_NAME, n->dev[d]);
                vhub_snap_put_str(w, T_DEV_SOCKET, "/run/vhost-user/1000/qsd-blk0.sock");
                vhub_snap_put_u32(w, T_DEV_STATE, 2);
                vhub_snap_put_u64(w, T_DEV_FEATURES, 0x150007646ull);
                vhub_snap_put_u64(w, T_DEV_ACKED, 0x150000646ull + change);
                vhub_snap_put_u64(w, T_DEV_PROTO, 0x8ea3ull);
                vhub_snap_put_u32(w, T_DEV_QUEUES, rings);
                vhub_snap_put_u64(w, T_DEV_RECONNECTS, 0);
                vhub_snap_put_fdname(w, T_DEV_CONN, n->conn[d]);
                vhub_snap_put_fdname(w, T_DEV_CHANNEL, n->channel[d]);
                vhub_snap_put_fdname(w, T_DEV_INFLIGHT, n->inflight[d]);
                for (unsigned q = 0; q < rings; q++) {
                        vhub_snap_begin(w, T_DEV_RING);
                        vhub_snap_put_u32(w, T_RING_INDEX, q);
                        vhub_snap_put_u32(w, T_RING_SIZE, 256);
                        vhub_snap_put_u64(w, T_RING_DESC, 0x100000ull * (q + 1));
                        vhub_snap_put_u64(w, T_RING_AVAIL, 0x100000ull * (q + 1) + 0x1000);
                        vhub_snap_put_u64(w, T_RING_USED, 0x100000ull * (q + 1) + 0x2000);
                        vhub_snap_put_u32(w, T_RING_BASE, 0);
                        vhub_snap_put_fdname(w, T_RING_KICK, n->kick[d][q]);
                        vhub_snap_put_fdname(w, T_RING_CALL, n->call[d][q]);
                        vhub_snap_put_fdname(w, T_RING_ERR, n->err[d][q]);
                        vhub_snap_end(w);
                }
                vhub_snap_end(w);
        }
        vhub_snap_end(w);
}

static void bench_commit_shape(unsigned regions, unsigned devices, unsigned rings) {
        const unsigned iters = 100000;
        struct vhub_snap_writer w;
        struct vhub_snap_file f;
        const void *doc;
        double t0, t_ser, t_fin, t_all;
        size_t len = 0;
        struct shape_names *names = calloc(1, sizeof(*names));

        if (!names)
                exit(1);
        names_fill(names, regions, devices, rings);
        vhub_snap_writer_init(&w);
        if (vhub_snap_file_create("bench", &f) < 0)
                exit(1);
        /* warm up: buffers grown, slots sized */
        for (unsigned i = 0; i < 1000; i++) {
                vhub_snap_writer_reset(&w);
                write_vm(&w, names, regions, devices, rings, i);
                vhub_snap_file_commit(&f, &w);
        }
        t0 = now_s();
        for (unsigned i = 0; i < iters; i++) {
                vhub_snap_writer_reset(&w);
                write_vm(&w, names, regions, devices, rings, i);
        }
        t_ser = (now_s() - t0) / iters;
        t0 = now_s();
        for (unsigned i = 0; i < iters; i++) {
                vhub_snap_writer_reset(&w);
                write_vm(&w, names, regions, devices, rings, i);
                vhub_snap_finish(&w, 1, &doc, &len);
        }
        t_fin = (now_s() - t0) / iters;
        t0 = now_s();
        for (unsigned i = 0; i < iters; i++) {
                vhub_snap_writer_reset(&w);
                write_vm(&w, names, regions, devices, rings, i);
                if (vhub_snap_file_commit(&f, &w) < 0)
                        exit(1);
        }
        t_all = (now_s() - t0) / iters;
        printf("| %u regions, %u devices x %u rings | %zu B | %.2f µs | %.2f µs | %.2f µs |\n", regions, devices,
               rings, len, t_ser * 1e6, (t_fin - t_ser) * 1e6, t_all * 1e6);
        vhub_snap_file_close(&f);
        vhub_snap_writer_done(&w);
        free(names);
}

static int bench_snapshot(void) {
        printf("## snapshot commit (one VM's memfd; %u iterations each)\n\n", 100000);
        printf("| VM | document | serialize | + header and CRC-32C | commit (serialize, CRC, pwrite) |\n"
               "|---|---|---|---|---|\n");
        bench_commit_shape(8, 4, 2);
        bench_commit_shape(1, 1, 1);
        bench_commit_shape(32, 16, 4);
        bench_commit_shape(64, 64, 2);
        return 0;
}

int main(int argc, char **argv) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        if (argc == 2 && strcmp(argv[1], "push") == 0)
                return bench_push();
        if (argc == 2 && strcmp(argv[1], "snapshot") == 0)
                return bench_snapshot();
        fprintf(stderr, "usage: bench-fdstore push|snapshot\n");
        return 2;
}
