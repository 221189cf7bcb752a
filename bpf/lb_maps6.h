/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lb_maps6.h - the IPv6 maps (included by lb_maps.h; the same rules of
 * consistency apply, see there). Each says key -> value, who writes, who reads.
 *
 * An IPv6 service has a service id like any other: its counters, Maglev
 * tables, backends and service_ids entry are the shared ones. Its
 * service_ids entry has vip 0 and F_SVC_IPV6 in state; the one 64-bit load
 * of rule 5 checks port, protocol and family, then the VIP is compared with
 * service_ids6[id * 2 + half], the half that load named (rule 3 keeps it
 * still while the packet runs).
 */
#ifndef XDPLB_MAPS6_H
#define XDPLB_MAPS6_H

/* service_key6 -> service_info; written by the controller, read per new or
 * re-chosen IPv6 flow. Only `id` is used, and checked (rule 5). */
LB_MAP("hash", struct service_key6, struct service_info, services6, MAX_SERVICES);

/* (service id * 2 + half) -> service_ref6; written by the controller into
 * the idle half with its Maglev table (rule 3), read per IPv6 packet. */
LB_MAP("array", int, struct service_ref6, service_ids6, MAX_SERVICES * TABLES_PER_SERVICE);

/* flow_key6 -> flow_value; as `flows` (one LRU shared by all CPUs), for IPv6.
 * Sized on its own (FLOW_TABLE_SIZE6): a pool without an IPv6 service keeps
 * it at the minimum instead of locking as much memory as `flows`. */
LB_MAP("lru_hash", struct flow_key6, struct flow_value, flows6, FLOW_TABLE_SIZE6);

/* IPv6 VIP -> 1; written by the controller, read for fragments and cut-short
 * headers to a VIP (as `vips` for IPv4). */
LB_MAP("hash", struct lb_addr, __u32, vips6, MAX_VIPS);

/* EVENT6_* -> per-CPU count; written per packet, read by the controller. */
LB_MAP("percpu_array", int, __u64, events6, EVENT6_MAX);

#endif /* XDPLB_MAPS6_H */
