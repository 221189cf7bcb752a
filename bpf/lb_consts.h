/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lb_consts.h - every constant of the xdplb data plane.
 *
 * Sizes are wrapped in #ifndef so the controller can override them with
 * -D flags (it passes the pool's [xdplb] settings to bcc this way). Shared
 * with user space: xdplb/structs.py mirrors the enums and flags, and
 * tests/unit/test_struct_layout.py fails when the two sides drift.
 */
#ifndef XDPLB_CONSTS_H
#define XDPLB_CONSTS_H

/* Maglev lookup table size per service; must be prime (default from the
 * Maglev paper). The table value holds MAGLEV_SIZE backend ids. */
#ifndef MAGLEV_SIZE
#define MAGLEV_SIZE 65537
#endif

/* Services (VIP, port, protocol). Service ids run 0 .. MAX_SERVICES-1 and
 * index the per-service counters and the Maglev table pairs. */
#ifndef MAX_SERVICES
#define MAX_SERVICES 64
#endif

/* Backend ids run 1 .. MAX_BACKENDS-1. Id 0 means "no backend": a Maglev
 * slot holding 0 is counted as REASON_NO_BACKEND and the packet goes to the
 * gateway's own stack (or is dropped with F_CFG_NO_BACKEND_DROP). */
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 4096
#endif

/* Entries in the flow table (5-tuple -> backend id). */
#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 262144
#endif
/* flows6's entries: the pool's flow_table_size6 (xdplb/config.py resolves it:
 * flow_table_size when an IPv6 service is balanced, else 1024). */
#ifndef FLOW_TABLE_SIZE6
#define FLOW_TABLE_SIZE6 FLOW_TABLE_SIZE
#endif

/* Distinct VIP addresses (used to recognise fragments addressed to us). */
#ifndef MAX_VIPS
#define MAX_VIPS MAX_SERVICES
#endif

/* Maps the layout map can describe (one entry per map). */
#define LAYOUT_ENTRIES 64

/* Unicast MACs besides the interface's own whose frames are balanced
 * (lb_config.extra_macs; xdplb/structs.py and config.py mirror it). */
#define EXTRA_MACS 4

/* Destination ports, as bits of 32-bit words in the service_ports map. */
#define PORT_WORDS (65536 / 32)

/* Each service owns two Maglev tables: the live one and the one the
 * controller writes next (see lb_maps.h for why). */
#define TABLES_PER_SERVICE 2

/* struct service_info.flags and struct service_ref.state (bits 0-6) */
#define F_SVC_CLIENT_PERSIST (1U << 0) /* hash source address only, not the 5-tuple */
#define F_SVC_NAT (1U << 1)            /* forwarding "nat": destination and port translated (nat.h) */
/* struct service_ref.state, bit 7: which of the service's two Maglev tables is live */
#define SVC_STATE_HALF (1U << 7)

/* struct backend_info.flags */
#define F_BACKEND_UP (1U << 0)    /* healthy: flows may stay on / be sent to it */
#define F_BACKEND_READY (1U << 1) /* the entry's MAC and service id are written and stable (lb_maps.h) */

/* struct lb_config.flags */
#define F_CFG_NO_BACKEND_DROP (1U << 0) /* drop, rather than pass to the local stack, when no backend is up */

/* Why a packet was not forwarded: index into the not_forwarded counters. */
#define REASON_NOT_SERVICE 0     /* passed: not addressed to a configured service */
#define REASON_MALFORMED 1       /* truncated or invalid header */
#define REASON_FRAGMENT 2        /* IPv4 fragment addressed to a VIP: dropped */
#define REASON_NO_BACKEND 3      /* Maglev slot empty (0): the service has no healthy backend; passed
                                  * to the gateway's stack, which holds the VIP and resets (TCP RST,
                                  * ICMP port unreachable), or dropped with F_CFG_NO_BACKEND_DROP */
#define REASON_BACKEND_GONE 4    /* the table named a backend that is missing or down */
#define REASON_NO_CONFIG 5       /* controller has not written lb_config yet */
#define REASON_OTHER_MAC 6       /* passed: not unicast to the interface's MAC or an extra MAC
                                  * (broadcast, multicast, flooded frames for other hosts) */
