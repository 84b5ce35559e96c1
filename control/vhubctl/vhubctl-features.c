/* SPDX-License-Identifier: MIT */
/*
 * vhubctl: feature bits by name, for the human output (--json keeps the
 * numbers).  Protocol features come from protocol/'s own table; virtio
 * features are the generic bits (virtio spec "Reserved Feature Bits", and
 * vhost's LOG_ALL and vhost-user's PROTOCOL_FEATURES) plus, where the
 * device's type is known, that type's own bits (the spec's "Feature bits"
 * section of each device, without the VIRTIO_<TYPE>_F_ prefix).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "vhu-message.h"
#include "vhubctl.h"

struct bit_name {
        unsigned bit;
        const char *name;
};

static const struct bit_name generic_bits[] = {
        { 24, "NOTIFY_ON_EMPTY" }, { 26, "LOG_ALL" }, { 27, "ANY_LAYOUT" }, { 28, "RING_INDIRECT_DESC" },
        { 29, "EVENT_IDX" }, { 30, "PROTOCOL_FEATURES" }, { 32, "VERSION_1" }, { 33, "ACCESS_PLATFORM" },
        { 34, "RING_PACKED" }, { 35, "IN_ORDER" }, { 36, "ORDER_PLATFORM" }, { 37, "SR_IOV" },
        { 38, "NOTIFICATION_DATA" }, { 39, "NOTIF_CONFIG_DATA" }, { 40, "RING_RESET" }, { 41, "ADMIN_VQ" },
        { 0, NULL },
};

static const struct bit_name blk_bits[] = {
        { 0, "BARRIER" }, { 1, "SIZE_MAX" }, { 2, "SEG_MAX" }, { 4, "GEOMETRY" }, { 5, "RO" },
        { 6, "BLK_SIZE" }, { 7, "SCSI" }, { 9, "FLUSH" }, { 10, "TOPOLOGY" }, { 11, "CONFIG_WCE" },
        { 12, "MQ" }, { 13, "DISCARD" }, { 14, "WRITE_ZEROES" }, { 15, "LIFETIME" },
        { 16, "SECURE_ERASE" }, { 17, "ZONED" }, { 0, NULL },
};

static const struct bit_name net_bits[] = {
        { 0, "CSUM" }, { 1, "GUEST_CSUM" }, { 2, "CTRL_GUEST_OFFLOADS" }, { 3, "MTU" }, { 5, "MAC" },
        { 6, "GSO" }, { 7, "GUEST_TSO4" }, { 8, "GUEST_TSO6" }, { 9, "GUEST_ECN" }, { 10, "GUEST_UFO" },
        { 11, "HOST_TSO4" }, { 12, "HOST_TSO6" }, { 13, "HOST_ECN" }, { 14, "HOST_UFO" },
        { 15, "MRG_RXBUF" }, { 16, "STATUS" }, { 17, "CTRL_VQ" }, { 18, "CTRL_RX" }, { 19, "CTRL_VLAN" },
        { 20, "CTRL_RX_EXTRA" }, { 21, "GUEST_ANNOUNCE" }, { 22, "MQ" }, { 23, "CTRL_MAC_ADDR" },
        { 50, "DEVICE_STATS" }, { 52, "VQ_NOTF_COAL" }, { 53, "NOTF_COAL" }, { 54, "GUEST_USO4" },
        { 55, "GUEST_USO6" }, { 56, "HOST_USO" }, { 57, "HASH_REPORT" }, { 59, "GUEST_HDRLEN" },
        { 60, "RSS" }, { 61, "RSC_EXT" }, { 62, "STANDBY" }, { 63, "SPEED_DUPLEX" }, { 0, NULL },
};

static const struct bit_name fs_bits[] = { { 0, "NOTIFICATION" }, { 0, NULL } };
static const struct bit_name scsi_bits[] = {
        { 0, "INOUT" }, { 1, "HOTPLUG" }, { 2, "CHANGE" }, { 3, "T10_PI" }, { 0, NULL },
};
static const struct bit_name vsock_bits[] = {
        { 0, "STREAM" }, { 1, "SEQPACKET" }, { 2, "NO_IMPLIED_STREAM" }, { 0, NULL },
};
static const struct bit_name gpu_bits[] = {
        { 0, "VIRGL" }, { 1, "EDID" }, { 2, "RESOURCE_UUID" }, { 3, "RESOURCE_BLOB" }, { 4, "CONTEXT_INIT" },
        { 0, NULL },
};
static const struct bit_name console_bits[] = {
        { 0, "SIZE" }, { 1, "MULTIPORT" }, { 2, "EMERG_WRITE" }, { 0, NULL },
};
static const struct bit_name crypto_bits[] = {
        { 0, "REVISION_1" }, { 1, "CIPHER_STATELESS_MODE" }, { 2, "HASH_STATELESS_MODE" },
        { 3, "MAC_STATELESS_MODE" }, { 4, "AEAD_STATELESS_MODE" }, { 5, "AKCIPHER_STATELESS_MODE" },
        { 0, NULL },
};
static const struct bit_name snd_bits[] = { { 0, "CTLS" }, { 0, NULL } };
static const struct bit_name i2c_bits[] = { { 0, "ZERO_LENGTH_REQUEST" }, { 0, NULL } };
static const struct bit_name gpio_bits[] = { { 0, "IRQ" }, { 0, NULL } };
static const struct bit_name scmi_bits[] = { { 0, "P2A_CHANNELS" }, { 1, "SHARED_MEMORY" }, { 0, NULL } };
static const struct bit_name none_bits[] = { { 0, NULL } };

/* The names device.add's `type` is given in (docs/control-api.md), and aliases. */
static const struct {
        const char *type;
        const struct bit_name *bits;
} device_types[] = {
        { "blk", blk_bits }, { "net", net_bits }, { "fs", fs_bits }, { "scsi", scsi_bits },
        { "vsock", vsock_bits }, { "gpu", gpu_bits }, { "console", console_bits },
        { "crypto", crypto_bits }, { "snd", snd_bits }, { "sound", snd_bits }, { "i2c", i2c_bits },
        { "gpio", gpio_bits }, { "scmi", scmi_bits }, { "input", none_bits }, { "rng", none_bits },
};

