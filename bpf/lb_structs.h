/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lb_structs.h - structs shared between the XDP program and the controller.
 *
 * Keep in sync with xdplb/structs.py (ctypes). tests/unit/test_struct_layout.py
 * compiles this header with gcc, prints every offset and size, and fails when
 * the Python side drifts. Every field states its byte order; padding is
 * explicit and must be zero (the flow and service keys are hashed as bytes).
 */
#ifndef XDPLB_STRUCTS_H
#define XDPLB_STRUCTS_H

#include <linux/types.h>
#include "lb_consts.h"

/* An IP address, 16 bytes: IPv4 in v4 with the other 12 bytes zero, or
 * IPv6. Which one is known from the map (vips or vips6) or the service. */
struct lb_addr {
	union {
		__be32 v4;     /* network order; IPv4 uses these first 4 bytes, the other 12 are zero */
		__be32 v6[4];  /* network order: IPv6 */
	};
};

/* services map key: what a client addresses. IPv4 only, like the program:
 * the kernel hashes and compares every key byte on every lookup, so the key
 * holds the 4-byte address rather than a struct lb_addr. */
struct service_key {
	__be32 vip;            /* network order */
	__be16 port;           /* network order: destination port */
	__u8 proto;            /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
	__u8 pad;              /* zero */
};

/* service_ids map value: what a service id serves now and how. The one
 * record a packet acts on for its service (see lb_maps.h for why it is
 * read in one 64-bit load and changed one byte at a time). Same bytes as a
 * service_key, with the last byte holding the state. */
struct service_ref {
	__be32 vip;            /* network order */
	__be16 port;           /* network order: destination port */
	__u8 proto;            /* IPPROTO_TCP or IPPROTO_UDP; 0 while the id is free or being bound */
	__u8 state;            /* F_SVC_* flags, and SVC_STATE_HALF: the live Maglev half */
};

/* services map value. The program takes only `id` from it, and checks it
 * against service_ids (lb_maps.h); flags and table mirror service_ids'
 * state for a controller adopting the maps (and for older programs). */
struct service_info {
	__u32 id;              /* host order: 0 .. MAX_SERVICES-1, index of counters and tables */
	__u32 flags;           /* host order: F_SVC_* */
	__u32 table;           /* host order: 0 or 1, which of the service's two Maglev tables is live */
	__u32 pad;             /* zero */
};

/* backends map value, indexed by backend id (1 .. MAX_BACKENDS-1). One id is
 * one (service, backend) pair, so health and drain are per service. */
struct backend_info {
	struct lb_addr addr;   /* network order: the backend's own address (informational) */
	__u8 mac[6];           /* wire order: destination MAC written into forwarded frames */
	__u8 flags;            /* F_BACKEND_*; F_BACKEND_READY publishes the other fields (lb_maps.h) */
	__u8 pad;              /* zero */
	__u32 service_id;      /* host order: the service this id belongs to */
	__u32 pad2;            /* zero */
	__u64 down_since;      /* host order: CLOCK_MONOTONIC ns (bpf_ktime_get_ns) when it went down
	                        * or was removed; 0 while up and for one that never was. Read only
	                        * on the down path, to keep established flows within the grace */
};

/* flows map key: one client flow. IPv4 only, 4-byte addresses for the same
 * reason as service_key (16 bytes rather than 40 to hash per packet). */
struct flow_key {
	__be32 src;            /* network order: client address */
	__be32 dst;            /* network order: VIP */
	__be16 sport;          /* network order */
	__be16 dport;          /* network order */
	__u8 proto;            /* IPPROTO_* */
	__u8 pad[3];           /* zero */
};

/* flows map value: 8 bytes, 8-aligned, read by the program in one 64-bit load. */
struct flow_value {
	__u32 backend_id;      /* host order: backend the flow is pinned to */
	__u32 service_id;      /* host order: service it was chosen in */
	__u64 atime;           /* host order: bpf_ktime_get_ns of its last packet, kept for UDP only
	                        * (to the second) for the idle timeout; 0 for TCP */
};

/* One Maglev lookup table: slot -> backend id (host order, 0 = no backend). */
struct maglev_table {
	__u32 slots[MAGLEV_SIZE];
};

/* Per-CPU traffic counters, per service and per backend. */
struct lb_counters {
	__u64 packets;         /* host order */
	__u64 bytes;           /* host order: Ethernet frame length as received, without FCS */
	__u64 new_flows;       /* host order: flows assigned by a Maglev lookup */
};

/* lb_config value (single entry, key 0): facts about the attached interface. */
struct lb_config {
	__u8 mac[6];           /* wire order: source MAC written into forwarded frames */
	__u8 ready;            /* 1 once the controller has written this entry (publishes the others, lb_maps.h) */
	__u8 flags;            /* F_CFG_* */
	__u32 hash_seed;       /* host order: seed of the flow hash (xdplb/flowhash.py mirrors it) */
	__u32 flood_rate;      /* host order: new flow entries per second per CPU above which the
	                        * flood guard places flows without an entry; 0 = no guard */
	__u64 udp_idle_ns;     /* host order: a UDP entry idle this long is placed afresh; 0 = never */
	__u64 down_grace_ns;   /* host order: established flows stay on a down backend this long;
	                        * 0 = re-chosen at once */
	__u8 extra_macs[EXTRA_MACS * 6]; /* wire order: unicast MACs balanced besides `mac`, 6 bytes
	                        * each (flat: bcc's Python types mis-size a 2-D array) */
	__u8 extra_mac_count;  /* how many of extra_macs are used, 0 .. EXTRA_MACS */
	__u8 pad2[7];          /* zero */
};

/* flood_state value (per CPU, key 0): Katran-style new-flow rate window. */
struct flood_state {
	__u64 window_start;    /* host order: bpf_ktime_get_ns when the current second began */
	__u64 new_flows;       /* host order: new flow entries this CPU asked for in that second */
};

/* layout map key: the name of another map, as the kernel stores map names. */
struct layout_key {
	char name[16];         /* NUL-padded */
};

/* ---- NAT forwarding (bpf/nat.h; maps in lb_maps.h) ----
 * IPv4 only, with 4-byte addresses, for the reason service_key gives. IPv6
 * has its own nat_backend6 / nat_rev_key6 / nat_rev_value6 with 16-byte
 * addresses (lb_structs6.h) in separate maps, so the IPv4 keys stay 8 bytes. */

/* nat_backends map value, indexed by backend id: where a NAT service's
 * backend really listens. Read in one 64-bit load. */
struct nat_backend {
	__be32 addr;           /* network order: the backend's address (the new destination) */
	__be16 port;           /* network order: the port it listens on (the new destination port) */
	__u8 ready;            /* 1 publishes addr and port (lb_maps.h rule 1); 0 = not a NAT backend */
	__u8 pad;              /* zero */
};

/* nat_reverse map key: the source of a NAT backend's replies. */
struct nat_rev_key {
	__be32 addr;           /* network order: backend address */
	__be16 port;           /* network order: backend port */
	__u8 proto;            /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;              /* zero */
};

/* nat_reverse map value: what the reply's source becomes. Read in one
 * 64-bit load; bport repeats the key's port as a check (lb_maps.h). */
struct nat_rev_value {
	__be32 vip;            /* network order: the service's VIP */
	__be16 vport;          /* network order: the service port */
	__be16 bport;          /* network order: the key's backend port, checked by the reader */
};

#include "lb_structs6.h"

#endif /* XDPLB_STRUCTS_H */
