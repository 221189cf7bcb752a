/* SPDX-License-Identifier: GPL-2.0 */
/*
 * handle_icmp.h - path-MTU discovery through the balancer.
 *
 * With direct server return the backend answers the client from the VIP.
 * When a router on the way back cannot forward one of those large replies
 * (DF set, as Linux TCP sets it, and a smaller next link), it sends ICMP
 * "fragmentation needed" (type 3, code 4) to the reply's source: the VIP.
 * That message reaches the gateway, not the backend whose TCP has to lower
 * its segment size; the gateway's stack has no such socket and discards it,
 * the backend keeps resending segments that never arrive, and the transfer
 * stalls (a PMTUD black hole).
 *
 * The message quotes the start of the packet that was too big: its IPv4
 * header and at least 8 more bytes (RFC 792), so the ports are there. That
 * packet went VIP:port -> client:port; turned round it is the client's flow
 * as the flow table keys it. The message is sent on to the backend that owns
 * that flow, exactly as the flow's own packets are (only the MACs change;
 * the backend holds the VIP and takes it as addressed to itself):
 *   - the flow table entry, when it names a live backend of the service that
 *     serves the quoted (VIP, port, protocol);
 *   - otherwise Maglev on the same turned-round tuple, which is where a new
 *     packet of that flow would go: right on a node that never saw the flow
 *     (another balancer, or this one after a restart without its table).
 * Counted as EVENT_ICMP_TOO_BIG. No flow entry is created or changed.
 * For a NAT service the quote names the VIP, which the backend does not
 * hold: such a message is dropped and counted (NAT_STAT_ICMP; nat.h).
 * Before all of this, nat_backend_icmp drops and counts the errors a NAT
 * backend sends to a client about a NAT flow (nat.h).
 *
 * Everything else passes to the gateway's stack untouched (XDP_PASS):
 *   - any other ICMP message (echo requests: pinging the VIP keeps working);
 *   - a frag-needed quoting a packet that is not TCP/UDP, that is a later
 *     fragment (no ports), or whose source is not the message's own
 *     destination, or not a configured service (REASON_NOT_SERVICE);
 *   - a frag-needed whose quote is cut short or invalid: ICMP header, quoted
 *     IPv4 header (with its options) or the quoted ports beyond the end of
 *     the frame (REASON_MALFORMED);
 *   - a quoted flow whose service has no live backend for it
 *     (REASON_NO_BACKEND).
 * A fragmented ICMP message never gets here (see xdplb.c: fragments that are
 * not TCP/UDP pass to the stack, which reassembles them).
 *
 * Part of xdplb.c (its struct packet, struct dest and steps); included
 * after them.
 */
#ifndef XDPLB_HANDLE_ICMP_H
#define XDPLB_HANDLE_ICMP_H

#include <linux/icmp.h>
#include "parsing_helpers.h"
#include "stats.h"

/* 1: forward frag-needed to the flow's backend. The lab test's negative
 * control builds the program with 0 to show the black hole it closes. */
#ifndef XDPLB_PMTU_FORWARD
#define XDPLB_PMTU_FORWARD 1
#endif

/* The two ports at the start of a TCP or UDP header: all that RFC 792
 * promises a quote holds beyond the IP header. */
struct lb_l4_ports {
	__be16 source;         /* network order */
	__be16 dest;           /* network order */
};

/* Outcome of reading an ICMP message to the gateway. */
#define ICMP_QUOTE_OK 0         /* a frag-needed quoting TCP/UDP from its destination */
#define ICMP_QUOTE_OTHER 1      /* anything else: the stack's business */
#define ICMP_QUOTE_MALFORMED 2  /* a frag-needed cut short or invalid */

/*
 * Read an ICMP message whose IPv4 header is `outer` and whose ICMP header the
 * cursor points at. For a frag-needed quoting a TCP/UDP packet sent from
 * outer->daddr, fill `fkey` with the quoted flow turned round (client ->
 * VIP) and return ICMP_QUOTE_OK. Every read is bounds-checked first.
 */
