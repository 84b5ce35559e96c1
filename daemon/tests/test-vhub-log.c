/* SPDX-License-Identifier: MIT */
/*
 * The logging module's text (daemon/vhub-log.c): what the journal's MESSAGE
 * holds for a line about a VM, a device and a request, and the stderr line
 * with its vm=/uid=/device=/request= context.  What reaches the journal
 * itself (fields, CODE_*) is tested against a journal socket the test plays:
 * tests/integration/test_journal_fields.py.
 *
 *   test-vhub-log
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-log.h"

static const char *fmt(const struct vhub_log_about *about, const char *msg) {
        static char buf[256];

        return vhub_log_format_message(about, msg, buf, sizeof(buf));
}

static void test_message(void) {
        struct vhub_log_about vm = { .vm = "vm0", .has_uid = true, .uid = 1000 };
        struct vhub_log_about dev = { .vm = "vm0", .device = "blk0", .has_uid = true, .uid = 1000 };
        struct vhub_log_about req = dev;
        char small[16];

        CHECK(strcmp(fmt(NULL, "started"), "started") == 0);
        CHECK(strcmp(fmt(&vm, "VM created"), "vm0: VM created") == 0);
        CHECK(strcmp(fmt(&dev, "back-end lost: EOF"), "vm0/blk0: back-end lost: EOF") == 0);

        /* the request is added unless the text names it as a word */
        req.request = "GET_VRING_BASE";
        CHECK(strcmp(fmt(&req, "sent GET_VRING_BASE"), "vm0/blk0: sent GET_VRING_BASE") == 0);
        CHECK(strcmp(fmt(&req, "GET_VRING_BASE: no reply"), "vm0/blk0: GET_VRING_BASE: no reply") == 0);
        CHECK(strcmp(fmt(&req, "back-end lost: EOF"), "vm0/blk0: back-end lost: EOF [GET_VRING_BASE]") == 0);
        /* a longer name that starts with it, or one that ends with it, is not it */
        CHECK(strcmp(fmt(&req, "sent GET_VRING_BASE_SKIP_DRAIN"),
                     "vm0/blk0: sent GET_VRING_BASE_SKIP_DRAIN [GET_VRING_BASE]") == 0);
        req.request = "SET_FEATURES";
        CHECK(strcmp(fmt(&req, "sent SET_PROTOCOL_FEATURES"),
                     "vm0/blk0: sent SET_PROTOCOL_FEATURES [SET_FEATURES]") == 0);
        CHECK(strcmp(fmt(&req, "sent SET_PROTOCOL_FEATURES, then SET_FEATURES"),
                     "vm0/blk0: sent SET_PROTOCOL_FEATURES, then SET_FEATURES") == 0);

        /* truncated, always terminated */
        CHECK(strcmp(vhub_log_format_message(&dev, "back-end lost", small, sizeof(small)),
                     "vm0/blk0: back-") == 0);
}

/* What one line on stderr reads (stderr is a memfd for the call). */
static void stderr_line(char *buf, size_t len, void (*emit)(void)) {
        int saved = dup(STDERR_FILENO), mfd = memfd_create("log", MFD_CLOEXEC);
        ssize_t n;

        CHECK(saved >= 0 && mfd >= 0);
        fflush(stderr);
        CHECK(dup2(mfd, STDERR_FILENO) == STDERR_FILENO);
        emit();
        fflush(stderr);
        CHECK(dup2(saved, STDERR_FILENO) == STDERR_FILENO);
        n = pread(mfd, buf, len - 1, 0);
        CHECK(n > 0);
        buf[n] = '\0';
        close(mfd);
        close(saved);
}

static void emit_device(void) {
        vhub_log_at(VHUB_LOG_SITE, LOG_WARNING,
                    &(const struct vhub_log_about){ .vm = "vm0", .device = "blk0", .request = "GET_CONFIG",
                                                    .has_uid = true, .uid = 1000 },
                    "back-end lost: %s", "EOF");
}

static void emit_plain(void) {
        log_info("log level %s", "info");
}

static void emit_debug(void) {
        log_debug("not shown");
        log_info("shown");
}

static void test_stderr(void) {
        char line[512];

        vhub_log_setup(LOG_INFO, false);
        stderr_line(line, sizeof(line), emit_device);
        CHECK(strncmp(line, "vhubd[", 6) == 0);
        CHECK(strstr(line, "] warning: vm=vm0 uid=1000 device=blk0 request=GET_CONFIG back-end lost: EOF\n"));
        stderr_line(line, sizeof(line), emit_plain);
        CHECK(strstr(line, "] info: log level info\n"));
        stderr_line(line, sizeof(line), emit_debug);
        CHECK(!strstr(line, "not shown") && strstr(line, "] info: shown\n"));
}

int main(void) {
        test_message();
        test_stderr();
        return 0;
}
