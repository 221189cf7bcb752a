/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdplb6.h - the IPv6 program: xdplb_ingress6, which the IPv4 program
 * (xdplb.c, xdplb_ingress) hands every IPv6 frame by a tail call after its
 * Ethernet step (tail_calls[PROG_IPV6]). A program of its own, verified and
 * run on its own, so the IPv4 program holds no IPv6 code and IPv4 pays for
 * IPv6 only the EtherType check and the tail call's instructions, which
 * IPv4 frames never reach (bench figures: README "Performance").
 *
 * Part of xdplb.c (its struct packet, struct dest and steps); included after
 * them, and only when XDPLB_IPV6_PATH is 1. ingress_ipv6 runs the same steps
 * as IPv4 with the IPv6 flow key (k6), so the rules of xdplb.c hold, with
 * these IPv6 ones:
 *   - extension headers (parse_ipv6.h): hop-by-hop, destination options and
 *     routing headers with Segments Left 0 are walked, up to IPV6_EXT_MAX,
 *     and the packet goes on (EVENT6_EXT_HEADERS; DSR leaves the IPv6
 *     header and its chain alone). A longer chain (EVENT6_EXT_LIMIT) and a
 *     routing header with Segments Left > 0 (EVENT6_ROUTING) are counted
 *     and pass to the stack untouched (REASON_NOT_SERVICE), except from a
 *     NAT backend's address, not to a VIP, routed on: dropped
 *     (unwalked_chain6, nat6.h);
 *   - a fragment (a fragment header) to a VIP is dropped (REASON_FRAGMENT)
 *     unless the fragment header says ICMPv6 comes next: that passes to the
 *     stack, which reassembles it (a large ping to the VIP). Fragments to
 *     other addresses pass. Only a first fragment carries the ports, so
 *     fragments cannot be steered consistently; IPv6 routers never
 *     fragment, and TCP with PMTUD does not;
 *   - ICMPv6 Packet Too Big (type 2) to a VIP quoting a TCP/UDP packet from
 *     that VIP:port of a configured service goes to the backend that owns
 *     the flow, exactly as ICMP "fragmentation needed" does for IPv4
 *     (handle_icmp.h, send_to_owner): the flow table with the turned-round
 *     tuple, else Maglev on it; EVENT_ICMP_TOO_BIG. Every other ICMPv6
 *     message (Neighbour Discovery, echo) passes to the stack;
 *   - a header cut short: the IPv6 header or the chain: XDP_PASS
 *     (REASON_MALFORMED); TCP/UDP to a VIP with a truncated L4 header:
 *     XDP_DROP, as IPv4;
 *   - NAT services (nat6.h): the request is translated by forward(), which
 *     ingress_ipv6 calls itself with its key; replies of IPv6 NAT backends
 *     are taken after the ports (nat_reply6), and what such a backend sends
 *     that cannot be translated (a TCP/UDP fragment, a cut-short header, a
 *     chain not walked to its end, an ICMPv6 error about a NAT flow) is
 *     dropped and counted, as for IPv4.
 */
#ifndef XDPLB_XDPLB6_H
#define XDPLB_XDPLB6_H

#include <linux/icmpv6.h>
#include "parse_ipv6.h"
#include "stats.h"

static __always_inline void count_event6(__u32 event)
{
	count_u64(events6.lookup(&event));
}

static __always_inline void copy_addr6(__be32 *to, const struct in6_addr *from)
{
	to[0] = from->in6_u.u6_addr32[0];
	to[1] = from->in6_u.u6_addr32[1];
	to[2] = from->in6_u.u6_addr32[2];
	to[3] = from->in6_u.u6_addr32[3];
}

static __always_inline int same_addr6(const struct in6_addr *a, const __be32 *b)
{
	return a->in6_u.u6_addr32[0] == b[0] && a->in6_u.u6_addr32[1] == b[1] &&
	       a->in6_u.u6_addr32[2] == b[2] && a->in6_u.u6_addr32[3] == b[3];
}

