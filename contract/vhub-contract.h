/* SPDX-License-Identifier: MIT */
/*
 * The control contract's vocabulary, defined once: its version, its error
 * codes with the message sent for each, and its event names.  Header-only
 * and free of dependencies, so that the model (daemon/), the JSON-RPC server
 * and the client library (control/), vhubctl and outside projects include
 * the same definitions -- and can include them beside each other's headers.
 */
#pragma once

#include <stddef.h>

/* The contract's version: daemon.info's api_version, rpc.discover's info.version. */
#define VHUB_API_VERSION "2"

/*
 * Errors, X(NAME, code, message): the standard JSON-RPC codes, then the
 * contract's ("Errors").  The message is what error.message says.
 */
#define VHUB_CONTRACT_ERRORS(X)                                                         \
        X(PARSE, -32700, "parse error")                                                 \
        X(INVALID_REQUEST, -32600, "invalid request")                                   \
        X(NO_METHOD, -32601, "method not found")                                        \
        X(PARAMS, -32602, "invalid params")                                             \
        X(INTERNAL, -32603, "internal error")                                           \
        X(NO_VM, -32001, "no such VM")                                                  \
        X(NO_DEVICE, -32002, "no such device")                                          \
        X(EXISTS, -32003, "already exists")                                             \
        X(STATE, -32004, "wrong state for this call")                                   \
        X(UNSUPPORTED, -32005, "not supported by the back-end")                         \
        X(BACKEND, -32006, "back-end error")                                            \
        X(TIMEOUT, -32007, "timed out waiting for the back-end")                        \
        X(LIMIT, -32008, "resource limit reached")                                      \
        X(REGION, -32009, "bad memory region")                                          \
        X(NOT_ALLOWED, -32010, "back-end not allowed")                                  \
        X(RESTARTED, -32011, "the daemon restarted during this request")

enum vhub_err_code {
#define VHUB_CONTRACT_ERROR_ENUM(name, code, message) VHUB_ERR_##name = (code),
        VHUB_CONTRACT_ERRORS(VHUB_CONTRACT_ERROR_ENUM)
#undef VHUB_CONTRACT_ERROR_ENUM
};

/* error.message for a code; NULL for a code the contract does not define. */
static inline const char *vhub_contract_error_message(int code) {
        switch (code) {
#define VHUB_CONTRACT_ERROR_CASE(name, code_, message) \
        case (code_):                                  \
                return (message);
                VHUB_CONTRACT_ERRORS(VHUB_CONTRACT_ERROR_CASE)
#undef VHUB_CONTRACT_ERROR_CASE
        default:
                return NULL;
        }
}

/* Events, X(NAME, "event"): the "event" member of a notification ("Events"). */
#define VHUB_CONTRACT_EVENTS(X)                                                         \
        X(CONFIG_CHANGED, "device.config_changed")                                      \
        X(DISCONNECTED, "device.disconnected")                                          \
        X(RECONNECTED, "device.reconnected")                                            \
        X(FAILED, "device.failed")                                                      \
        X(LINGERING, "vm.lingering")                                                    \
        X(BACKEND_REQUEST, "device.backend_request")                                    \
        X(VMM_CONNECTED, "device.vmm_connected")                                        \
        X(VMM_DISCONNECTED, "device.vmm_disconnected")                                  \
        X(VM_CREATED, "vm.created")                                                     \
        X(VM_DESTROYED, "vm.destroyed")                                                 \
        X(DEVICE_ADDED, "device.added")                                                 \
        X(DEVICE_REMOVED, "device.removed")                                             \
        X(DEVICE_STARTED, "device.started")                                             \
        X(DEVICE_STOPPED, "device.stopped")                                             \
        X(DAEMON_RESTARTED, "daemon.restarted")

enum vhub_event_type {
#define VHUB_CONTRACT_EVENT_ENUM(name, string) VHUB_EV_##name,
        VHUB_CONTRACT_EVENTS(VHUB_CONTRACT_EVENT_ENUM)
#undef VHUB_CONTRACT_EVENT_ENUM
        _VHUB_EV_MAX,
};

/* vm.destroyed's "reason": what ended the VM. */
#define VHUB_VM_DESTROYED_DESTROY        "destroy"          /* vm.destroy */
#define VHUB_VM_DESTROYED_OWNER_CLOSED   "owner_closed"     /* its connection closed, no linger_ms */
#define VHUB_VM_DESTROYED_LINGER_EXPIRED "linger_expired"   /* linger_ms passed without vm.attach */

/* The event's name on the wire; NULL for a value outside the enum.  A
 * switch, not a designated array: the header is installed with the client
 * library and C++ users include it too. */
static inline const char *vhub_contract_event_name(int type) {
        switch (type) {
#define VHUB_CONTRACT_EVENT_CASE(name, string) \
        case VHUB_EV_##name:                   \
                return (string);
                VHUB_CONTRACT_EVENTS(VHUB_CONTRACT_EVENT_CASE)
#undef VHUB_CONTRACT_EVENT_CASE
        default:
                return NULL;
        }
}
