/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lb_maps.h - every map of the data plane, in bcc's map macros.
 *
 * Each map says: key -> value, who writes it, who reads it. The controller
 * (xdplb/kernel.py) opens them by these names.
 */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

#include "lb_structs.h"

/* service_key -> service_info; written by the controller, read per packet. */
BPF_HASH(services, struct service_key, struct service_info, MAX_SERVICES);

/* VIP address -> 1; written by the controller, read for IPv4 fragments only. */
BPF_HASH(vips, struct lb_addr, __u32, MAX_VIPS);

/* backend id -> backend_info; written by the controller, read per packet. */
BPF_ARRAY(backends, struct backend_info, MAX_BACKENDS);

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
BPF_ARRAY(maglev_tables, struct maglev_table, MAX_SERVICES * TABLES_PER_SERVICE);

/*
 * flow_key -> flow_value; written per packet by the XDP program (new or
 * re-chosen flows), read per packet; the controller only reads it (status)
 * and may delete entries. One table shared by all CPUs: on veth and with
 * generic XDP a flow's packets can arrive on any CPU, and a per-CPU table
 * would let a second CPU pick a different backend after a table change.
 * BPF_F_NO_COMMON_LRU keeps the LRU lists per CPU to avoid lock contention.
 */
BPF_F_TABLE("lru_hash", struct flow_key, struct flow_value, flows, FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/* 0 -> lb_config; written by the controller at attach, read per packet. */
BPF_ARRAY(lb_config, struct lb_config, 1);

/* service id -> per-CPU lb_counters; written per packet, read by the controller. */
BPF_PERCPU_ARRAY(service_stats, struct lb_counters, MAX_SERVICES);

/* backend id -> per-CPU lb_counters; written per packet, read by the controller. */
BPF_PERCPU_ARRAY(backend_stats, struct lb_counters, MAX_BACKENDS);

/* XDP action -> per-CPU packet count; written per packet, read by the controller. */
BPF_PERCPU_ARRAY(xdp_actions, __u64, ACTION_MAX);

/* REASON_* -> per-CPU packet count; written per packet, read by the controller. */
BPF_PERCPU_ARRAY(not_forwarded, __u64, REASON_MAX);

/* EVENT_* -> per-CPU count; written per packet, read by the controller. */
BPF_PERCPU_ARRAY(events, __u64, EVENT_MAX);

#endif /* XDPLB_MAPS_H */