static __always_inline int read_frag_needed(struct hdr_cursor *nh, void *data_end,
					    const struct iphdr *outer, struct flow_key *fkey)
{
	struct icmphdr *icmph = nh->pos;
	struct lb_l4_ports *ports;
	struct iphdr *inner;
	int inner_proto;

	if ((void *)(icmph + 1) > data_end)
		return ICMP_QUOTE_MALFORMED;
	if (icmph->type != ICMP_DEST_UNREACH || icmph->code != ICMP_FRAG_NEEDED)
		return ICMP_QUOTE_OTHER;
	nh->pos = icmph + 1;
	inner_proto = parse_iphdr(nh, data_end, &inner);
	if (inner_proto < 0)
		return ICMP_QUOTE_MALFORMED;
	if (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
		return ICMP_QUOTE_OTHER;
	/* A later fragment starts with payload, not ports. */
	if (inner->frag_off & bpf_htons(IP_OFFSET))
		return ICMP_QUOTE_OTHER;
	/* The router sends the message to the source of what it could not
	 * forward; anything else is not about a reply from this VIP. */
	if (inner->saddr != outer->daddr)
		return ICMP_QUOTE_OTHER;
	ports = nh->pos;
	if ((void *)(ports + 1) > data_end)
		return ICMP_QUOTE_MALFORMED;

	fkey->src = inner->daddr;
	fkey->dst = inner->saddr;
	fkey->sport = ports->dest;
	fkey->dport = ports->source;
	fkey->proto = inner_proto;
	return ICMP_QUOTE_OK;
}

/*
 * Where a "too big" message goes, once its quote is read (`quote`, and the
 * quoted flow turned round in `quoted`, with `k6` for IPv6): FORWARD to
 * the backend that owns the flow, or XDP_PASS with the reason counted.
 * Shared by ICMP (here) and ICMPv6 (xdplb6.h).
 */
static __always_inline int send_to_owner(int quote, struct packet *quoted, const struct flow_key6 *k6,
					 struct dest *dst)
{
	__u8 state = 0, flags;

	if (quote == ICMP_QUOTE_MALFORMED)
		return counted(REASON_MALFORMED, XDP_PASS);
	if (quote != ICMP_QUOTE_OK || !XDPLB_PMTU_FORWARD || !port_in_use(quoted->flow.dport) ||
	    !find_service(quoted, k6, &dst->sid, &state))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	if (!dst->cfg)   /* for_us found lb_config unpublished (a rewrite in progress) */
		return counted(REASON_NO_CONFIG, XDP_PASS);
	if (state & F_SVC_NAT)   /* not translated: nat.h */
		return nat_counted(NAT_STAT_ICMP, XDP_DROP);
	/* The flow's backend while its packets would go there (down within
	 * its grace included), else where Maglev would place the flow now. */
	if (read_flow(quoted, k6, dst)) {
		dst->bid = dst->flow.value.backend_id;
		dst->be = flow_backend(dst->bid, dst->sid, dst->cfg);
	}
	if (!dst->be) {
		dst->bid = maglev_pick(dst->sid, state, maglev_hash(state, dst->cfg, &quoted->flow, k6, dst->sid));
		dst->be = service_backend(dst->bid, dst->sid, &flags);
		if (!dst->be || !(flags & F_BACKEND_UP))   /* only where a new flow could go */
			return counted(REASON_NO_BACKEND, XDP_PASS);
	}
	count_event(EVENT_ICMP_TOO_BIG);
	return FORWARD;
}

/*
 * The ICMP step, after parse_l3 in place of parse_l4 (the cursor at the
 * ICMP header) for ICMP to the gateway, VIP or not: FORWARD with `dst`
 * naming the backend that owns the quoted flow, or XDP_PASS with the frame
 * untouched. It uses the same steps as a packet of the quoted flow would
 * (find_service, read_flow, maglev_hash), but never creates or rewrites a
 * flow entry (the lookup does mark it recently used, and a flow whose
 * replies are too big is in use). Forwarded messages count in the service
 * and backend traffic counters like the flow's own packets (forward()).
 */
static __always_inline int handle_icmp(struct hdr_cursor *nh, void *data_end,
				       const struct packet *pkt, struct dest *dst)
{
	struct packet quoted = {};
	int quote;

	quote = nat_backend_icmp(pkt, nh->pos, data_end);
	if (quote != CONTINUE)
		return quote;
	quote = read_frag_needed(nh, data_end, pkt->iph, &quoted.flow);
	return send_to_owner(quote, &quoted, NULL, dst);
}

#endif /* XDPLB_HANDLE_ICMP_H */
