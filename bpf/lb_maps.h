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
 * a map whose path is free and reuses the one pinned there otherwise (it
 * compares neither shapes nor layouts: xdplb/pinning.py does that first).
 * Without PIN_DIR (the packet tests) the maps are private to the loader.
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

/*
 * Why every read a packet acts on is consistent
 * ==============================================
 * The controller rewrites these maps while packets read them on other CPUs,
 * and the kernel gives fewer guarantees than it seems:
 *   - an array element is updated in place by memcpy (on x86 with FSRM a
 *     `rep movsb`): a reader can see any mix of old and new bytes;
 *   - a hash element that is replaced or deleted goes back to a free list
 *     (preallocated: a per-CPU spare or the freelist; since 6.1 without
 *     preallocation: bpf_mem_alloc) and the next update reuses it with no
 *     RCU grace period: a reader holding it can see another key's value;
 *   - the LRU flow table recycles its elements the same way.
 * Three facts the argument uses:
 *   (a) a store that changes one byte is atomic whatever copies it: every
 *       other byte is rewritten with the value it had, so a reader sees the
 *       old value or the new one;
 *   (b) each XDP run is one RCU read-side critical section, so after
 *       synchronize_rcu() (the controller's membarrier(MEMBARRIER_CMD_GLOBAL))
 *       no packet that started before it is still running, and a packet that
 *       sees a store made after it sees every store made before it;
 *   (c) a hash insert fills the element before linking it in one pointer
 *       store, so a lookup never returns a half-written new element.
 * The rules (the controller's write path, xdplb/dataplane.py, keeps them):
 *   1. A record a packet acts on is published by one byte: backend_info's
 *      F_BACKEND_READY, service_ref.proto (0 while the id is unbound),
 *      lb_config.ready. Fields are rewritten only while that byte says
 *      "not published" and a grace period has passed since it did: retire
 *      (one byte) -> grace period -> rewrite -> grace period -> publish
 *      (one byte). A packet that saw the record published therefore reads
 *      the fields of one version, and they stay put until it is done (b).
 *   2. Changes that alter a single byte (a backend up or down, a Maglev
 *      flip in service_ref.state) are written directly (a).
 *   3. A Maglev table is written only into the half no service_ref names,
 *      and only a grace period after it stopped being named; the flip to it
 *      comes a grace period after the write. A packet reads the half its
 *      service_ref snapshot names, and that half holds still (b).
 *   4. A service id or backend id gets a new owner only a grace period
 *      after it lost the old one (1): within one packet an id it has checked
 *      keeps its owner.
 *   5. What may be recycled under the reader is only a hint, checked after
 *      the read: the flow entry (bid, sid) is read in one 64-bit load, sid
 *      must be bound to the packet's own (VIP, port, protocol) in
 *      service_ids, and bid must be a published backend of sid; the id in a
 *      services element is checked the same way against service_ids. A
 *      recycled or torn hint can only fail those checks (the packet takes
 *      the long way) or name another backend of the same service.
 * So a packet of service A leaves only with the MAC of a backend published
 * for A, and with the source MAC of a published lb_config.
 * tests/packet/test_flip_stress.py tries it under concurrency, and with a
 * build that widens every window (-DXDPLB_RACE_DELAY) also the old scheme.
 */

/* service_key -> service_info; written by the controller, read per new or
 * re-chosen flow. Only `id` is used, and checked (rule 5). */
LB_MAP("hash", struct service_key, struct service_info, services, MAX_SERVICES);

/*
 * service id -> service_ref: the (VIP, port, protocol) the id serves now,
 * its flags and live Maglev half (proto 0 while the id is free); written by
 * the controller, read per packet in one 64-bit load.
 *
 * It lets an established packet skip the services hash lookup: the flow
 * entry names its service id, and the packet's own (VIP, port, protocol)
 * must equal what that id serves now. A hash lookup calls into the kernel
 * (hash, bucket walk, memcmp, each a call and return), an array lookup is
 * inlined by the verifier, so this saves the dearest part of the hit path.
 * An id is bound (proto set) before `services` names it and unbound after
 * `services` stops naming it, so a match always means the services lookup
 * would give the same id. It is also where a table flips: one byte, state.
 */
LB_MAP("array", int, struct service_ref, service_ids, MAX_SERVICES);

/*
 * (host-order destination port / 32) -> bit (port % 32) set when some
 * service uses that port (any VIP, any protocol); written by the controller,
 * read per TCP/UDP packet. A superset of the services' ports at all times
 * (bits are set before a service is added, cleared after the last service
 * on a port is gone), so a clear bit means the services lookup would miss:
 * the gateway's own traffic passes without any hash lookup. A bit that does
 * not change reads the same in a torn word, so no rule is needed.
 */
LB_MAP("array", int, __u32, service_ports, PORT_WORDS);

/* VIP address -> 1; written by the controller, read for IPv4 fragments only. */
LB_MAP("hash", struct lb_addr, __u32, vips, MAX_VIPS);

/* backend id -> backend_info; written by the controller (rule 1), read per packet. */
LB_MAP("array", int, struct backend_info, backends, MAX_BACKENDS);

/*
 * (service id * 2 + half) -> maglev_table; written by the controller, read
 * per new flow.
 *
 * Why two tables per service rather than map-in-map: an array element is
 * updated in place by a memcpy, so a packet reading a table while the
 * controller rewrites it could see half of each version. The controller
 * therefore writes the half that is NOT live, then flips the half bit of
 * service_ref.state (rule 3). Map-in-map would give the same guarantee, but
 * bcc's Python side cannot create inner maps without dropping to raw
 * syscalls, and two preallocated halves keep the per-packet path to one
 * array lookup.
 */
