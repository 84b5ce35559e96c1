/* SPDX-License-Identifier: MIT */
/*
 * An outside user of the installed headers' contract vocabulary, for
 * test_install.py: compiled with nothing but `pkg-config --cflags --libs
 * vhub-client` and strict ISO C, it asks the installed daemon for its API
 * version and for an error, and checks both against <vhub/vhub-contract.h>
 * (reached through <vhub/vhub-client.h>, as users reach it).
 *
 *     contract-user SOCKET      prints "contract: OK" and exits 0 on success
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <vhub/vhub-client.h>

static int fail(const char *what, const char *got) {
        fprintf(stderr, "contract-user: %s%s%s\n", what, got ? ": " : "", got ? got : "");
        return 1;
}

int main(int argc, char **argv) {
        struct vhub_client_error err;
        struct vhub_client *c = NULL;
        json_t *res = NULL;
        const char *version;
        int r, ret = 1;

        if (argc != 2)
                return fail("usage: contract-user SOCKET", NULL);
        r = vhub_client_connect(argv[1], &c);
        if (r < 0)
                return fail("connect", strerror(-r));

        r = vhub_client_call(c, "daemon.info", NULL, NULL, 0, 5000, &res, NULL, NULL, &err);
        if (r < 0) {
                fail("daemon.info", r == -EREMOTEIO ? err.message : strerror(-r));
                goto out;
        }
        version = json_string_value(json_object_get(res, "api_version"));
        if (!version || strcmp(version, VHUB_API_VERSION) != 0) {
                fail("daemon.info's api_version is not VHUB_API_VERSION", version);
                goto out;
        }
        printf("api_version %s\n", version);

        r = vhub_client_call(c, "vm.destroy", json_pack("{s:s}", "vm", "contract-user-none"), NULL, 0,
                             5000, NULL, NULL, NULL, &err);
        if (r != -EREMOTEIO || err.code != VHUB_ERR_NO_VM) {
                fail("vm.destroy of no VM is not VHUB_ERR_NO_VM", r == -EREMOTEIO ? err.message : strerror(-r));
                goto out;
        }
        if (!vhub_contract_error_message(err.code) ||
            strcmp(err.message, vhub_contract_error_message(err.code)) != 0 ||
            !vhub_client_error_code_name(err.code) ||
            strcmp(vhub_client_error_code_name(err.code), err.message) != 0) {
                fail("the daemon's message is not the header's", err.message);
                goto out;
        }
        printf("error %d: %s\n", err.code, err.message);

        if (strcmp(vhub_contract_event_name(VHUB_EV_DISCONNECTED), "device.disconnected") != 0 ||
            vhub_contract_event_name(-1) != NULL) {
                fail("event names", NULL);
                goto out;
        }
        printf("contract: OK\n");
        ret = 0;
out:
        json_decref(res);
        vhub_client_free(c);
        return ret;
}