#define REASON_MAX 7

/* Events worth counting that are not drops: index into the events counters. */
#define EVENT_IP_OPTIONS 0       /* IPv4 header with options (forwarded as usual) */
#define EVENT_VLAN 1             /* one 802.1Q / 802.1ad tag seen (kept on forward) */
#define EVENT_FLOW_HIT 2         /* flow table hit on a live backend */
#define EVENT_FLOW_NEW 3         /* a new flow (TCP SYN without ACK, or UDP without a live entry):
                                  * chosen by Maglev */
#define EVENT_FLOW_RESELECT 4    /* flow entry pointed at a down/removed backend past its grace
                                  * (or one the table no longer holds): re-chosen */
#define EVENT_ICMP_TOO_BIG 5     /* ICMP frag-needed to a VIP sent on to the quoted flow's backend */
#define EVENT_FLOW_MISS 6        /* TCP that is not a SYN and has no entry (after a restart, a
                                  * move between balancer nodes, or an evicted entry): chosen by Maglev */
#define EVENT_FLOOD_NO_ENTRY 7   /* flood guard: placed by Maglev without inserting an entry */
#define EVENT_DOWN_GRACE 8       /* forwarded to a down backend inside its grace period */
#define EVENT_UDP_EXPIRED 9      /* UDP entry idle past udp_idle_ns: placed afresh */
#define EVENT_MAX 10

/* NAT counters (nat.h): index into the nat_stats map, its own map so the
 * not_forwarded and events maps keep their shapes across a restart. */
#define NAT_STAT_REQUEST 0       /* request translated to backend address and port, sent (XDP_TX) */
#define NAT_STAT_REPLY_TX 1      /* reply translated back to VIP:port, next hop on the ingress interface */
#define NAT_STAT_REPLY_REDIRECT 2 /* reply translated back, next hop on another interface */
#define NAT_STAT_NO_ROUTE 3      /* reply of a NAT pair whose route forbids forwarding (blackhole,
                                  * unreachable, prohibit, forwarding off, frag needed): dropped */
#define NAT_STAT_NO_NEIGH 4      /* reply of a NAT pair whose next hop has no neighbour entry: dropped */
#define NAT_STAT_ICMP 5          /* ICMP error about a NAT flow: dropped, not translated */
#define NAT_STAT_UNTRANSLATABLE 6 /* reply of a NAT pair that cannot be sent: a torn reverse entry,
                                  * a VLAN-tagged reply whose next hop is on another interface; IPv6
                                  * from a NAT backend's address, routed on, whose extension headers
                                  * are not walked to the ports (over the limit, segments left): dropped */
#define NAT_STAT_NO_TARGET 7     /* request to a NAT backend whose nat_backends entry is unpublished
                                  * (being rewritten): dropped, TCP resends */
#define NAT_STAT_STACK 8         /* reply of a NAT pair the stack would not forward either (to the
                                  * gateway itself: health checks, its own connections; or no route
                                  * at all): passed untouched */
#define NAT_STAT_FRAGMENT 9      /* TCP/UDP fragment from a NAT backend's address, routed on (not to the
                                  * gateway): its ports cannot be read, so it cannot be translated: dropped */
#define NAT_STAT_TRUNCATED 10    /* TCP/UDP from a NAT backend's address with its L4 header cut short,
                                  * routed on (not to the gateway): dropped */
#define NAT_STAT_MAX 11

/* Slots of the tail_calls program array (xdplb.c), and of the tail_misses
 * counters: the IPv4 program hands every IPv6 frame to the program in
 * PROG_IPV6 (xdplb6.h's xdplb_ingress6). */
#define PROG_IPV6 0
#define PROG_MAX 1

/* The flood guard's rate window (bpf_ktime_get_ns is in ns). */
#define XDPLB_NSEC_PER_SEC 1000000000ULL

/* XDP actions are counted by their own value: XDP_ABORTED 0 .. XDP_REDIRECT 4. */
#define ACTION_MAX 5

#endif /* XDPLB_CONSTS_H */
