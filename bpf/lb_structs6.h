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

#endif /* XDPLB_STRUCTS6_H */
