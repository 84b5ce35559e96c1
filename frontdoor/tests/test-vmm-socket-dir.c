/* SPDX-License-Identifier: MIT */
/*
 * The front-door socket directory (frontdoor/vhub-vmm-socket-dir.c) and the
 * listener in front of it (vhub-vmm-listener.c), as root for another uid:
 * <vmm-dir>/<uid>/<vm>/<device>.sock with 0700 directories and a 0600
 * socket owned by that uid, reachable by it and by nobody else; symlinks
 * and foreign directories planted on the way are refused with nothing
 * created behind them; a stale socket is replaced, a live one or a file is
 * left alone; removal takes only the daemon's own inode, and the VM's
 * directory once empty; one VMM at a time, others accepted and closed.
 * fd counts back to the start.
 *
 *   test-vmm-socket-dir
 */
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "vhub-vmm-listener.h"
#include "vhub-vmm-socket-dir.h"
#include "vmm-test.h"

static char top[64];
static bool as_root;
static uid_t user;             /* the VM's uid */
static uid_t other;            /* somebody else */

static const char *at(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static const char *at(const char *fmt, ...) {
        static char buf[4][PATH_MAX];
        static unsigned i;
        char *p = buf[i++ % 4], rel[PATH_MAX - 128];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(rel, sizeof(rel), fmt, ap);
        va_end(ap);
        snprintf(p, PATH_MAX, "%s/%s", top, rel);
        return p;
}

static struct vhub_cred cred_of(uid_t uid) {
        return (struct vhub_cred){ .uid = uid, .gid = (gid_t)uid };
}

static bool exists(const char *path) {
        struct stat st;

        return lstat(path, &st) == 0;
}

static bool dir_is_empty(const char *path) {
        DIR *d = opendir(path);
        struct dirent *de;
        int n = 0;

        CHECK(d);
        while ((de = readdir(d)))
                if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                        n++;
        closedir(d);
        return n == 0;
}

static void check_node(const char *path, mode_t type, mode_t mode, uid_t uid) {
        struct stat st;

        CHECK(lstat(path, &st) == 0);
        CHECK_EQ(st.st_mode & S_IFMT, type);
        CHECK_EQ(st.st_mode & 07777, mode);
        CHECK_EQ(st.st_uid, uid);
        CHECK_EQ(st.st_gid, (gid_t)uid);
}

/* A child process that connects to a socket as another uid. */
struct client {
        pid_t pid;
        int result;                   /* read end: the child's one-byte verdict */
};

/*
 * The child connects to path as uid; expect_eof: it then waits for the
 * daemon to close the connection.  Verdict: 0 done, 2 EACCES, 3 other
 * connect error, 4 no EOF, 5 cannot become uid.  It tells through a pipe
 * and kills itself, so that no exit handler of the parent's (valgrind's
 * leak check among them) runs in it.
 */
static struct client spawn_client(const char *path, uid_t uid, bool expect_eof) {
        struct client c;
        int p[2];

        CHECK(pipe2(p, O_CLOEXEC) == 0);
        c.pid = fork();
        CHECK(c.pid >= 0);
        if (c.pid == 0) {
                struct sockaddr_un sa = { .sun_family = AF_UNIX };
                struct pollfd pfd;
                char verdict = 0, byte;
                int fd;

                if (uid != geteuid() &&
                    (setgroups(0, NULL) < 0 || setgid((gid_t)uid) < 0 || setuid(uid) < 0)) {
                        verdict = 5;
                        goto out;
                }
                snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
                fd = socket(AF_UNIX, SOCK_STREAM, 0);
                if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
                        verdict = errno == EACCES ? 2 : 3;
                        goto out;
                }
                if (expect_eof) {
                        pfd = (struct pollfd){ .fd = fd, .events = POLLIN };
                        if (poll(&pfd, 1, TEST_WAIT_MS) != 1 || read(fd, &byte, 1) != 0)
                                verdict = 4;
                }
        out:
                if (write(p[1], &verdict, 1) != 1)
                        _exit(1);
                raise(SIGKILL);
        }
        close(p[1]);
        c.result = p[0];
        return c;
}

