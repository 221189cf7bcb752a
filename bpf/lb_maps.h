/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lb_maps.h - every map of the data plane, in bcc's map macros.
 *
 * Each map says: key -> value, who writes it, who reads it. The controller
 * (xdplb/dataplane.py) opens them by these names.
 */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

#include "lb_structs.h"

/*
 * Every map is pinned in bpffs under PIN_DIR (a string, passed by the
 * controller as -DPIN_DIR="/sys/fs/bpf/xdplb/eth0"), so the program keeps
 * forwarding with its last state when the controller dies, and a new
 * controller adopts the same maps, flow table included. bcc creates and pins
 * a map whose path is free and reuses the one pinned there otherwise (it does
 * not compare shapes: xdplb/pinning.py does that first). Without PIN_DIR (the
 * packet tests) the maps are private to the loader.
 */
#ifdef PIN_DIR
#define LB_MAP(type, key, value, name, size) \
	BPF_TABLE_PINNED(type, key, value, name, size, PIN_DIR "/" #name)
#define LB_MAP_F(type, key, value, name, size, flags) \
	BPF_TABLE_PINNED(type, key, value, name, size, PIN_DIR "/" #name, flags)
#else
#define LB_MAP(type, key, value, name, size) BPF_TABLE(type, key, value, name, size)
#define LB_MAP_F(type, key, value, name, size, flags) BPF_F_TABLE(type, key, value, name, size, flags)
#endif

/* service_key -> service_info; written by the controller, read per packet. */
LB_MAP("hash", struct service_key, struct service_info, services, MAX_SERVICES);

/*
 * service id -> the service_key it serves now (zero while the id is free);
 * written by the controller next to every services write, read per packet.
 *
 * It lets an established packet skip the services hash lookup: the flow
 * entry names its service id, and the packet's own (VIP, port, protocol)
 * must equal what that id serves now. A hash lookup calls into the kernel
 * (hash, bucket walk, memcmp, each a call and return), an array lookup is
 * inlined by the verifier, so this saves the dearest part of the hit path.
 * The controller keeps it a mirror of `services`: an id is written here
 * after `services` names it and cleared before `services` stops naming it,
 * so a match always means the services lookup would give the same id.
 */
LB_MAP("array", int, struct service_key, service_ids, MAX_SERVICES);

/*
 * (host-order destination port / 32) -> bit (port % 32) set when some
 * service uses that port (any VIP, any protocol); written by the controller,
 * read per TCP/UDP packet. A superset of the services' ports at all times
 * (bits are set before a service is added, cleared after the last service
 * on a port is gone), so a clear bit means the services lookup would miss:
 * the gateway's own traffic passes without any hash lookup.
 */
LB_MAP("array", int, __u32, service_ports, PORT_WORDS);

/* VIP address -> 1; written by the controller, read for IPv4 fragments only. */
LB_MAP("hash", struct lb_addr, __u32, vips, MAX_VIPS);

/* backend id -> backend_info; written by the controller, read per packet. */
LB_MAP("array", int, struct backend_info, backends, MAX_BACKENDS);

/*
 * (service id * 2 + half) -> maglev_table; written by the controller, read
 * per new flow.
 *
 * Why two tables per service rather than map-in-map: an array element is
 * updated in place by a memcpy, so a packet reading a table while the
 * controller rewrites it could see half of each version. The controller
 * therefore writes the half that is NOT live, then flips service_info.table
 * with one update of the services hash map, which the kernel swaps in as a
 * whole element under RCU. A packet sees the old table or the new one,
 * never a mix. Map-in-map would give the same guarantee, but bcc's Python
 * side cannot create inner maps without dropping to raw syscalls, and two
 * preallocated halves keep the per-packet path to one array lookup.
 */
LB_MAP("array", int, struct maglev_table, maglev_tables, MAX_SERVICES * TABLES_PER_SERVICE);

/*
 * flow_key -> flow_value; written per packet by the XDP program (new or
 * re-chosen flows), read per packet; the controller only reads it (status)
 * and may delete entries. One table shared by all CPUs: on veth and with
 * generic XDP a flow's packets can arrive on any CPU, and a per-CPU table
 * would let a second CPU pick a different backend after a table change.
 * BPF_F_NO_COMMON_LRU keeps the LRU lists per CPU to avoid lock contention.
 */
LB_MAP_F("lru_hash", struct flow_key, struct flow_value, flows, FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/* 0 -> lb_config; written by the controller at attach (and when the
 * interface's MAC or the pool's flow settings change), read per packet. */
LB_MAP("array", int, struct lb_config, lb_config, 1);

/* 0 -> per-CPU flood_state; written per new flow entry by the XDP program
 * (the flood guard's rate window), read by nobody else. */
LB_MAP("percpu_array", int, struct flood_state, flood_state, 1);

/* service id -> per-CPU lb_counters; written per packet, read by the controller. */
LB_MAP("percpu_array", int, struct lb_counters, service_stats, MAX_SERVICES);

/* backend id -> per-CPU lb_counters; written per packet, read by the controller. */
LB_MAP("percpu_array", int, struct lb_counters, backend_stats, MAX_BACKENDS);

/* XDP action -> per-CPU packet count; written per packet, read by the controller. */
LB_MAP("percpu_array", int, __u64, xdp_actions, ACTION_MAX);

/* REASON_* -> per-CPU packet count; written per packet, read by the controller. */
LB_MAP("percpu_array", int, __u64, not_forwarded, REASON_MAX);

/* EVENT_* -> per-CPU count; written per packet, read by the controller. */
LB_MAP("percpu_array", int, __u64, events, EVENT_MAX);

#endif /* XDPLB_MAPS_H */