LB_MAP("array", int, struct maglev_table, maglev_tables, MAX_SERVICES * TABLES_PER_SERVICE);

/*
 * flow_key -> flow_value; written per packet by the XDP program (new or
 * re-chosen flows), read per packet; the controller only reads it (status)
 * and may delete entries. One table shared by all CPUs: on veth and with
 * generic XDP a flow's packets can arrive on any CPU, and a per-CPU table
 * would let a second CPU pick a different backend after a table change.
 *
 * One common LRU list, not BPF_F_NO_COMMON_LRU. We do not count on RSS to
 * spread inserts: generic mode and single-queue NICs insert every flow on
 * one CPU, and RSS on a few modalities' addresses fills a few queues. Per-CPU
 * lists would cap each CPU at FLOW_TABLE_SIZE / possible CPUs (8192 of the
 * default 262144 on a 32-CPU gateway) and evict live associations while
 * other CPUs' shares stand empty. The common LRU lets any CPU use the whole
 * table, less up to 128 free entries cached per CPU (258048 on 32 CPUs); it
 * takes its global lock once per 128 inserts on a CPU, and lookups take no
 * lock. xdplb/pinning.py flow_capacity() states this to the operator.
 */
LB_MAP("lru_hash", struct flow_key, struct flow_value, flows, FLOW_TABLE_SIZE);

/* 0 -> lb_config; written by the controller at attach and when the
 * interface's MAC or the pool's flow settings change (rule 1), read per packet. */
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

/*
 * NAT forwarding (bpf/nat.h). IPv6 has its own nat_backends6, nat_reverse6
 * and nat_addrs6 (lb_maps6.h, bpf/nat6.h); nat_ports and nat_stats serve both.
 *
 * backend id -> nat_backend: the address and port a NAT service's backend
 * listens on; written by the controller with the backend (rule 1, its own
 * `ready` byte), read per request of a NAT service in one 64-bit load.
 * A separate map rather than fields of backend_info, so maps pinned by
 * earlier builds keep their layout and are adopted.
 */
LB_MAP("array", int, struct nat_backend, nat_backends, MAX_BACKENDS);

/*
 * nat_rev_key (backend address, backend port, protocol) -> nat_rev_value
 * (VIP, service port): the stateless reverse translation of replies;
 * written by the controller (an entry per NAT backend of a NAT service,
 * before the backend is first written and removed after it is cleared),
 * read per reply candidate: one hash lookup per reply. Stateless, so it
 * survives flow-table eviction, restarts and ECMP moves; `xdplb check`
 * refuses a pool where two NAT services share a key. Values never change
 * in place (a changed target is a delete and an insert); a deleted element
 * can be recycled under a reader (rule 5), so the value carries the key's
 * port, read with it in one 64-bit load and checked: a reader that sees
 * another key's value drops the reply (NAT_STAT_UNTRANSLATABLE), never
 * passes it.
 */
LB_MAP("hash", struct nat_rev_key, struct nat_rev_value, nat_reverse, MAX_BACKENDS);

/*
 * (host-order SOURCE port / 32) -> bit (port % 32) set when some NAT
 * backend listens on that port; written by the controller, read per
 * TCP/UDP packet. The reply path's gate, as service_ports is the request
 * path's: a clear bit means the nat_reverse lookup would miss, so no other
 * traffic pays a hash lookup for NAT. A superset of nat_reverse's ports at
 * every step (set before the first entry, cleared after the last).
 */
LB_MAP("array", int, __u32, nat_ports, PORT_WORDS);

/*
 * NAT backend address (network order) -> 1: the addresses in nat_reverse's
 * keys; written by the controller with them (inserted before the first
 * nat_reverse entry of the address, deleted after its last), read for
 * TCP/UDP fragments and truncated L4 headers not to a VIP, whose ports
 * cannot be read (nat.h, nat_unreadable).
 */
LB_MAP("hash", __be32, __u32, nat_addrs, MAX_BACKENDS);

/* NAT_STAT_* -> per-CPU count; written per NAT packet, read by the controller. */
LB_MAP("percpu_array", int, __u64, nat_stats, NAT_STAT_MAX);

/*
 * PROG_* slot -> per-CPU count of frames whose tail call into that slot's
 * program failed (the slot empty: xdplb.c, to_ipv6_program); written per
 * such frame, read by the controller, which reports them as not forwarded
 * (reason no_ipv6_program). A map of its own, so not_forwarded keeps its
 * shape across a restart onto this build.
 */
LB_MAP("percpu_array", int, __u64, tail_misses, PROG_MAX);

/*
 * map name -> 64-bit digest of that map's key and value layout (every
 * field's name, offset and size); written by the controller after each
 * load, never read by the program. Pinned with the others so the next
 * controller can tell whether the pinned maps hold the structs it was built
 * with before it adopts them (xdplb/pinning.py). New maps add their own
 * entries. The controller binds it to the program (BPF_PROG_BIND_MAP), so
 * the attached program's map ids name it too.
 */
LB_MAP("hash", struct layout_key, __u64, layout, LAYOUT_ENTRIES);

#include "lb_maps6.h"

#endif /* XDPLB_MAPS_H */
