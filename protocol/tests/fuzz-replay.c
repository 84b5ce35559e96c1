/* SPDX-License-Identifier: MIT */
/*
 * Replay a fuzz corpus without libFuzzer: every regular file in each
 * directory (or each file) named on the command line goes through
 * LLVMFuzzerTestOneInput() once.  A crash or abort fails the test; an
 * empty corpus fails too, so a wrong path cannot pass silently.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REPLAY_MAX_INPUT (1024 * 1024)

static int replay_file(const char *path) {
        uint8_t *buf = NULL;
        FILE *f = NULL;
        size_t n;
        int r = -EIO;

        f = fopen(path, "rb");
        if (!f) {
                r = -errno;
                goto out;
        }
        buf = malloc(REPLAY_MAX_INPUT);
        if (!buf) {
                r = -ENOMEM;
                goto out;
        }
        n = fread(buf, 1, REPLAY_MAX_INPUT, f);
        if (ferror(f))
                goto out;
        LLVMFuzzerTestOneInput(buf, n);
        r = 0;
out:
        if (f)
                fclose(f);
        free(buf);
        return r;
}

static int replay_path(const char *path, unsigned *count) {
        struct dirent *de;
        struct stat st;
        DIR *d;
        int r = 0;

        if (stat(path, &st) < 0)
                return -errno;
        if (!S_ISDIR(st.st_mode)) {
                r = replay_file(path);
                if (r == 0)
                        (*count)++;
                return r;
        }
        d = opendir(path);
        if (!d)
                return -errno;
        while ((de = readdir(d))) {
                char file[4096];

                if (de->d_name[0] == '.')
                        continue;
                snprintf(file, sizeof(file), "%s/%s", path, de->d_name);
                if (stat(file, &st) < 0 || !S_ISREG(st.st_mode))
                        continue;
                r = replay_file(file);
                if (r < 0) {
                        fprintf(stderr, "%s: %s\n", file, strerror(-r));
                        break;
                }
                (*count)++;
        }
        closedir(d);
        return r;
}

int main(int argc, char **argv) {
        unsigned count = 0;

        for (int i = 1; i < argc; i++) {
                int r = replay_path(argv[i], &count);

                if (r < 0) {
                        fprintf(stderr, "%s: %s\n", argv[i], strerror(-r));
                        return 1;
                }
        }
        printf("replayed %u inputs\n", count);
        return count > 0 ? 0 : 1;
}
