/* SPDX-License-Identifier: MIT */
/*
 * What a restart carries of the control connections (control/control-carry.c):
 * every record up to the guaranteed size fits whatever others carry, one
 * non-root uid gets at most a quarter of the pool, non-root uids together
 * leave root its quarter, and no record is over the per-connection bound;
 * a uid's entry goes when its records no longer use the pool.
 */
#include "control-internal.h"
#include "vhub-check.h"

#include <stdio.h>

#define KIB 1024u
#define MIB (1024u * 1024u)

static struct control_carry *budget(unsigned max_connections) {
        struct control_server s = { .opts = { .max_connections = max_connections } };
        struct control_carry *b = control_carry_new(&s);

        CHECK(b);
        return b;
}

int main(void) {
        struct control_carry *b = budget(256);
        unsigned carried = 0;

        /* asking counts nothing */
        for (int i = 0; i < 64; i++)
                CHECK(control_carry_refuses(b, 65534, MIB) == NULL);
        CHECK(control_carry_refuses(b, 65534, 9 * MIB) != NULL);
        /* one uid's 1 MiB records: 8 MiB of the 32 MiB pool, then no more */
        for (int i = 0; i < 64; i++)
                carried += control_carry_admit(b, 65534, MIB) == NULL;
        CHECK(carried == 8);
        CHECK(control_carry_refuses(b, 65534, MIB) != NULL);
        /* its small records still fit: they are guaranteed */
        CHECK(control_carry_admit(b, 65534, 64 * KIB) == NULL);
        /* two more uids take as much; a fourth finds the non-root part
         * (all of the pool but root's quarter) nearly used up ... */
        for (uid_t u = 1000; u < 1002; u++)
                for (int i = 0; i < 8; i++)
                        CHECK(control_carry_admit(b, u, MIB) == NULL);
        CHECK(control_carry_admit(b, 1002, MIB) == NULL);
        CHECK(control_carry_admit(b, 1002, MIB) != NULL);
        /* ... its small records still fit */
        CHECK(control_carry_admit(b, 1002, 60 * KIB) == NULL);
        /* root still has at least a non-root uid's share, then no more */
        carried = 0;
        while (carried < 64 && control_carry_admit(b, 0, MIB) == NULL)
                carried++;
        CHECK(carried >= 8 && carried < 64);
        control_carry_free(b);

        /* a record over the per-connection bound, even root's, alone */
        b = budget(256);
        CHECK(control_carry_admit(b, 0, 9 * MIB) != NULL);
        CHECK(control_carry_admit(b, 0, 8 * MIB) == NULL);
        control_carry_free(b);

        /* many connections: the guaranteed part shrinks so that every
         * connection's still fits in a third of the total */
        b = budget(4096);
        for (int i = 0; i < 4096; i++)
                CHECK(control_carry_admit(b, 65534, 4 * KIB) == NULL);
        control_carry_free(b);

        /* many uids' connections come and go: each uid above its guarantee
         * has an entry while its records use the pool, none after */
        b = budget(256);
        for (int round = 0; round < 3; round++) {
                for (uid_t u = 2000; u < 2400; u++)
                        CHECK(control_carry_admit(b, u, 80 * KIB) == NULL);
                CHECK(control_carry_uids(b) == 400);
                /* a refused record and a guaranteed one make no entry */
                CHECK(control_carry_refuses(b, 5000, MIB) == NULL);
                CHECK(control_carry_admit(b, 5001, 9 * MIB) != NULL);
                CHECK(control_carry_admit(b, 5002, 4 * KIB) == NULL);
                CHECK(control_carry_uids(b) == 400);
                for (uid_t u = 2000; u < 2400; u++)
                        control_carry_release(b, u, 80 * KIB);
                control_carry_release(b, 5002, 4 * KIB);
                CHECK(control_carry_uids(b) == 0);
        }
        /* a uid's entry stays while any of its records uses the pool */
        CHECK(control_carry_admit(b, 3000, MIB) == NULL);
        CHECK(control_carry_admit(b, 3000, MIB) == NULL);
        control_carry_release(b, 3000, MIB);
        CHECK(control_carry_uids(b) == 1);
        control_carry_release(b, 3000, MIB);
        CHECK(control_carry_uids(b) == 0);
        /* what was given back is there again: the uid's whole share */
        carried = 0;
        while (carried < 64 && control_carry_admit(b, 3000, MIB) == NULL)
                carried++;
        CHECK(carried == 8);
        control_carry_free(b);      /* with entries left: freed (valgrind) */

        printf("ok\n");
        return 0;
}
