/* SPDX-License-Identifier: MIT */
/*
 * vhubctl: the command table -- each command's words, arguments, options and
 * the help `vhubctl help COMMAND` (or `COMMAND --help`) prints from them.
 * docs/vhubctl.1 says the same at more length; the vhubctl test checks that
 * both name the same options.
 */
#include <stdio.h>
#include <string.h>

#include "vhubctl.h"

#define END { NULL, NULL, false, NULL }

static const struct ctl_opt_spec opts_vm_create[] = {
        { "linger-ms", "N", false,
          "keep the VM N ms after vhubctl exits, waiting for `vm attach` (at most 7 days)" },
        { "hold", NULL, false, "keep the connection, and so the VM, until interrupted; print its events" },
        END,
};
static const struct ctl_opt_spec opts_vm_attach[] = {
        { "hold", NULL, false, "keep the connection until interrupted, printing the VM's events" },
        END,
};
static const struct ctl_opt_spec opts_memory_add[] = {
        { "memfd", "SIZE", false, "back the region with a new memfd of SIZE bytes instead of FILE" },
        { "size", "N", false, "the region's size (default: what is left of FILE or the memfd after --offset)" },
        { "offset", "N", false, "where the region starts in FILE or the memfd (default 0)" },
        { "uaddr", "N", false, "the VMM's address for the region (default: GPA)" },
        END,
};
static const struct ctl_opt_spec opts_dirty_start[] = {
        { "save", "FILE", false, "write the log bitmap, as it is now, to FILE" },
        END,
};
static const struct ctl_opt_spec opts_so_add[] = {
        { "memfd", "SIZE", false, "export a new memfd of SIZE bytes instead of FILE" },
        END,
};
static const struct ctl_opt_spec opts_device_add[] = {
        { "type", "T", false,
          "the virtio device type (blk, net, fs, scsi, vsock, gpu, console, crypto, snd, i2c, gpio, "
          "scmi, ...): informational; `device list` shows it and names the type's feature bits" },
        { "mode", "client|server", false, "connect to SOCKET (client, the default) or listen on it (server)" },
        { "queues", "N", false, "the virtqueues the VMM will use (default: what the back-end reports)" },
        { "reconnect-ms", "N", false,
          "delay before the first reconnect after a loss (default 100; 0: never, the device fails)" },
        { "vmm-socket", NULL, false,
          "a front-door device: the daemon also listens on a socket of its own where an unmodified "
          "VMM (QEMU, cloud-hypervisor) connects as if to the back-end; prints its path" },
        END,
};
static const struct ctl_opt_spec opts_device_start[] = {
        { "features", "F", false, "the virtio features the driver acked (required)" },
        { "vrings", "JSON|@FILE|-", false,
          "the rings: a JSON array of {index,size,desc,avail,used,base?} (required); vhubctl makes "
          "a kick and a call eventfd for each unless \"kick\"/\"call\"/\"err\" name fds it inherited" },
        END,
};
static const struct ctl_opt_spec opts_config_get[] = {
        { "base64", NULL, false, "print base64 instead of a hex dump" },
        { "raw", NULL, false, "write the bytes themselves to standard output" },
        END,
};
static const struct ctl_opt_spec opts_config_set[] = {
        { "base64", NULL, false, "the data argument (B64) is base64, not hex" },
        { "file", "FILE", false, "the bytes from FILE (-: standard input) instead of a data argument" },
        END,
};
static const struct ctl_opt_spec opts_state[] = {
        { "no-check", NULL, false, "do not run `device state check` after the transfer" },
        END,
};
static const struct ctl_opt_spec opts_device_stop[] = {
        { "no-drain", NULL, false,
          "suspend the requests in flight instead of waiting for them (GET_VRING_BASE_SKIP_DRAIN)" },
        END,
};
static const struct ctl_opt_spec opts_events[] = {
        { "vm", "VM", false, "only this VM's events" },
        { "all", NULL, false,
          "the events of every VM the caller may see: its uid's; root: every uid's (the default without --vm)" },
        { "count", "N", false, "exit after N events" },
        END,
};
static const struct ctl_opt_spec opts_call[] = {
        { "fd", "FILE", true, "add FILE, opened read-write (else read-only), as the next fd" },
        { "memfd", "SIZE", true, "add a new memfd of SIZE bytes as the next fd" },
        { "eventfd", NULL, true, "add a new eventfd as the next fd" },
        END,
};