static const struct bit_name *type_bits(const char *type) {
        for (size_t i = 0; type && i < sizeof(device_types) / sizeof(device_types[0]); i++)
                if (strcmp(type, device_types[i].type) == 0)
                        return device_types[i].bits;
        return NULL;
}

static const char *bit_lookup(const struct bit_name *t, unsigned bit) {
        for (; t && t->name; t++)
                if (t->bit == bit)
                        return t->name;
        return NULL;
}

const char *ctl_virtio_feature_name(const char *type, unsigned bit) {
        const char *name = bit_lookup(generic_bits, bit);

        return name ? name : bit_lookup(type_bits(type), bit);
}

/* "NAME,NAME,bit41" into buf; "-" for none. */
static void fmt_names(uint64_t mask, const char *(*name_of)(const void *ctx, unsigned bit), const void *ctx,
                      char *buf, size_t len) {
        size_t n = 0;

        snprintf(buf, len, "-");
        for (unsigned bit = 0; bit < 64 && n < len; bit++) {
                const char *name;
                char unknown[16];

                if (!(mask & (UINT64_C(1) << bit)))
                        continue;
                name = name_of(ctx, bit);
                if (!name) {
                        snprintf(unknown, sizeof(unknown), "bit%u", bit);
                        name = unknown;
                }
                n += (size_t)snprintf(buf + n, len - n, "%s%s", n ? "," : "", name);
        }
}

static const char *virtio_name(const void *ctx, unsigned bit) {
        return ctl_virtio_feature_name(ctx, bit);
}

static const char *protocol_name(const void *ctx, unsigned bit) {
        return vhu_protocol_feature_name(bit);
}

void ctl_fmt_virtio_features(const char *type, uint64_t mask, char *buf, size_t len) {
        fmt_names(mask, virtio_name, type, buf, len);
}

void ctl_fmt_protocol_features(uint64_t mask, char *buf, size_t len) {
        fmt_names(mask, protocol_name, NULL, buf, len);
}

void ctl_fmt_features_line(const json_t *v, bool protocol, const char *type, char *buf, size_t len) {
        char names[1024];
        uint64_t x;

        if (vhub_json_get_u64(v, &x) < 0) {
                snprintf(buf, len, "?");
                return;
        }
        if (protocol)
                ctl_fmt_protocol_features(x, names, sizeof(names));
        else
                ctl_fmt_virtio_features(type, x, names, sizeof(names));
        snprintf(buf, len, "0x%" PRIx64 " (%s)", x, names);
}
