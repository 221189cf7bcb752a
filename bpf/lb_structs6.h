/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lb_structs6.h - the IPv6 structs shared with the controller (included by
 * lb_structs.h; the same rules: xdplb/structs.py mirrors every field and
 * tests/unit/test_struct_layout.py fails when they drift).
 *
 * IPv6 services and flows live in their own maps (lb_maps6.h) so the IPv4
 * keys stay 8 and 16 bytes. Service ids, backend ids, Maglev tables,
 * counters, service_ports and lb_config are shared by both families.
 */
#ifndef XDPLB_STRUCTS6_H
#define XDPLB_STRUCTS6_H

#include <linux/types.h>

/* service_ref.state bit 2: the id serves an IPv6 VIP. Its service_ref.vip
 * is then 0, and the address is in service_ids6 (lb_maps6.h). */
#define F_SVC_IPV6 (1U << 2)

/* services6 map key: what an IPv6 client addresses. */
struct service_key6 {
	__be32 vip[4];         /* network order */
	__be16 port;           /* network order: destination port */
	__u8 proto;            /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
	__u8 pad;              /* zero */
};

/* service_ids6 map value, index (service id * 2 + Maglev half): the VIP the
 * id serves and how its clients are hashed, written with the Maglev table
 * of that half (the same rule: only while no service_ref names the half). */
struct service_ref6 {
	__be32 vip[4];         /* network order */
	__u8 client_prefix;    /* 1..128: leading bits of the client address hashed under client
	                        * persistence (clients behind privacy addresses) */
	__u8 pad[3];           /* zero */
};

/* flows6 map key: one IPv6 client flow. */
struct flow_key6 {
	__be32 src[4];         /* network order: client address */
	__be32 dst[4];         /* network order: VIP */
	__be16 sport;          /* network order */
	__be16 dport;          /* network order */
	__u8 proto;            /* IPPROTO_* */
	__u8 pad[3];           /* zero */
};

/* IPv6 events: index into the events6 counters (per CPU). Their own map, so
 * the events map keeps its size and pinned maps are adopted across the upgrade. */
#define EVENT6_EXT_HEADERS 0     /* hop-by-hop, routing (segments left 0) or destination
                                  * options walked; the packet went on */
#define EVENT6_EXT_LIMIT 1       /* more than IPV6_EXT_MAX extension headers: passed to the stack */
#define EVENT6_ROUTING 2         /* routing header with segments left > 0: passed to the stack */
#define EVENT6_MAX 3

/* ---- NAT over IPv6 (bpf/nat6.h; maps in lb_maps6.h) ----
 * As the IPv4 nat_backend / nat_rev_key / nat_rev_value, with 16-byte
 * addresses. Too big for the one 64-bit load IPv4 reads them with; lb_maps6.h
 * says why each is still read consistently. */

/* nat_backends6 map value, indexed by backend id: where an IPv6 NAT
 * service's backend really listens. */
struct nat_backend6 {
	__be32 addr[4];        /* network order: the backend's address (the new destination) */
	__be16 port;           /* network order: the port it listens on (the new destination port) */
	__u8 ready;            /* 1 publishes addr and port (lb_maps.h rule 1), read before them;
	                        * 0 = not an IPv6 NAT backend */
	__u8 pad;              /* zero */
};

/* nat_reverse6 map key: the source of an IPv6 NAT backend's replies. */
struct nat_rev_key6 {
	__be32 addr[4];        /* network order: backend address */
	__be16 port;           /* network order: backend port */
	__u8 proto;            /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;              /* zero */
};

/* nat_reverse6 map value: what the reply's source becomes. bport repeats
 * the key's port as a check, as in nat_rev_value. */
struct nat_rev_value6 {
	__be32 vip[4];         /* network order: the service's IPv6 VIP */
	__be16 vport;          /* network order: the service port */
	__be16 bport;          /* network order: the key's backend port, checked by the reader */
};

#endif /* XDPLB_STRUCTS6_H */