const struct ctl_command ctl_commands[] = {
        { "daemon info", "", "version, pid, uptime, counts and protocol features of the daemon",
          "Version and API version, pid, start time and uptime, restarts, the number of VMs and devices "
          "the caller may see, the daemon's capabilities, and the vhost-user protocol features it "
          "supports, in hex and by name.",
          "vhubctl daemon info\nvhubctl --json daemon info",
          NULL, 0, 0, cmd_daemon_info },
        { "vm create", "VM [--linger-ms N] [--hold]", "create a VM (needs --linger-ms or --hold to outlive vhubctl)",
          "Create a VM (a name of 1-64 characters of [A-Za-z0-9._-]).  A VM lives as long as the connection "
          "that created it: without --linger-ms or --hold it is destroyed as soon as vhubctl exits.",
          "vhubctl vm create vm0 --linger-ms 600000\nvhubctl vm create scratch --hold",
          opts_vm_create, 1, 1, cmd_vm_create },
        { "vm attach", "VM [--hold]", "take over a lingering VM (restarts its linger time when vhubctl exits)",
          "Take over a lingering VM of the caller's uid (error -32004 while another connection owns it).  "
          "When vhubctl exits, the VM lingers again for its linger time.",
          "vhubctl vm attach vm0 --hold",
          opts_vm_attach, 1, 1, cmd_vm_attach },
        { "vm destroy", "VM", "stop and remove every device, then the VM",
          "Stop and remove every device of the VM, then the VM itself.",
          "vhubctl vm destroy vm0",
          NULL, 1, 1, cmd_vm_destroy },
        { "vm list", "", "the VMs this uid may see (root: all)",
          "Columns VM, UID, REGIONS, LINGER (for a VM without an owner: the time left before it is "
          "destroyed; - while a connection owns it), DEVICES.  Root sees every uid's VMs; with --uid N "
          "only that uid's.",
          "vhubctl vm list\nvhubctl --uid 1000 vm list",
          NULL, 0, 0, cmd_vm_list },
        { "vm memory add", "VM GPA (FILE | --memfd SIZE) [--size N] [--offset N] [--uaddr N]",
          "add a guest RAM region backed by FILE or a new memfd",
          "Add a guest RAM region at guest-physical address GPA, backed by FILE (opened read-write) or by "
          "a new memfd.  Every device of the VM has mapped it when the command returns.  Numbers are "
          "decimal or 0x hex; sizes also take K, M, G, T.",
          "vhubctl vm memory add vm0 0 --memfd 1G\n"
          "vhubctl vm memory add vm0 0x100000000 /dev/hugepages/vm0 --offset 1G --size 1G",
          opts_memory_add, 2, 3, cmd_vm_memory_add },
        { "vm memory remove", "VM GPA", "remove the region at GPA",
          "Remove the region that starts at GPA; every device drops it before the command returns.",
          "vhubctl vm memory remove vm0 0x100000000",
          NULL, 2, 2, cmd_vm_memory_remove },
        { "vm memory list", "VM", "the VM's guest RAM regions",
          "Columns GPA, SIZE, OFFSET, UADDR.",
          "vhubctl vm memory list vm0",
          NULL, 1, 1, cmd_vm_memory_list },
        { "vm dirty-log start", "VM [--save FILE]", "start dirty-page logging on every device",
          "Start dirty-page logging on every device of the VM (they must have acked LOG_ALL).  The daemon "
          "returns the log, one bit per 4 KiB page; vhubctl prints its size.  Logging goes on after "
          "vhubctl exits, until `vm dirty-log stop`.",
          "vhubctl vm dirty-log start vm0 --save dirty.bin",
          opts_dirty_start, 1, 1, cmd_vm_dirty_log_start },
        { "vm dirty-log stop", "VM", "stop dirty-page logging",
          "Stop dirty-page logging on every device of the VM.",
          "vhubctl vm dirty-log stop vm0",
          NULL, 1, 1, cmd_vm_dirty_log_stop },
        { "device add",
          "VM DEVICE SOCKET [--type T] [--mode client|server] [--queues N] [--reconnect-ms N] [--vmm-socket]",
          "connect a vhost-user back-end",
          "Connect to (client mode) or listen on (server mode) the back-end socket, negotiate and set up "
          "the device.  Prints the back-end's virtio features (named for --type's device type) and the "
          "negotiated protocol features, in hex and by name, the number of queues and of memory slots.  "
          "SOCKET must lie in one of the daemon's back-end directories (-32010 otherwise; inside them, "
          "a socket that does not exist is named as such).  With --vmm-socket, also the socket a VMM "
          "connects to (the front door: docs/front-door.md); the VM must outlive vhubctl, so create it "
          "with `vm create --linger-ms`.",
          "vhubctl device add vm0 blk0 /run/vhost-user/blk0.sock --type blk\n"
          "vhubctl device add vm0 net0 /run/vhost-user/net0.sock --type net --mode server --queues 4\n"
          "vhubctl device add vm0 blk0 /run/vhost-user/blk0.sock --type blk --vmm-socket",
          opts_device_add, 3, 3, cmd_device_add },
        { "device remove", "VM DEVICE", "stop and disconnect a device",
          "Stop the device if it runs, cancel a pending reconnect and disconnect it.",
          "vhubctl device remove vm0 blk0",
          NULL, 2, 2, cmd_device_remove },
        { "device list", "VM [DEVICE]", "the VM's devices and their states",
          "Columns DEVICE, TYPE, STATE, VMM, QUEUES, RECONNECTS, FEATURES, ACKED, PROTOCOL (hex), SOCKET.  "
          "VMM is a front-door device's: connected, or waiting for its VMM (- for the others).  "
          "With DEVICE, that device alone, its features also by name: the generic virtio bits, its "
          "type's own bits, and the protocol features; a front-door device's VMM socket too.",
          "vhubctl device list vm0\nvhubctl device list vm0 blk0",
          NULL, 1, 2, cmd_device_list },
        { "device stats", "VM DEVICE", "the device's counters: requests, losses, durations",
          "The device's control-plane counters since it was added: its state and for how long, vhost-user "
          "requests sent and replies received, timeouts, losses and restores, the last loss (when and "
          "why), requests the back-end sent on its channel, the last handshake's and the last restore's "
          "duration, and the VMM eventfd writes skipped (an eventfd whose counter was full).",
          "vhubctl device stats vm0 blk0\nvhubctl --json device stats vm0 blk0",
          NULL, 2, 2, cmd_device_stats },
        { "device start", "VM DEVICE --features F --vrings JSON|@FILE|-",
          "start the vrings (for testing: vhubctl makes the eventfds)",
          "Start the device's vrings with the features the driver acked.  The eventfds vhubctl makes are "
          "closed when it exits -- a command-line tool cannot serve the rings -- so this is for testing "
          "a back-end's setup; a VMM uses the API itself.",
          "vhubctl device start vm0 blk0 --features 0x100000000 \\\n"
          "    --vrings '[{\"index\":0,\"size\":256,\"desc\":\"0x100000\",\"avail\":\"0x101000\","
          "\"used\":\"0x102000\"}]'",
          opts_device_start, 2, 2, cmd_device_start },
        { "device stop", "VM DEVICE [--no-drain]",
          "stop every vring; prints their bases (--no-drain: suspend requests in flight)",
          "Stop every vring; prints INDEX and BASE (the next avail index) of each, and INFLIGHT for "
          "back-ends with GET_VRING_BASE_INFLIGHT.",
          "vhubctl device stop vm0 blk0\nvhubctl device stop vm0 blk0 --no-drain",
          opts_device_stop, 2, 2, cmd_device_stop },
        { "device kick", "VM DEVICE INDEX", "kick a ring in-band (VRING_KICK)",
          "An in-band kick of ring INDEX (VRING_KICK), for rings started without a kick fd; the back-end "
          "must negotiate INBAND_NOTIFICATIONS.",
          "vhubctl device kick vm0 blk0 0",
          NULL, 3, 3, cmd_device_kick },
        { "device reset", "VM DEVICE", "reset the device back to ready",
          "Put the device back into ready (RESET_DEVICE or status 0 where the back-end supports it).",
          "vhubctl device reset vm0 blk0",
          NULL, 2, 2, cmd_device_reset },
        { "device config get", "VM DEVICE OFFSET SIZE [--base64 | --raw]", "read config space (hex dump)",
          "Read SIZE bytes of the device's config space from OFFSET (GET_CONFIG): a hex dump by default.",
          "vhubctl device config get vm0 blk0 0 8",
          opts_config_get, 4, 4, cmd_device_config_get },
        { "device config set", "VM DEVICE OFFSET (HEX | --base64 B64 | --file FILE)", "write config space",
          "Write config space at OFFSET (SET_CONFIG): hex bytes (separators : space - allowed), base64, "
          "or the contents of FILE.",
          "vhubctl device config set vm0 blk0 32 01",
          opts_config_set, 3, 4, cmd_device_config_set },
        { "device net rarp", "VM DEVICE MAC", "ask the back-end to send a RARP for MAC",
          "Ask a net back-end to announce MAC (aa:bb:cc:dd:ee:ff) with a RARP, after a migration.",
          "vhubctl device net rarp vm0 net0 52:54:00:12:34:56",
          NULL, 3, 3, cmd_device_net_rarp },
        { "device net mtu", "VM DEVICE MTU", "tell the back-end the MTU",
          "Tell a net back-end the MTU (NET_SET_MTU).",
          "vhubctl device net mtu vm0 net0 9000",
          NULL, 3, 3, cmd_device_net_mtu },
        { "device state save", "VM DEVICE FILE [--no-check]", "save the back-end's state into FILE",
          "Save a stopped device's back-end state into FILE through a pipe (DEVICE_STATE), then check the "
          "transfer.  On failure FILE is removed.",
          "vhubctl device state save vm0 fs0 fs0.state",
          opts_state, 3, 3, cmd_device_state_save },
        { "device state load", "VM DEVICE FILE [--no-check]", "load the back-end's state from FILE",
          "Load a stopped device's back-end state from FILE through a pipe, then check the transfer.",
          "vhubctl device state load vm1 fs0 fs0.state",
          opts_state, 3, 3, cmd_device_state_load },
        { "device state check", "VM DEVICE", "ask the back-end whether the last transfer succeeded",
          "Ask the back-end whether the last state transfer succeeded (CHECK_DEVICE_STATE).",
          "vhubctl device state check vm1 fs0",
          NULL, 2, 2, cmd_device_state_check },
        { "device backend-reply", "VM DEVICE TOKEN RESULT", "answer a forwarded device.backend_request",
          "Answer a device.backend_request event (printed by `events`) with RESULT: 0 for success, else a "
          "positive errno.  For testing: `events` closes the request's fds.",
          "vhubctl device backend-reply vm0 gpu0 17 0",
          NULL, 4, 4, cmd_device_backend_reply },
        { "shared-object add", "VM UUID (FILE | --memfd SIZE)", "export an fd to the VM's back-ends under UUID",
          "Export FILE (opened read-write, else read-only) or a new memfd under UUID (the canonical "
          "36-character form) to the VM's back-ends.",
          "vhubctl shared-object add vm0 6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978 --memfd 4K",
          opts_so_add, 2, 3, cmd_shared_object_add },
        { "shared-object remove", "VM UUID", "withdraw a shared object",
          "Withdraw a shared object the VMM exported.",
          "vhubctl shared-object remove vm0 6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978",
          NULL, 2, 2, cmd_shared_object_remove },
        { "shared-object list", "VM", "the VM's shared objects",
          "Columns UUID, OWNER (vmm, or the device that exported it).",
          "vhubctl shared-object list vm0",
          NULL, 1, 1, cmd_shared_object_list },
        { "events", "[--vm VM | --all] [--count N]", "print events until interrupted",
          "Subscribe and print events as they come, one line each (HH:MM:SS.mmm EVENT VM[/DEVICE] "
          "KEY=JSON ...: the time the daemon stamped, in local time, then uid= and the other members; "
          "with --json the event's params), until interrupted (exit 0), the daemon closes the connection "
          "(exit 3), or --count events were printed.  Without --vm, every VM the caller may see: root "
          "sees every uid's VMs come and go.",
          "vhubctl events --vm vm0\nsudo vhubctl events --all\n"
          "vhubctl --json events | jq -c 'select(.event == \"device.disconnected\")'",
          opts_events, 0, 0, cmd_events },
        { "call", "METHOD [PARAMS|@FILE|-] [--fd FILE]... [--memfd SIZE]... [--eventfd]...",
          "send any request; prints the raw result",
          "Send METHOD with PARAMS (JSON, from FILE, or from standard input) exactly as given and print "
          "the result as indented JSON (compact with --json).  Each --fd, --memfd and --eventfd adds one "
          "fd, in command-line order: the first is \"fd\": 0.  --uid is not added: write \"uid\" into "
          "PARAMS.",
          "vhubctl call vm.memory.add '{\"vm\":\"vm0\",\"gpa\":\"0x100000000\",\"size\":4096,\"fd\":0}' "
          "--memfd 4K",
          opts_call, 1, 2, cmd_call },
};