static int client_status(struct client c) {
        char verdict;
        int status;

        CHECK(read(c.result, &verdict, 1) == 1);
        close(c.result);
        CHECK(waitpid(c.pid, &status, 0) == c.pid);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        return verdict;
}

static struct vhub_vmm_dir *open_vmm_dir(void) {
        struct vhub_error err = { 0 };
        struct vhub_vmm_dir *d = NULL;

        CHECK_EQ(vhub_vmm_dir_open(at("vmm"), &err, &d), 0);
        CHECK(strcmp(vhub_vmm_dir_path(d), at("vmm")) == 0);
        return d;
}

static int create(struct vhub_vmm_dir *d, uid_t uid, const char *vm, const char *device,
                  struct vhub_error *err, struct vhub_vmm_socket **s, char **path) {
        struct vhub_cred owner = cred_of(uid);

        memset(err, 0, sizeof(*err));
        *s = NULL;
        *path = NULL;
        return vhub_vmm_socket_create(d, &owner, vm, device, err, s, path);
}

static void test_vmm_dir(void) {
        struct vhub_error err = { 0 };
        struct vhub_vmm_dir *d = NULL;
        int base_fds = vhub_count_open_fds();

        /* created 0755 when missing */
        d = open_vmm_dir();
        check_node(at("vmm"), S_IFDIR, 0755, geteuid());
        d = vhub_vmm_dir_free(d);
        CHECK(vhub_vmm_dir_open("relative/vmm", &err, &d) < 0);
        /* writable by others: root would create per-uid directories where anyone can plant things */
        CHECK(mkdir(at("open"), 0777) == 0 && chmod(at("open"), 0777) == 0);
        CHECK_EQ(vhub_vmm_dir_open(at("open"), &err, &d), -EPERM);
        CHECK(strstr(err.detail, "that only it can write"));
        CHECK(symlink(at("vmm"), at("link")) == 0);
        CHECK(vhub_vmm_dir_open(at("link"), &err, &d) < 0);
        CHECK(d == NULL);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

static void test_create_and_remove(void) {
        struct vhub_vmm_socket *s0, *s1;
        struct vhub_vmm_dir *d = open_vmm_dir();
        int base_fds = vhub_count_open_fds();
        struct vhub_error err;
        char *p0, *p1;
        int fd0, fd1;

        fd0 = create(d, user, "vm0", "blk0", &err, &s0, &p0);
        CHECK(fd0 >= 0);
        CHECK(strcmp(p0, at("vmm/%u/vm0/blk0.sock", (unsigned)user)) == 0);
        check_node(at("vmm/%u", (unsigned)user), S_IFDIR, 0700, user);
        check_node(at("vmm/%u/vm0", (unsigned)user), S_IFDIR, 0700, user);
        check_node(p0, S_IFSOCK, 0600, user);
        {
                int fl = fcntl(fd0, F_GETFL), fdfl = fcntl(fd0, F_GETFD);

                CHECK((fl & O_NONBLOCK) && (fdfl & FD_CLOEXEC));
        }
        /* the VM's uid reaches it; nobody else does */
        CHECK_EQ(client_status(spawn_client(p0, user, false)), 0);
        if (as_root)
                CHECK_EQ(client_status(spawn_client(p0, other, false)), 2);

        /* a second device shares the VM's directory */
        fd1 = create(d, user, "vm0", "blk1", &err, &s1, &p1);
        CHECK(fd1 >= 0);
        check_node(p1, S_IFSOCK, 0600, user);
        s0 = vhub_vmm_socket_remove(s0);
        CHECK(!exists(p0));
        CHECK(exists(at("vmm/%u/vm0", (unsigned)user)));
        s1 = vhub_vmm_socket_remove(s1);
        CHECK(!exists(p1));
        CHECK(!exists(at("vmm/%u/vm0", (unsigned)user))); /* the last one takes the VM's directory */
        CHECK(exists(at("vmm/%u", (unsigned)user)));
        close(fd0);
        close(fd1);
        free(p0);
        free(p1);
        vhub_vmm_dir_free(d);
        CHECK_EQ(vhub_count_open_fds(), base_fds - 1);
}

/* A stale socket is replaced; a live one and a file are left alone; the
 * record of a replaced socket removes nothing. */
static void test_existing_names(void) {
        struct vhub_vmm_dir *d = open_vmm_dir();
        struct vhub_vmm_socket *s1, *s2, *s3;
        struct vhub_error err;
        char *p1, *p2, *p3;
        int fd1, fd2, fd3;
        struct stat before, after;

        fd1 = create(d, user, "vm1", "net0", &err, &s1, &p1);
        CHECK(fd1 >= 0);
        close(fd1); /* the daemon died: the name stays, nobody listens */
        CHECK(lstat(p1, &before) == 0);
        fd2 = create(d, user, "vm1", "net0", &err, &s2, &p2);
        CHECK(fd2 >= 0);
        CHECK(lstat(p2, &after) == 0);
        CHECK(before.st_ino != after.st_ino);
        /* the old record finds another inode under its name: it stays */
        s1 = vhub_vmm_socket_remove(s1);
        CHECK(lstat(p2, &before) == 0 && before.st_ino == after.st_ino);
        CHECK_EQ(client_status(spawn_client(p2, user, false)), 0);

        /* live: refused, left as it is */
        fd3 = create(d, user, "vm1", "net0", &err, &s3, &p3);
        CHECK_EQ(fd3, -EADDRINUSE);
        CHECK_EQ(err.code, VHUB_ERR_EXISTS);
        CHECK(s3 == NULL && p3 == NULL);
        CHECK(lstat(p2, &before) == 0 && before.st_ino == after.st_ino);

        /* something that is no socket: refused, left as it is */
        {
                int f = open(at("vmm/%u/vm1/fs0.sock", (unsigned)user), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);

                CHECK(f >= 0 && write(f, "keep", 4) == 4);
                close(f);
        }
        fd3 = create(d, user, "vm1", "fs0", &err, &s3, &p3);
        CHECK_EQ(fd3, -EEXIST);
        CHECK_EQ(err.code, VHUB_ERR_EXISTS);
        CHECK(lstat(at("vmm/%u/vm1/fs0.sock", (unsigned)user), &before) == 0 && before.st_size == 4);
        CHECK(unlink(at("vmm/%u/vm1/fs0.sock", (unsigned)user)) == 0);

        /* renamed away and replaced by someone's file: removal leaves it */
        CHECK(rename(p2, at("vmm/%u/vm1/moved.sock", (unsigned)user)) == 0);
        {
                int f = open(p2, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);

                CHECK(f >= 0);
                close(f);
        }
        s2 = vhub_vmm_socket_remove(s2);
        CHECK(exists(p2));
        CHECK(unlink(p2) == 0);
        CHECK(unlink(at("vmm/%u/vm1/moved.sock", (unsigned)user)) == 0);
        CHECK(rmdir(at("vmm/%u/vm1", (unsigned)user)) == 0);
        close(fd2);
        free(p1);
        free(p2);
        vhub_vmm_dir_free(d);
}

/* What a uid plants in its own directories cannot make root create or
 * remove anything elsewhere. */
static void test_planted(void) {
        struct vhub_vmm_dir *d = open_vmm_dir();
        struct vhub_vmm_socket *s;
        struct vhub_error err;
        char *p;
        int fd;

        CHECK(mkdir(at("outside"), 0777) == 0);
        if (as_root) {
                /* <uid> as a symlink (a root-owned <vmm-dir> makes this an
                 * admin's mistake, but it must not be followed) */
                CHECK(symlink(at("outside"), at("vmm/%u", (unsigned)other)) == 0);
                fd = create(d, other, "vm0", "blk0", &err, &s, &p);
                CHECK_EQ(fd, -EPERM);
                CHECK(s == NULL);
                CHECK(dir_is_empty(at("outside")));
                CHECK(unlink(at("vmm/%u", (unsigned)other)) == 0);

                /* <uid> of somebody else */
                CHECK(mkdir(at("vmm/%u", (unsigned)other), 0700) == 0);
                CHECK(chown(at("vmm/%u", (unsigned)other), user, user) == 0);
                fd = create(d, other, "vm0", "blk0", &err, &s, &p);
                CHECK_EQ(fd, -EPERM);
                CHECK(strstr(err.detail, "belongs to uid"));
                CHECK(dir_is_empty(at("vmm/%u", (unsigned)other)));
                CHECK(rmdir(at("vmm/%u", (unsigned)other)) == 0);
        }

        /* <vm> as the uid's symlink to a directory it may write */
        fd = create(d, user, "vmA", "blk0", &err, &s, &p);
        CHECK(fd >= 0);
        close(fd);
        s = vhub_vmm_socket_remove(s);
        free(p);
        CHECK(symlink(at("outside"), at("vmm/%u/vmB", (unsigned)user)) == 0);
        if (as_root)
                CHECK(lchown(at("vmm/%u/vmB", (unsigned)user), user, user) == 0);
        fd = create(d, user, "vmB", "blk0", &err, &s, &p);
        CHECK_EQ(fd, -EPERM);
        CHECK(s == NULL && p == NULL);
        CHECK(dir_is_empty(at("outside")));
        CHECK(unlink(at("vmm/%u/vmB", (unsigned)user)) == 0);

        /* <vm> that is not the uid's (root planted it: the uid cannot) */
        if (as_root) {
                CHECK(mkdir(at("vmm/%u/vmC", (unsigned)user), 0777) == 0);
                fd = create(d, user, "vmC", "blk0", &err, &s, &p);
                CHECK_EQ(fd, -EPERM);
                CHECK_EQ(err.code, VHUB_ERR_INTERNAL);
                CHECK(strstr(err.detail, "does not belong to uid"));
                CHECK(dir_is_empty(at("vmm/%u/vmC", (unsigned)user)));
                CHECK(rmdir(at("vmm/%u/vmC", (unsigned)user)) == 0);
        }

        /* the uid made its own directories public: made private again */
        CHECK(chmod(at("vmm/%u", (unsigned)user), 0777) == 0);
        CHECK(mkdir(at("vmm/%u/vmD", (unsigned)user), 0777) == 0);
        if (as_root)
                CHECK(chown(at("vmm/%u/vmD", (unsigned)user), user, user) == 0);
        CHECK(chmod(at("vmm/%u/vmD", (unsigned)user), 0777) == 0);
        fd = create(d, user, "vmD", "blk0", &err, &s, &p);
        CHECK(fd >= 0);
        check_node(at("vmm/%u", (unsigned)user), S_IFDIR, 0700, user);
        check_node(at("vmm/%u/vmD", (unsigned)user), S_IFDIR, 0700, user);
        close(fd);
        vhub_vmm_socket_remove(s);
        free(p);
        CHECK(rmdir(at("outside")) == 0);
        vhub_vmm_dir_free(d);
}

/* A path no VMM could connect to is refused before anything is created. */
static void test_name_too_long(void) {
        struct vhub_vmm_dir *d = open_vmm_dir();
        char vm[65], dev[65];
        struct vhub_vmm_socket *s;
        struct vhub_error err;
        char *p;

        memset(vm, 'v', 64);
        vm[64] = '\0';
        memset(dev, 'd', 64);
        dev[64] = '\0';
        CHECK_EQ(create(d, user, vm, dev, &err, &s, &p), -ENAMETOOLONG);
        CHECK_EQ(err.code, VHUB_ERR_PARAMS);
        CHECK(strstr(err.detail, "would be longer than 107 bytes"));
        CHECK(!exists(at("vmm/%u/%s", (unsigned)user, vm)));
        vhub_vmm_dir_free(d);
}

/* ---- the listener ---- */

struct listen_side {
        int vmm_fd;                   /* the attached VMM's connection */
        unsigned connects;
        unsigned refused_busy, refused_peer;
        uid_t refused_uid;
};

static void on_connect(void *userdata, int fd) {
        struct listen_side *ls = userdata;

        CHECK(ls->vmm_fd < 0);
        CHECK((fcntl(fd, F_GETFL) & O_NONBLOCK) && (fcntl(fd, F_GETFD) & FD_CLOEXEC));
        ls->vmm_fd = fd;
        ls->connects++;
}

static void on_refused(void *userdata, enum vhub_vmm_refusal why, uid_t uid) {
        struct listen_side *ls = userdata;

        if (why == VHUB_VMM_REFUSED_BUSY)
                ls->refused_busy++;
        else
                ls->refused_peer++;
        ls->refused_uid = uid;
}

static const struct vhub_vmm_listener_ops listener_ops = { .on_connect = on_connect,
                                                           .on_refused = on_refused };

static void test_listener(void) {
        struct vhub_vmm_dir *d = open_vmm_dir();
        struct listen_side ls = { .vmm_fd = -1 };
        struct vhub_vmm_listener *l = NULL;
        struct event_base *base = event_base_new();
        struct vhub_vmm_socket *s;
        struct vhub_error err;
        struct client pending;
        int base_fds;
        char *p;
        int fd;

        fd = create(d, user, "vmL", "blk0", &err, &s, &p);
        CHECK(fd >= 0);
        base_fds = vhub_count_open_fds();
        CHECK_EQ(vhub_vmm_listener_new(base, fd, user, &listener_ops, &ls, &l), 0);

        /* the first VMM is handed over */
        CHECK_EQ(client_status(spawn_client(p, user, false)), 0);
        LOOP_UNTIL(base, ls.connects == 1);
        CHECK(vhub_vmm_listener_busy(l));
        /* a second one, while the first is attached: accepted and closed */
        pending = spawn_client(p, user, true);
        LOOP_UNTIL(base, ls.refused_busy == 1);
        CHECK_EQ(client_status(pending), 0);
        CHECK_EQ(ls.refused_uid, user);
        CHECK_EQ(ls.connects, 1);

        /* the first leaves: the next one is handed over */
        close(ls.vmm_fd);
        ls.vmm_fd = -1;
        vhub_vmm_listener_release(l);
        CHECK(!vhub_vmm_listener_busy(l));
        CHECK_EQ(client_status(spawn_client(p, user, false)), 0);
        LOOP_UNTIL(base, ls.connects == 2);
        close(ls.vmm_fd);
        ls.vmm_fd = -1;
        vhub_vmm_listener_release(l);

        /* a uid that is neither the owner nor root, on a socket it can reach
         * (made public here on purpose): refused even when free */
        if (as_root) {
                CHECK(chmod(at("vmm/%u", (unsigned)user), 0711) == 0);
                CHECK(chmod(at("vmm/%u/vmL", (unsigned)user), 0711) == 0);
                CHECK(chmod(p, 0666) == 0);
                pending = spawn_client(p, other, true);
                LOOP_UNTIL(base, ls.refused_peer == 1);
                CHECK_EQ(client_status(pending), 0);
                CHECK_EQ(ls.refused_uid, other);
                CHECK_EQ(ls.connects, 2);
                CHECK(!vhub_vmm_listener_busy(l));
        }
        l = vhub_vmm_listener_free(l);
        CHECK_EQ(vhub_count_open_fds(), base_fds - 1); /* the listening fd went with it */
        vhub_vmm_socket_remove(s);
        CHECK(!exists(p));
        free(p);
        event_base_free(base);
        vhub_vmm_dir_free(d);
}

int main(void) {
        int base_fds;

        snprintf(top, sizeof(top), "/tmp/vmm-socket-dir.XXXXXX");
        CHECK(mkdtemp(top));
        CHECK(chmod(top, 0755) == 0); /* other uids reach what is below */
        as_root = geteuid() == 0;
        user = as_root ? 12345 : geteuid();
        other = 23456;
        if (!as_root)
                printf("not root: the cross-uid checks are skipped (the suite runs them as root)\n");
        base_fds = vhub_count_open_fds();

        test_vmm_dir();
        test_create_and_remove();
        test_existing_names();
        test_planted();
        test_name_too_long();
        test_listener();

        CHECK_EQ(vhub_count_open_fds(), base_fds);
        CHECK(rmdir(at("vmm/%u", (unsigned)user)) == 0);
        CHECK(rmdir(at("vmm")) == 0);
        CHECK(rmdir(at("open")) == 0);
        CHECK(unlink(at("link")) == 0);
        CHECK(rmdir(top) == 0); /* nothing else was left behind */
        printf("vmm-socket-dir: all passed\n");
        return 0;
}
