/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdplb.c - the XDP fast path, compiled at attach time by bcc.
 *
 * xdplb_ingress runs four named steps, each an inline function that either
 * decides (counts why and returns the XDP action) or hands on to the next:
 *   1. parse_l2 / for_us / parse_l3 / parse_l4: Ethernet (only unicast to
 *      the gateway is balanced), IPv4, TCP/UDP ports, into a struct packet
 *      (EtherType and L4 protocol kept apart); an IPv6 frame leaves right
 *      after parse_l2 by a tail call to xdplb_ingress6 (xdplb6.h), a program
 *      of its own that runs the same steps on its own keys, so this one
 *      holds no IPv6 code (to_ipv6_program);
 *   2. connection_table_lookup: the established fast path;
 *   3. pick_backend: the services lookup, then the flow's backend if still
 *      live, or Maglev (place_new_flow);
 *   4. forward: counters and the DSR rewrite, or for a NAT service the
 *      destination and port translation (nat.h; nat6.h for IPv6).
 * Between 1 and 2, nat_reply takes the replies of NAT backends (their
 * source port gated by nat_ports, then one nat_reverse lookup; nat.h, and
 * nat6.h for IPv6).
 * Every packet leaves through record_action, which counts the action.
 *
 * Cost: a hash map lookup is several kernel calls, an array lookup is inlined
 * by the verifier, so the hit path does a single hash lookup (the flow
 * table) and checks the flow's service through the service_ids array; the
 * services hash is looked up only for new or re-chosen flows, and neither
 * for a port no service uses (see lb_maps.h for both arrays).
 *
 * What happens to what (counted in not_forwarded / events):
 *   - not unicast to the interface's MAC or a pool-named extra MAC
 *     (broadcast, multicast, a frame flooded to us for another host):
 *     XDP_PASS, byte for byte unchanged (REASON_OTHER_MAC), so two
 *     balancers on one segment never bounce a frame between them;
 *   - neither IPv4 nor IPv6, not TCP/UDP, or not a configured (VIP, port, protocol):
 *     XDP_PASS, byte for byte unchanged (the gateway's SSH, ARP, routing,
 *     and pings to the VIP all go to its own stack);
 *   - IPv6 while the IPv6 program's slot is empty (tail_calls, filled by the
 *     controller before it attaches this program): XDP_PASS unchanged,
 *     counted in tail_misses (reported as reason no_ipv6_program);
 *   - Ethernet or IPv4 header truncated or invalid: XDP_PASS unchanged, the
 *     kernel stack validates and drops it (REASON_MALFORMED);
 *   - TCP/UDP IPv4 fragment to a VIP: XDP_DROP (REASON_FRAGMENT). Only the
 *     first fragment carries ports, so fragments cannot be steered
 *     consistently; TCP with path-MTU discovery does not fragment. Other
 *     fragments to a VIP (ICMP: a large ping) and all fragments to other
 *     addresses pass to the stack, which reassembles them, except TCP/UDP
 *     fragments a NAT backend sends on through the gateway (nat.h: dropped);
 *   - ICMP "fragmentation needed" to a VIP about a reply of one of its flows:
 *     XDP_TX to the flow's backend (EVENT_ICMP_TOO_BIG), so path-MTU
 *     discovery works with DSR; any other ICMP passes (handle_icmp.h);
 *   - TCP/UDP to a VIP with a truncated L4 header: XDP_DROP (REASON_MALFORMED);
 *     from a NAT backend, sent on through the gateway: XDP_DROP (nat.h);
 *   - IPv4 options: forwarded as usual (DSR leaves the IP header alone),
 *     counted as EVENT_IP_OPTIONS;
 *   - service with no backend in its table (slot 0): XDP_PASS to the gateway's
 *     own stack, which holds the VIP and answers TCP with a RST and UDP with
 *     ICMP port unreachable, so clients fail fast instead of hanging; or
 *     XDP_DROP where the pool says no_backend = "drop" (REASON_NO_BACKEND);
 *   - lb_config unpublished (only while the controller rewrites it, a few
 *     milliseconds): frames pass unchecked up to the service-port check,
 *     then TCP/UDP to a VIP is dropped (REASON_NO_CONFIG) rather than
 *     handed to the gateway's stack, which would reset it; TCP retransmits;
 *   - otherwise XDP_TX to the flow's backend.
 * IPv6 follows the same rules (xdplb6.h says where it differs: extension
 * headers, fragments, Packet Too Big).
 *
 * Flow table (the operator's guarantees; README "Flows"):
 *   - a TCP SYN without ACK starts a connection: placed by Maglev, never by
 *     an old entry, and its entry replaces any stale one for the 5-tuple
 *     (under the flood guard the stale entry is deleted instead);
 *   - a TCP RST never writes an entry;
 *   - a UDP entry idle for udp_idle_ns is placed afresh (EVENT_UDP_EXPIRED);
 *   - TCP that is not a SYN and has no entry is placed by Maglev and counted
 *     (EVENT_FLOW_MISS);
 *   - flood guard: above flood_rate new entries per second on this CPU, a
 *     flow is placed by Maglev without an entry (EVENT_FLOOD_NO_ENTRY), as
 *     Katran's is_under_flood does; such flows lose drain and grace;
 *   - an established flow whose backend is down (or removed) stays on it
 *     until down_grace_ns after down_since (EVENT_DOWN_GRACE), then is
 *     re-chosen (EVENT_FLOW_RESELECT). New flows only go to up backends.
 */
#include "lb_maps.h"
#include "parsing_helpers.h"
#include "parse_ipv6.h"
#include "flow_hash.h"
#include "race_window.h"
#include "forward.h"
#include "stats.h"

/* 1: the IPv6 program (xdplb6.h) is built and IPv6 frames go to it; 0:
 * compiled out, IPv6 frames pass to the stack as not addressed to a service
 * (the bench compares the IPv4 program with and without it; race_window.h
 * sets 0 for the widened test build). */
#ifndef XDPLB_IPV6_PATH
#define XDPLB_IPV6_PATH 1
#endif

/* A step returns CONTINUE when the next step decides, FORWARD when the packet
 * has its backend, or the final XDP action (after counting why).
 *
 * Steps shared by both families take `k6`, the IPv6 flow key, or NULL for
 * IPv4. Every call passes a constant, and every step is inlined, so clang
 * compiles a copy for each family and the IPv4 copy has no IPv6 code. For
 * IPv6, struct packet's flow holds the ports and protocol (addresses 0). */
#define CONTINUE (-1)
#define FORWARD (-2)

/* What the parse steps learned about a packet. */
struct packet {
	struct ethhdr *eth;    /* for the check of h_dest and the MAC rewrite */
	struct iphdr *iph;     /* set once parse_l3 accepted the IPv4 header */
	__u64 frame_len;       /* bytes, for the traffic counters */
	__be16 eth_proto;      /* network order: EtherType after at most one VLAN tag */
	__u8 l4_proto;         /* IPPROTO_* of the IPv4 header */
	__u8 tcp_flags;        /* TCP_FLAGS_* of a TCP segment (byte 13 of its header), 0 otherwise */
	__u16 l4_off;          /* IPv6 only: bytes from the frame's start to the TCP/UDP header, after the
	                        * extension headers (for NAT, nat6.h); in what was padding, so IPv4 pays nothing */
	void *data_end;        /* the frame's end (for NAT, which finds the L4 header again) */
	struct xdp_md *ctx;    /* for NAT's bpf_fib_lookup */
	struct flow_key flow;  /* the 5-tuple, as the flow table keys it (pad zero); IPv6: ports and proto */
};

/* A service_ref as one 64-bit word: read in one load (lb_maps.h, rule 5). */
union service_ref_word {
	struct service_ref ref;
	__u64 word;
};

/* A flow_value as one 64-bit word: read in one load (lb_maps.h, rule 5). */
union flow_value_word {
	struct flow_value value;
	__u64 word;
};

/* Where the packet goes, as the flow and backend steps find out. */
struct dest {
	struct lb_config *cfg;
	union flow_value_word flow; /* the flow's ids as read, when has_flow */
	int has_flow;             /* 1 when the flow table has an entry the packet may follow (not for a
	                           * SYN, nor an expired UDP entry) */
	struct backend_info *be;  /* the backend chosen (FORWARD) */
	__u32 sid;                /* service id: index of the service counters */
	__u32 bid;                /* backend id: index of the backend counters */
	__u8 state;               /* the service's service_ref.state as checked (F_SVC_NAT) */
	int new_flow;             /* 1 when Maglev chose the backend for this packet */
	__u32 first_event;        /* EVENT_FLOW_NEW or EVENT_FLOW_MISS when there is no entry to follow */
};

/* Byte 13 of a TCP header holds its flags: CWR ECE URG ACK PSH RST SYN FIN. */
#define TCP_FLAGS_OFFSET 13
#define TCP_FLAGS_FIN 0x01
#define TCP_FLAGS_SYN 0x02
#define TCP_FLAGS_RST 0x04
#define TCP_FLAGS_ACK 0x10


static __always_inline int tcp_syn(const struct packet *pkt)
{
	return pkt->l4_proto == IPPROTO_TCP &&
	       (pkt->tcp_flags & (TCP_FLAGS_SYN | TCP_FLAGS_ACK)) == TCP_FLAGS_SYN;
}

/* The backend behind an id if it is published and still belongs to the
 * service (ids are per service), with its flags as read once in *flags. */
static __always_inline struct backend_info *service_backend(__u32 id, __u32 service_id, __u8 *flags)
{
	struct backend_info *be;

	if (id == 0 || id >= MAX_BACKENDS)
		return NULL;
	be = backends.lookup(&id);
	if (!be)
		return NULL;
	*flags = *(volatile __u8 *)&be->flags;
	if (!(*flags & F_BACKEND_READY) || be->service_id != service_id)
		return NULL;
	return be;
}

/* An established flow's backend: up, or down (or removed) for less than the
 * grace. The clock and down_since are read on the down path only; the
 * controller writes down_since a grace period before it clears UP. */
static __always_inline struct backend_info *flow_backend(__u32 id, __u32 service_id,
							 const struct lb_config *cfg)
{
	struct backend_info *be;
	__u64 since;
	__u8 flags;

	be = service_backend(id, service_id, &flags);
	if (!be)
		return NULL;
	if (flags & F_BACKEND_UP)
		return be;
	since = be->down_since;
	if (!cfg->down_grace_ns || !since || bpf_ktime_get_ns() - since >= cfg->down_grace_ns)
		return NULL;
	count_event(EVENT_DOWN_GRACE);
	return be;
}

/* Katran's is_under_flood: this CPU's count of new entries in the current
 * second, against the pool's rate. Per CPU, so no atomics. */
static __always_inline int under_flood(const struct lb_config *cfg)
{
	__u32 zero = 0;
	struct flood_state *st;
	__u64 now;

	if (!cfg->flood_rate)
		return 0;
	st = flood_state.lookup(&zero);
	if (!st)
		return 0;
	now = bpf_ktime_get_ns();
	if (now - st->window_start > XDPLB_NSEC_PER_SEC) {
		st->window_start = now;
		st->new_flows = 1;
		return 0;
	}
	st->new_flows += 1;
	return st->new_flows > cfg->flood_rate;
}

/* Whether backend `id` of the service is up but unpublished: the controller
 * is rewriting it (a new MAC, lb_maps.h rule 1) for a few milliseconds. Its
 * fields may be torn and are used only to decide to hold its flows (drop:
 * TCP resends) rather than move them to another backend. */
static __always_inline int backend_busy(__u32 id, __u32 service_id)
{
	struct backend_info *be;

	if (id == 0 || id >= MAX_BACKENDS)
		return 0;
	be = backends.lookup(&id);
	return be && (*(volatile __u8 *)&be->flags & (F_BACKEND_UP | F_BACKEND_READY)) == F_BACKEND_UP &&
	       be->service_id == service_id;
}

/* Maglev lookup in the live table named by the service's state. Returns
 * the backend id, 0 when the slot is empty (no healthy backend). */
static __always_inline __u32 maglev_pick(__u32 sid, __u8 state, __u32 hash)
{
	__u32 idx = sid * TABLES_PER_SERVICE + ((state & SVC_STATE_HALF) ? 1 : 0);
	struct maglev_table *table = maglev_tables.lookup(&idx);
	__u32 slot = hash % MAGLEV_SIZE;

	if (!table)
		return 0;
	/* The verifier does not derive a range from a modulo, and clang drops a
	 * plain re-check as redundant; the empty asm hides what clang knows so
	 * the bounds check stays in the bytecode for the verifier to see. */
	asm volatile("" : "+r"(slot));
	if (slot >= MAGLEV_SIZE)
		return 0;
	return table->slots[slot];
}

/* Whether any service uses this destination port (service_ports in lb_maps.h). */
static __always_inline int port_in_use(__be16 dport)
{
	__u32 port = bpf_ntohs(dport);
	__u32 word = port / 32;
	__u32 *bits = service_ports.lookup(&word);

	return bits && (*bits & (1U << (port % 32)));
}

/* Whether the IPv6 VIP of service `sid`, in the half its service_ref named
 * (lb_maps6.h), is the packet's destination. */
static __always_inline int vip6_serves(__u32 sid, __u8 state, const struct flow_key6 *k6)
{
	__u32 idx = sid * TABLES_PER_SERVICE + ((state & SVC_STATE_HALF) ? 1 : 0);
	struct service_ref6 *ref6 = service_ids6.lookup(&idx);

	return ref6 && ref6->vip[0] == k6->dst[0] && ref6->vip[1] == k6->dst[1] &&
	       ref6->vip[2] == k6->dst[2] && ref6->vip[3] == k6->dst[3];
}

/* Whether service id `sid` serves the packet's (VIP, port, protocol) now
 * (service_ids in lb_maps.h): one 64-bit load of its service_ref, compared
 * without the state byte but for its family bit, then for IPv6 the VIP in
 * service_ids6. The state is returned in *state. */
static __always_inline int service_serves(__u32 sid, const struct flow_key *flow,
					  const struct flow_key6 *k6, __u8 *state)
{
	union service_ref_word want = {}, mask = {}, got;
	union service_ref_word *ref;

	if (sid >= MAX_SERVICES)
		return 0;
	ref = (union service_ref_word *)service_ids.lookup(&sid);
	if (!ref)
		return 0;
	got.word = *(volatile __u64 *)&ref->word;
	if (!k6) {
		want.ref.vip = flow->dst;
		mask.ref.vip = 0xffffffff;
	} else {
		want.ref.state = F_SVC_IPV6;
	}
	want.ref.port = flow->dport;
	want.ref.proto = flow->proto;
	mask.ref.port = 0xffff;
	mask.ref.proto = 0xff;
	mask.ref.state = F_SVC_IPV6;
	*state = got.ref.state;
	if ((got.word & mask.word) != want.word)
		return 0;
	return !k6 || vip6_serves(sid, got.ref.state, k6);
}

static __always_inline int is_vip(__be32 daddr)
{
	struct lb_addr key = {};

	key.v4 = daddr;
	return vips.lookup(&key) != NULL;
}

static __always_inline int is_vip6(const __be32 *daddr)
{
	struct lb_addr key;

	key.v6[0] = daddr[0];
	key.v6[1] = daddr[1];
	key.v6[2] = daddr[2];
	key.v6[3] = daddr[3];
	return vips6.lookup(&key) != NULL;
}

/* Whether the packet is addressed to a VIP of its family. */
static __always_inline int to_vip(const struct packet *pkt, const struct flow_key6 *k6)
{
	return k6 ? is_vip6(k6->dst) : is_vip(pkt->flow.dst);
}

/* Whether two MACs are equal, as three 16-bit loads (both are 2-byte aligned:
 * Ethernet addresses in a frame and in struct lb_config). */
static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	const __u16 *x = (const __u16 *)a, *y = (const __u16 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

/* lb_config once the controller has written it, else NULL. */
static __always_inline struct lb_config *ready_config(void)
{
	__u32 zero = 0;
	struct lb_config *cfg = lb_config.lookup(&zero);

	return cfg && cfg->ready ? cfg : NULL;
}

/* Step 1a, Ethernet and at most one VLAN tag. `first`: 1 in the program the
 * frame arrives at, which counts the tag; 0 in the IPv6 program, which
 * walks the same headers again after the tail call. */
static __always_inline int parse_l2(struct hdr_cursor *nh, void *data_end, struct packet *pkt, int first)
{
	struct lb_vlan_hdr *vlh;
	int eth_proto;

	eth_proto = parse_ethhdr(nh, data_end, &pkt->eth);
	if (eth_proto < 0)
		return counted(REASON_MALFORMED, XDP_PASS);
	if (is_vlan_proto(eth_proto)) {
		eth_proto = parse_vlanhdr(nh, data_end, &vlh);
		if (eth_proto < 0)
			return counted(REASON_MALFORMED, XDP_PASS);
		if (first)
			count_event(EVENT_VLAN);
	}
	pkt->eth_proto = eth_proto;
	return CONTINUE;
}

/* A program's start: the frame's packet and cursor, then step 1a. */
static __always_inline int start_packet(struct xdp_md *ctx, struct hdr_cursor *nh, struct packet *pkt,
					int first)
{
	void *data_end = (void *)(long)ctx->data_end;

	nh->pos = (void *)(long)ctx->data;
	pkt->frame_len = data_end - nh->pos;
	pkt->data_end = data_end;
	pkt->ctx = ctx;
	return parse_l2(nh, data_end, pkt, first);
}

/* Step 1a', only unicast frames to the interface's MAC or an extra MAC the
 * pool names (a VRRP virtual MAC) are balanced; the rest pass untouched.
 * While lb_config is unpublished the check cannot be made: the frame goes
 * on, and the first step that needs the config decides (config_missing). */
static __always_inline int for_us(const struct packet *pkt, struct dest *dst)
{
	const __u8 *h_dest = pkt->eth->h_dest;
	struct lb_config *cfg = ready_config();
	int i;

	dst->cfg = cfg;
	if (!cfg)
		return CONTINUE;
	if (h_dest[0] & 1)     /* group bit: broadcast or multicast */
		return counted(REASON_OTHER_MAC, XDP_PASS);
	if (mac_equal(h_dest, cfg->mac))
		return CONTINUE;
#pragma unroll
	for (i = 0; i < EXTRA_MACS; i++) {
		if (i >= cfg->extra_mac_count)
			break;
		if (mac_equal(h_dest, &cfg->extra_macs[6 * i]))
			return CONTINUE;
	}
	return counted(REASON_OTHER_MAC, XDP_PASS);
}

/* A packet to a service port while lb_config is unpublished (a rewrite in
 * progress): to a VIP it is dropped, for TCP to retransmit, rather than
 * passed to the gateway's stack, which holds the VIP and would reset it. */
static __always_inline int config_missing(const struct packet *pkt, const struct flow_key6 *k6)
{
	return counted(REASON_NO_CONFIG, to_vip(pkt, k6) ? XDP_DROP : XDP_PASS);
}

#include "nat.h"
#include "nat6.h"

#if XDPLB_IPV6_PATH
/*
 * PROG_* slot -> program: PROG_IPV6 holds xdplb_ingress6 (xdplb6.h). The
 * controller fills it after each load, before it attaches this program
 * (xdplb/dataplane.py). Not an LB_MAP: a new load must never reuse the
 * array an earlier load filled, which holds the earlier IPv6 program, so
 * bcc creates it afresh every time; the controller pins it (replacing the
 * earlier one) once this program is attached, because the kernel empties a
 * program array when the last file descriptor or pin of it goes, and the
 * attached program must keep its IPv6 path after the controller exits.
 */
BPF_PROG_ARRAY(tail_calls, PROG_MAX);

/* Step 1a'', an IPv6 frame goes to the IPv6 program, which decides it and
 * never returns here. Only a failed tail call (the slot empty) comes back:
 * the frame passes to the stack, counted. */
static __always_inline int to_ipv6_program(struct xdp_md *ctx)
{
	__u32 slot = PROG_IPV6;

	tail_calls.call(ctx, PROG_IPV6);
	count_u64(tail_misses.lookup(&slot));
	return XDP_PASS;
}
#else
static __always_inline int to_ipv6_program(struct xdp_md *ctx)
{
	return counted(REASON_NOT_SERVICE, XDP_PASS);
}
#endif

/* Step 1b, IPv4: anything else passes; TCP/UDP fragments to a VIP are
 * dropped, and those a NAT backend's address sends on through the gateway
 * (nat.h). */
static __always_inline int parse_l3(struct hdr_cursor *nh, void *data_end, struct packet *pkt,
				    struct dest *dst)
{
	struct iphdr *iph;
	int l4_proto;

	if (pkt->eth_proto != bpf_htons(ETH_P_IP))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	l4_proto = parse_iphdr(nh, data_end, &iph);
	if (l4_proto < 0)
		return counted(REASON_MALFORMED, XDP_PASS);
	if (ipv4_is_fragment(iph)) {
		if (l4_proto != IPPROTO_TCP && l4_proto != IPPROTO_UDP)
			return counted(REASON_NOT_SERVICE, XDP_PASS);
		if (is_vip(iph->daddr))
			return counted(REASON_FRAGMENT, XDP_DROP);
		return nat_unreadable(pkt, iph, l4_proto, NAT_STAT_FRAGMENT);
	}
	if (iph->ihl > 5)
		count_event(EVENT_IP_OPTIONS);
	pkt->iph = iph;
	pkt->l4_proto = l4_proto;
	pkt->flow.src = iph->saddr;
	pkt->flow.dst = iph->daddr;
	pkt->flow.proto = l4_proto;
	return CONTINUE;
}

/* A TCP/UDP header cut short: dropped when it is addressed to a VIP, or sent
 * on from a NAT backend's address (nat.h, nat6.h). */
static __always_inline int truncated_l4(const struct packet *pkt, const struct flow_key6 *k6)
{
	if (to_vip(pkt, k6))
		return counted(REASON_MALFORMED, XDP_DROP);
	if (k6)
		return nat_unreadable6(pkt, k6, pkt->l4_proto, NAT_STAT_TRUNCATED);
	return nat_unreadable(pkt, pkt->iph, pkt->l4_proto, NAT_STAT_TRUNCATED);
}

/* Step 1c, TCP or UDP ports (and TCP flags); only ports some service uses go on. */
static __always_inline int parse_l4(struct hdr_cursor *nh, void *data_end, struct packet *pkt,
				    const struct flow_key6 *k6)
{
	struct tcphdr *tcph;
	struct udphdr *udph;

	if (pkt->l4_proto == IPPROTO_TCP) {
		if (parse_tcphdr(nh, data_end, &tcph) < 0)
			return truncated_l4(pkt, k6);
		pkt->flow.sport = tcph->source;
		pkt->flow.dport = tcph->dest;
		pkt->tcp_flags = ((__u8 *)tcph)[TCP_FLAGS_OFFSET];
	} else if (pkt->l4_proto == IPPROTO_UDP) {
		if (parse_udphdr(nh, data_end, &udph) < 0)
			return truncated_l4(pkt, k6);
		pkt->flow.sport = udph->source;
		pkt->flow.dport = udph->dest;
	} else {
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	}
	return CONTINUE;
}

/* Step 1d, only destination ports some service uses go on. */
static __always_inline int service_port_gate(const struct packet *pkt)
{
	if (!port_in_use(pkt->flow.dport))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	return CONTINUE;
}

/* The packet's flow entry: its ids read in one 64-bit load into dst->flow
 * (see connection_table_lookup); the entry itself, or NULL when there is none. */
static __always_inline union flow_value_word *read_flow(struct packet *pkt, const struct flow_key6 *k6,
							 struct dest *dst)
{
	union flow_value_word *fv;

	if (k6)
		fv = (union flow_value_word *)flows6.lookup((struct flow_key6 *)k6);
	else
		fv = (union flow_value_word *)flows.lookup(&pkt->flow);

	if (!fv)
		return NULL;
	dst->has_flow = 1;
	dst->flow.word = *(volatile __u64 *)&fv->word;
	return fv;
}

/*
 * Step 2, the established fast path: the flow's entry names a service that
 * still serves this packet's (VIP, port, protocol), which is what the
 * services lookup would tell, and a live backend. FORWARD then; CONTINUE
 * (with the entry as read kept for the next step) when anything is missing.
 * The entry is read in one 64-bit load: an LRU entry can be recycled for
 * another flow by another CPU while this one reads it, so both ids come from
 * one version, and the ids that were checked are the ids used (lb_maps.h,
 * rule 5). The volatile read stops clang from loading it again.
 */
static __always_inline int connection_table_lookup(struct packet *pkt, const struct flow_key6 *k6,
						   struct dest *dst)
{
	union flow_value_word *fv;
	__u64 now;
	__u8 state;

	if (!dst->cfg)
		return config_missing(pkt, k6);
	dst->first_event = EVENT_FLOW_NEW;
	if (tcp_syn(pkt))
		return CONTINUE;   /* a new connection: Maglev places it, whatever an old entry says */
	fv = read_flow(pkt, k6, dst);
	if (!fv) {
		if (pkt->l4_proto == IPPROTO_TCP)
			dst->first_event = EVENT_FLOW_MISS;
		return CONTINUE;
	}
	if (pkt->l4_proto == IPPROTO_UDP && dst->cfg->udp_idle_ns) {
		/* atime is a hint like the ids: a recycled entry's can at worst
		 * expire or keep one flow early or late. */
		now = bpf_ktime_get_ns();
		if (now - fv->value.atime >= dst->cfg->udp_idle_ns) {
			dst->has_flow = 0;
			count_event(EVENT_UDP_EXPIRED);
			return CONTINUE;   /* placed afresh; its entry is replaced */
		}
		fv->value.atime = now;
	}
	race_window();
	if (!service_serves(dst->flow.value.service_id, &pkt->flow, k6, &state))
		return CONTINUE;
	dst->bid = dst->flow.value.backend_id;
	dst->be = flow_backend(dst->bid, dst->flow.value.service_id, dst->cfg);
	if (!dst->be)
		return CONTINUE;
	dst->sid = dst->flow.value.service_id;
	dst->state = state;
	count_event(EVENT_FLOW_HIT);
	return FORWARD;
}

/* The client prefix an IPv6 service hashes under client persistence
 * (service_ids6, in the half the packet's service_ref named). */
static __always_inline __u32 client_prefix6(__u32 sid, __u8 state)
{
	__u32 idx = sid * TABLES_PER_SERVICE + ((state & SVC_STATE_HALF) ? 1 : 0);
	struct service_ref6 *ref6 = service_ids6.lookup(&idx);

	return ref6 ? ref6->client_prefix : 128;
}

/* The hash that picks the flow's Maglev slot: the client address alone
 * for client persistence (a flag of the service's state; IPv6 keeps the
 * service's client prefix of it), else the 5-tuple. */
static __always_inline __u32 maglev_hash(__u8 state, const struct lb_config *cfg,
					 const struct flow_key *flow, const struct flow_key6 *k6, __u32 sid)
{
	if (k6) {
		if (state & F_SVC_CLIENT_PERSIST)
			return client_hash_v6(cfg->hash_seed, k6->src, client_prefix6(sid, state));
		return flow_hash_v6(cfg->hash_seed, k6->src, k6->dst, k6->sport, k6->dport, k6->proto);
	}
	if (state & F_SVC_CLIENT_PERSIST)
		return client_hash_v4(cfg->hash_seed, flow->src);
	return flow_hash_v4(cfg->hash_seed, flow->src, flow->dst, flow->sport,
			    flow->dport, flow->proto);
}

/* The flow table remembers where Maglev placed a flow, unless the packet is
 * a RST or this CPU is under a flood; then no entry is made, and a stale one
 * (a SYN's, or one whose backend is gone) is deleted rather than left. */
static __always_inline void forget_flow(const struct packet *pkt, const struct flow_key6 *k6)
{
	if (k6)
		flows6.delete((struct flow_key6 *)k6);
	else
		flows.delete((struct flow_key *)&pkt->flow);
}

static __always_inline void remember_flow(const struct packet *pkt, const struct flow_key6 *k6,
					  const struct dest *dst)
{
	struct flow_value fval = {};

	if (pkt->l4_proto == IPPROTO_TCP && (pkt->tcp_flags & TCP_FLAGS_RST))
		return;
	if (under_flood(dst->cfg)) {
		count_event(EVENT_FLOOD_NO_ENTRY);
		if (dst->first_event != EVENT_FLOW_MISS)   /* a miss has no entry to delete */
			forget_flow(pkt, k6);
		return;
	}
	fval.backend_id = dst->bid;
	fval.service_id = dst->sid;
	if (pkt->l4_proto == IPPROTO_UDP)
		fval.atime = bpf_ktime_get_ns();
	if (k6) {
		if (flows6.update((struct flow_key6 *)k6, &fval) != 0)
			flows6.delete((struct flow_key6 *)k6);
		return;
	}
	if (flows.update((struct flow_key *)&pkt->flow, &fval) != 0)
		flows.delete((struct flow_key *)&pkt->flow);
}

/* Maglev places the flow in the service's live table and the flow table
 * remembers it. */
static __always_inline int place_new_flow(struct packet *pkt, const struct flow_key6 *k6, __u8 state,
					  struct dest *dst)
{
	__u8 flags;

	dst->bid = maglev_pick(dst->sid, state, maglev_hash(state, dst->cfg, &pkt->flow, k6, dst->sid));
	if (dst->bid == 0)
		return counted(REASON_NO_BACKEND,
			       (dst->cfg->flags & F_CFG_NO_BACKEND_DROP) ? XDP_DROP : XDP_PASS);
	/* New flows never go to a down backend: READY and UP are checked in
	 * one read of the flags (a slot can name a backend until the flip).
	 * (Kept as a branch with a side effect: as a helper returning the
	 * pointer or NULL, clang masks the pointer, which the verifier refuses.) */
	dst->be = service_backend(dst->bid, dst->sid, &flags);
	if (!dst->be || !(flags & F_BACKEND_UP))
		return counted(REASON_BACKEND_GONE, XDP_DROP);
	remember_flow(pkt, k6, dst);
	dst->new_flow = 1;
	return FORWARD;
}

/* The service id the packet's (VIP, port, protocol) has, from the services
 * hash, confirmed in service_ids (lb_maps.h, rule 5), with its state. A
 * services element replaced while this packet read it can hold another
 * key's id and fail the check; the lookup is then made once more. */
static __always_inline int find_service(const struct packet *pkt, const struct flow_key6 *k6,
					__u32 *sid, __u8 *state)
{
	struct service_key skey = {};
	struct service_key6 skey6 = {};
	struct service_info *svc;

	if (k6) {
		__builtin_memcpy(skey6.vip, k6->dst, sizeof(skey6.vip));
		skey6.port = pkt->flow.dport;
		skey6.proto = pkt->flow.proto;
	} else {
		skey.vip = pkt->flow.dst;
		skey.port = pkt->flow.dport;
		skey.proto = pkt->flow.proto;
	}
	for (int attempt = 0; attempt < 2; attempt++) {
		if (k6)
			svc = services6.lookup(&skey6);
		else
			svc = services.lookup(&skey);
		if (!svc)
			return 0;
		race_window();
		*sid = *(volatile __u32 *)&svc->id;
		race_window();
		if (service_serves(*sid, &pkt->flow, k6, state))
			return 1;
	}
	return 0;
}

/* Step 3, a new or re-chosen flow: the services lookup names the service;
 * a flow entry whose backend is still live keeps it, otherwise Maglev
 * places the flow. */
static __always_inline int pick_backend(struct packet *pkt, const struct flow_key6 *k6, struct dest *dst)
{
	__u8 state = 0;

	if (!find_service(pkt, k6, &dst->sid, &state))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	dst->state = state;

	if (dst->has_flow) {
		dst->bid = dst->flow.value.backend_id;
		dst->be = flow_backend(dst->bid, dst->sid, dst->cfg);
		if (dst->be) {
			count_event(EVENT_FLOW_HIT);
			return FORWARD;
		}
		if (backend_busy(dst->bid, dst->sid))
			return counted(REASON_BACKEND_GONE, XDP_DROP);
		count_event(EVENT_FLOW_RESELECT);
	} else {
		count_event(dst->first_event);
	}
	return place_new_flow(pkt, k6, state, dst);
}

/* Step 4, count the traffic and send the frame to its backend. `k6` as in
 * the other steps: ingress_ipv6 calls this with its key, xdplb_ingress with
 * NULL (IPv4 only). */
static __always_inline int forward(const struct packet *pkt, const struct dest *dst, const struct flow_key6 *k6)
{
	count_traffic(service_stats.lookup((__u32 *)&dst->sid), pkt->frame_len, dst->new_flow);
	count_traffic(backend_stats.lookup((__u32 *)&dst->bid), pkt->frame_len, dst->new_flow);
	race_window();
	dsr_rewrite(pkt->eth, dst->be, dst->cfg);
	if (dst->state & F_SVC_NAT)
		return k6 ? nat_request6(pkt, dst) : nat_request(pkt, dst);
	return XDP_TX;
}

#include "handle_icmp.h"
#if XDPLB_IPV6_PATH
#include "xdplb6.h"
#endif

int xdplb_ingress(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh;
	struct packet pkt = {};
	struct dest dst = {};
	int action;

	action = start_packet(ctx, &nh, &pkt, 1);
	if (action == CONTINUE && pkt.eth_proto == bpf_htons(ETH_P_IPV6))
		action = to_ipv6_program(ctx);   /* XDP_PASS only when the tail call failed */
	if (action == CONTINUE)
		action = for_us(&pkt, &dst);
	if (action == CONTINUE)
		action = parse_l3(&nh, data_end, &pkt, &dst);
	if (action == CONTINUE && pkt.l4_proto == IPPROTO_ICMP)
		action = handle_icmp(&nh, data_end, &pkt, &dst);
	if (action == CONTINUE)
		action = parse_l4(&nh, data_end, &pkt, NULL);
	if (action == CONTINUE && nat_port_in_use(pkt.flow.sport))
		action = nat_reply(ctx, &pkt);
	if (action == CONTINUE)
		action = service_port_gate(&pkt);
	if (action == CONTINUE)
		action = connection_table_lookup(&pkt, NULL, &dst);
	if (action == CONTINUE)
		action = pick_backend(&pkt, NULL, &dst);
	if (action == FORWARD)
		action = forward(&pkt, &dst, NULL);   /* IPv4 only: IPv6 runs in xdplb_ingress6 */
	return record_action(action);
}