const size_t ctl_n_commands = sizeof(ctl_commands) / sizeof(ctl_commands[0]);

void ctl_print_command_usage(FILE *f, const struct ctl_command *cmd) {
        fprintf(f, "Usage: vhubctl %s%s%s\n", cmd->words, cmd->synopsis[0] ? " " : "", cmd->synopsis);
}

/* text folded at width columns, every line indented by indent (the first
 * by first_indent: it may continue a line already started) */
static void print_folded(FILE *f, const char *text, int first_indent, int indent, int width) {
        int col = first_indent;

        while (*text) {
                size_t word = strcspn(text, " ");

                if (col > indent && col + 1 + (int)word > width) {
                        fprintf(f, "\n%*s", indent, "");
                        col = indent;
                } else if (col > indent) {
                        fputc(' ', f);
                        col++;
                }
                fprintf(f, "%.*s", (int)word, text);
                col += (int)word;
                text += word;
                text += strspn(text, " ");
        }
        fputc('\n', f);
}

void ctl_print_command_help(FILE *f, const struct ctl_command *cmd) {
        const char *ex = cmd->example;

        ctl_print_command_usage(f, cmd);
        fputs("\n", f);
        print_folded(f, cmd->description, 0, 0, 78);
        if (cmd->opts && cmd->opts[0].name) {
                fputs("\nOptions:\n", f);
                for (const struct ctl_opt_spec *o = cmd->opts; o->name; o++) {
                        char head[64];
                        int n = snprintf(head, sizeof(head), "  --%s%s%s", o->name, o->arg ? " " : "",
                                         o->arg ? o->arg : "");

                        if (n < 24)
                                fprintf(f, "%-24s", head);
                        else
                                fprintf(f, "%s\n%24s", head, "");
                        print_folded(f, o->help, 24, 24, 78);
                }
        }
        fputs("\nExample:\n", f);
        while (*ex) {
                size_t len = strcspn(ex, "\n");

                fprintf(f, "  %.*s\n", (int)len, ex);
                ex += len;
                ex += *ex == '\n';
        }
        fputs("\nGlobal options (--socket, --json, --uid, --timeout): see 'vhubctl --help'.\n", f);
}