/*
 * Read an ICMPv6 message to `outer` (the message's own flow key: its
 * destination) whose header the cursor points at. For a Packet Too Big
 * quoting a TCP/UDP packet sent from outer->dst, fill `quoted` and `qk6`
 * with the quoted flow turned round (client -> VIP): ICMP_QUOTE_OK.
 */
static __always_inline int read_packet_too_big(struct hdr_cursor *nh, void *data_end,
					       const struct flow_key6 *outer, struct packet *quoted,
					       struct flow_key6 *qk6)
{
	struct icmp6hdr *icmp6 = nh->pos;
	struct ipv6_chain chain = {};
	struct lb_l4_ports *ports;
	struct ipv6hdr *inner;
	int inner_proto;

	if ((void *)(icmp6 + 1) > data_end)
		return ICMP_QUOTE_MALFORMED;
	if (icmp6->icmp6_type != ICMPV6_PKT_TOOBIG)
		return ICMP_QUOTE_OTHER;
	nh->pos = icmp6 + 1;
	inner_proto = parse_ipv6(nh, data_end, &inner, &chain);
	if (inner_proto == IPV6_MALFORMED)
		return ICMP_QUOTE_MALFORMED;
	if (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
		return ICMP_QUOTE_OTHER;   /* another protocol, or a chain the forward path would not take */
	if (chain.later_fragment)
		return ICMP_QUOTE_OTHER;   /* starts with payload, not ports */
	if (!same_addr6(&inner->saddr, outer->dst))
		return ICMP_QUOTE_OTHER;   /* not about a reply from this VIP */
	ports = nh->pos;
	if ((void *)(ports + 1) > data_end)
		return ICMP_QUOTE_MALFORMED;

	copy_addr6(qk6->src, &inner->daddr);
	copy_addr6(qk6->dst, &inner->saddr);
	qk6->sport = quoted->flow.sport = ports->dest;
	qk6->dport = quoted->flow.dport = ports->source;
	qk6->proto = quoted->flow.proto = inner_proto;
	quoted->l4_proto = inner_proto;
	return ICMP_QUOTE_OK;
}

/* ICMPv6 to the gateway: a Packet Too Big about a VIP's flow goes to the
 * flow's backend (FORWARD); everything else passes. */
static __always_inline int handle_icmp6(struct hdr_cursor *nh, void *data_end,
					const struct flow_key6 *k6, struct dest *dst)
{
	struct packet quoted = {};
	struct flow_key6 qk6 = {};
	int quote;

	quote = read_packet_too_big(nh, data_end, k6, &quoted, &qk6);
	return send_to_owner(quote, &quoted, &qk6, dst);
}

/* The steps after the IPv6 header for TCP/UDP (its header at the cursor),
 * with the IPv6 flow key: FORWARD, or the XDP action with its reason
 * counted. NAT replies are taken between the ports and the service-port
 * gate, as for IPv4 (nat6.h). */
static __always_inline int ingress_l4_6(struct hdr_cursor *nh, void *data_end, struct packet *pkt,
					struct flow_key6 *k6, int l4_proto, struct dest *dst)
{
	int action;

