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

/*
 * NAT over IPv6 (bpf/nat6.h): the maps of NAT (lb_maps.h) for IPv6 backends,
 * written by the controller exactly as those. nat_ports and nat_stats are
 * shared by both families. The values are 20 bytes, too big for the one
 * 64-bit load IPv4 reads nat_backend and nat_rev_value with, so each is
 * kept consistent another way:
 *
 * backend id -> nat_backend6; written with the backend (rule 1: `ready`
 * publishes addr and port), read per request of an IPv6 NAT service: the
 * program reads `ready` first (one byte, volatile) and the fields after it.
 * The controller rewrites the fields only while `ready` is 0 and a grace
 * period has passed since it was cleared, and sets it a grace period after
 * the rewrite, so a packet that saw `ready` 1 reads one version of the
 * fields, whatever the order its loads complete in (fact (b)).
 */
LB_MAP("array", int, struct nat_backend6, nat_backends6, MAX_BACKENDS);

/*
 * nat_rev_key6 (backend address, port, protocol) -> nat_rev_value6 (VIP,
 * service port, the key's port); written by the controller as nat_reverse
 * (inserted before the backend it translates for is published, deleted
 * after it is cleared), read per reply candidate of an IPv6 NAT backend.
 * A hash element is recycled without a grace period (lb_maps.h), so the
 * controller makes sure no element is reused while a packet may hold it
 * (xdplb/dataplane.py, _nat_reverse_write):
 *   - a deleted element goes to the map's free list, which only an insert
 *     of a new key takes from. Deletions are made in the late pass, and the
 *     next insert comes in a later content pass, which the controller always
 *     starts with a grace period after late writes;
 *   - a value replaced in place (a backend moved to another NAT service)
 *     leaves its old element as the CPU's spare, which the next replacement
 *     on that CPU takes: each replacement is followed by a grace period
 *     before the controller writes anything else.
 * So a packet reads the value of its own key, in as many loads as it likes.
 * bport is still checked, as for IPv4: a mismatch drops the reply
 * (NAT_STAT_UNTRANSLATABLE), never passes it.
 */
LB_MAP("hash", struct nat_rev_key6, struct nat_rev_value6, nat_reverse6, MAX_BACKENDS);

/*
 * IPv6 NAT backend address -> 1: the addresses in nat_reverse6's keys, as
 * nat_addrs for IPv4 (inserted before the address's first nat_reverse6
 * entry, deleted after its last); read for TCP/UDP fragments and truncated
 * L4 headers not to a VIP, and ICMPv6 errors (nat6.h).
 */
LB_MAP("hash", struct lb_addr, __u32, nat_addrs6, MAX_BACKENDS);

#endif /* XDPLB_MAPS6_H */