	pkt->l4_proto = l4_proto;
	pkt->flow.proto = l4_proto;
	pkt->l4_off = nh->pos - (void *)pkt->eth;
	action = parse_l4(nh, data_end, pkt, k6);
	if (action != CONTINUE)
		return action;
	k6->sport = pkt->flow.sport;
	k6->dport = pkt->flow.dport;
	k6->proto = l4_proto;
	if (nat_port_in_use(pkt->flow.sport))
		action = nat_reply6(pkt->ctx, pkt, k6);
	if (action == CONTINUE)
		action = service_port_gate(pkt);
	if (action == CONTINUE)
		action = connection_table_lookup(pkt, k6, dst);
	if (action == CONTINUE)
		action = pick_backend(pkt, k6, dst);
	return action;
}

/*
 * A chain parse_ipv6 did not walk to its end (IPV6_EXT_LIMIT, IPV6_ROUTING):
 * counted as its event, and passed to the stack untouched, unless it comes
 * from a NAT backend's address and is routed on (not to a VIP, nor to the
 * gateway itself): its ports are never read, so it could be a reply that
 * would leave untranslated. That one is dropped and counted
 * (NAT_STAT_UNTRANSLATABLE), whatever its protocol (nat_unreadable6, with
 * the IPv6 header's Next Header for the route lookup, as the stack's own).
 */
static __always_inline int unwalked_chain6(const struct packet *pkt, const struct flow_key6 *k6,
					   const struct ipv6hdr *ip6h, int verdict)
{
	count_event6(verdict == IPV6_EXT_LIMIT ? EVENT6_EXT_LIMIT : EVENT6_ROUTING);
	if (is_vip6(k6->dst))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	return nat_unreadable6(pkt, k6, ip6h->nexthdr, NAT_STAT_UNTRANSLATABLE);
}

/* Step 1b for IPv6 and every step after it, with the IPv6 flow key: the
 * final XDP action with its reason counted (it forwards its own, forward()
 * with its key). */
static __always_inline int ingress_ipv6(struct hdr_cursor *nh, void *data_end, struct packet *pkt,
					struct dest *dst)
{
	struct ipv6_chain chain = {};
	struct flow_key6 k6 = {};
	struct ipv6hdr *ip6h;
	int l4_proto, action;

	l4_proto = parse_ipv6(nh, data_end, &ip6h, &chain);
	if (l4_proto == IPV6_MALFORMED)
		return counted(REASON_MALFORMED, XDP_PASS);
	copy_addr6(k6.src, &ip6h->saddr);
	copy_addr6(k6.dst, &ip6h->daddr);
	if (l4_proto == IPV6_EXT_LIMIT || l4_proto == IPV6_ROUTING)
		return unwalked_chain6(pkt, &k6, ip6h, l4_proto);
	if (chain.fragment) {
		if (l4_proto != IPPROTO_ICMPV6 && is_vip6(k6.dst))
			return counted(REASON_FRAGMENT, XDP_DROP);
		if (l4_proto == IPPROTO_TCP || l4_proto == IPPROTO_UDP)   /* from a NAT backend: nat6.h */
			return nat_unreadable6(pkt, &k6, l4_proto, NAT_STAT_FRAGMENT);
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	}
	if (chain.ext_headers)
		count_event6(EVENT6_EXT_HEADERS);
	if (l4_proto == IPPROTO_ICMPV6) {
		action = nat_backend_icmp6(pkt, &k6, nh->pos, data_end);
		if (action == CONTINUE)
			action = handle_icmp6(nh, data_end, &k6, dst);
	} else {
		action = ingress_l4_6(nh, data_end, pkt, &k6, l4_proto, dst);
	}
	if (action == FORWARD)
		action = forward(pkt, dst, &k6);
	return action;
}

/* The IPv6 program, reached only by the tail call from xdplb_ingress: the
 * Ethernet step again (the IPv4 program counted the VLAN tag), then the
 * IPv4 program's steps with IPv6's own. Every frame leaves through
 * record_action here: the IPv4 program never sees it again. */
int xdplb_ingress6(struct xdp_md *ctx)
{
	struct packet pkt = {};
	struct dest dst = {};
	struct hdr_cursor nh;
	int action;

	action = start_packet(ctx, &nh, &pkt, 0);
	if (action == CONTINUE && pkt.eth_proto != bpf_htons(ETH_P_IPV6))
		action = counted(REASON_NOT_SERVICE, XDP_PASS);   /* not from the tail call */
	if (action == CONTINUE)
		action = for_us(&pkt, &dst);
	if (action == CONTINUE)
		action = ingress_ipv6(&nh, pkt.data_end, &pkt, &dst);   /* forwards its own */
	return record_action(action);
}

#endif /* XDPLB_XDPLB6_H */
