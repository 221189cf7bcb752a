/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat.h - forwarding = "nat": destination and port translation that keeps
 * the client's address (LVS-NAT), for PACS that cannot hold the VIP.
 *
 * Request (client -> VIP:port), after the usual flow table and Maglev
 * choice: nat_request rewrites the destination address and port to the
 * backend's (nat_backends), updates the IPv4 header checksum and the
 * TCP/UDP checksum incrementally (csum.h; a UDP checksum of 0, "none",
 * stays 0, and a computed 0 is sent as 0xffff), then the MACs as for DSR,
 * and the frame goes back out (XDP_TX). IP options and a VLAN tag stay.
 *
 * Reply (backend:bport -> client): the gateway is the backends' route to
 * the clients, so replies reach it addressed to its MAC. Their destination
 * port is the client's, so the service_ports gate would pass them; their
 * own gate is nat_ports on the SOURCE port, then one nat_reverse lookup
 * (lb_maps.h). A hit is a NAT backend's packet:
 *   - bpf_fib_lookup(client) finds the next hop, so the client may sit
 *     behind a router. BPF_FIB_LKUP_RET_NOT_FWDED passes untouched
 *     (NAT_STAT_STACK): the destination is the gateway itself (its health
 *     checks and its own connections to the backend), or there is no route
 *     at all (the lookup says the same), which the stack would not forward
 *     either: it answers the backend with ICMP net unreachable;
 *   - success: source rewritten to VIP:port, checksums fixed, MACs from
 *     the lookup; XDP_TX when the next hop is on the ingress interface,
 *     else XDP_REDIRECT to it (an untagged frame only);
 *   - BPF_FIB_LKUP_RET_NO_NEIGH: dropped and counted (NAT_STAT_NO_NEIGH).
 *     The controller pre-resolves the next hops (the gateways of the routes
 *     via the attached interface); a directly attached client resolves
 *     itself when it ARPs for the gateway (the kernel keeps its entry).
 *     TCP resends once the entry exists;
 *   - any other failure (a blackhole, unreachable or prohibit route,
 *     forwarding off on the ingress interface, frag needed): dropped and
 *     counted (NAT_STAT_NO_ROUTE). The lookup is given ingress_ifindex and
 *     reads that interface's own net.ipv4.conf.<if>.forwarding, not
 *     net.ipv4.ip_forward: attach and reload check the same one.
 * A reply that matched is never passed untranslated: with forwarding on,
 * the stack would send it to the client, whose RST would kill the
 * association.
 *
 * What a NAT backend sends that cannot be translated is dropped and counted,
 * never passed (the gateway's own traffic, bpf_fib_lookup NOT_FWDED, passes):
 *   - a TCP/UDP IPv4 fragment (NAT_STAT_FRAGMENT) or a TCP/UDP packet whose
 *     L4 header is cut short (NAT_STAT_TRUNCATED): no ports to look up, so
 *     the decision is the SOURCE ADDRESS alone (nat_addrs): every such packet
 *     from a NAT backend's address is dropped, whatever its port;
 *   - nat_unreadable (xdplb.c calls it from parse_l3 and truncated_l4);
 *   - IPv6 (nat6.h, nat_addrs6) adds one: a packet whose extension-header
 *     chain the program does not walk to its end (more than IPV6_EXT_MAX
 *     headers; a routing header with Segments Left > 0), whatever its
 *     protocol, is dropped and counted as NAT_STAT_UNTRANSLATABLE.
 *
 * ICMP errors about NAT flows are dropped and counted (NAT_STAT_ICMP), not
 * translated, in both directions:
 *   - a frag-needed to the VIP quoting a NAT service's reply (handle_icmp.h).
 *     Path MTU changes on the client side therefore need the usual MSS
 *     clamping; README says so;
 *   - an error a NAT backend sends to a client quoting client -> backend:port
 *     (a destination/port unreachable, frag needed, time exceeded, parameter
 *     problem, source quench: nat_backend_icmp). The client's TCP recovers
 *     by its own timeouts, as when an error is lost on the way.
 *
 * Part of xdplb.c (its struct packet, struct dest and steps).
 */
#ifndef XDPLB_NAT_H
#define XDPLB_NAT_H

#include <linux/bpf.h>
#include <linux/icmp.h>
#include "csum.h"
#include "parsing_helpers.h"
#include "stats.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* A nat_backend or nat_rev_value as one 64-bit word: read in one load. */
union nat_backend_word {
	struct nat_backend nb;
	__u64 word;
};

union nat_rev_word {
	struct nat_rev_value rev;
	__u64 word;
};

static __always_inline void count_nat(__u32 stat)
{
	count_u64(nat_stats.lookup(&stat));
}

static __always_inline int nat_counted(__u32 stat, int action)
{
	count_nat(stat);
	return action;
}

/* Whether some NAT backend listens on this source port (nat_ports). */
static __always_inline int nat_port_in_use(__be16 sport)
{
	__u32 port = bpf_ntohs(sport);
	__u32 word = port / 32;
	__u32 *bits = nat_ports.lookup(&word);

	return bits && (*bits & (1U << (port % 32)));
}

/* The L4 checksum and the port to rewrite (source or destination) of the
 * TCP/UDP header at `l4`, which parse_l4 accepted. 0 when the header is not
 * there (never, in practice). */
static __always_inline int l4_fields_at(const struct packet *pkt, void *l4, int source,
					__sum16 **check, __be16 **port)
{
	struct tcphdr *tcph = l4;
	struct udphdr *udph = l4;

	if (pkt->l4_proto == IPPROTO_TCP) {
		if ((void *)(tcph + 1) > pkt->data_end)
			return 0;
		*check = &tcph->check;
		*port = source ? &tcph->source : &tcph->dest;
		return 1;
	}
	if ((void *)(udph + 1) > pkt->data_end)
		return 0;
	*check = &udph->check;
	*port = source ? &udph->source : &udph->dest;
	return 1;
}

/* The same, found again from the IPv4 header: a pointer kept in struct
 * packet would split the verifier's states on every path after parse_l4
 * (TCP and UDP ranges), which the race-window test build cannot afford. */
static __always_inline int nat_l4_fields(const struct packet *pkt, int source,
					 __sum16 **check, __be16 **port)
{
	return l4_fields_at(pkt, (void *)pkt->iph + pkt->iph->ihl * 4, source, check, port);
}

/* bpf_fib_lookup for a packet from `iph` leaving with source `saddr` (the
 * VIP for a translated reply, else the packet's own) and these ports. */
static __always_inline int nat_fib_lookup(struct xdp_md *ctx, const struct iphdr *iph, __u8 proto,
					  __be32 saddr, __be16 sport, __be16 dport,
					  struct bpf_fib_lookup *fib)
{
	fib->family = AF_INET;
	fib->tos = iph->tos;
	fib->l4_protocol = proto;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = bpf_ntohs(iph->tot_len);
	fib->ipv4_src = saddr;
	fib->ipv4_dst = iph->daddr;
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* Whether the gateway would route `iph` on rather than take it itself:
 * anything but BPF_FIB_LKUP_RET_NOT_FWDED (to the gateway, or no route). */
static __always_inline int nat_routed_on(struct xdp_md *ctx, const struct iphdr *iph, __u8 proto)
{
	struct bpf_fib_lookup fib = {};

	return nat_fib_lookup(ctx, iph, proto, iph->saddr, 0, 0, &fib) != BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* Whether `addr` is some NAT backend's address (nat_addrs, lb_maps.h). */
static __always_inline int nat_backend_addr(__be32 addr)
{
	return nat_addrs.lookup(&addr) != NULL;
}

/*
 * A TCP/UDP packet whose ports nat_reply cannot read (an IPv4 fragment: only
 * the first carries them; or an L4 header cut short), not to a VIP. From a
 * NAT backend's address and routed on (not to the gateway itself), it could
 * be a reply the stack would forward untranslated: dropped and counted as
 * `stat`. Decided by the source address alone, so any such packet of a NAT
 * backend is dropped, not only its NAT services' replies. Everything else
 * passes to the stack as before.
 */
static __always_inline int nat_unreadable(const struct packet *pkt, const struct iphdr *iph,
					  __u8 proto, __u32 stat)
{
	if (nat_backend_addr(iph->saddr) && nat_routed_on(pkt->ctx, iph, proto))
		return nat_counted(stat, XDP_DROP);
	return counted(REASON_NOT_SERVICE, XDP_PASS);
}

/*
 * ICMP errors a NAT backend sends to a client about a NAT flow (its kernel's
 * port unreachable, frag needed, parameter problem...). They quote what the
 * backend received: client -> backend:port, its translated request, and would
 * reach the client untranslated, naming an address and port the client never
 * used. Dropped and counted (NAT_STAT_ICMP), not translated. Not to the
 * gateway itself (errors about its health checks pass to its stack).
 * `pos` is the ICMP header; CONTINUE for anything else.
 */
static __always_inline int nat_backend_icmp(const struct packet *pkt, void *pos, void *data_end)
{
	struct hdr_cursor nh = { .pos = pos };
	struct icmphdr *icmph = pos;
	struct nat_rev_key key = {};
	struct iphdr *inner;
	__be16 *ports;
	int proto;

	if ((void *)(icmph + 1) > data_end)
		return CONTINUE;
	if (icmph->type != ICMP_DEST_UNREACH && icmph->type != ICMP_SOURCE_QUENCH &&
	    icmph->type != ICMP_TIME_EXCEEDED && icmph->type != ICMP_PARAMETERPROB)
		return CONTINUE;
	nh.pos = icmph + 1;
	proto = parse_iphdr(&nh, data_end, &inner);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return CONTINUE;
	/* From the backend about a packet to it; a later fragment has no ports. */
	if (inner->daddr != pkt->iph->saddr || (inner->frag_off & bpf_htons(IP_OFFSET)))
		return CONTINUE;
	ports = nh.pos;
	if ((void *)(ports + 2) > data_end)
		return CONTINUE;
	if (!nat_port_in_use(ports[1]))
		return CONTINUE;
	key.addr = inner->daddr;
	key.port = ports[1];
	key.proto = proto;
	if (!nat_reverse.lookup(&key) || !nat_routed_on(pkt->ctx, pkt->iph, IPPROTO_ICMP))
		return CONTINUE;
	return nat_counted(NAT_STAT_ICMP, XDP_DROP);
}

/* Rewrite the address `*addr` (in the IPv4 header) and the port `*port`
 * (in the L4 header) to the new ones, and every checksum they are in. */
static __always_inline void nat_rewrite(struct iphdr *iph, __u8 proto, __sum16 *check,
					__be32 *addr, __be32 new_addr, __be16 *port, __be16 new_port)
{
	__be32 old_addr = *addr;
	__be16 old_port = *port;

	*addr = new_addr;
	*port = new_port;
	lb_csum_replace4(&iph->check, old_addr, new_addr);
	if (proto == IPPROTO_UDP && *check == 0)
		return;   /* UDP without a checksum: none to fix */
	lb_csum_replace4(check, old_addr, new_addr);   /* the pseudo-header holds the address */
	lb_csum_replace2(check, old_port, new_port);
	if (proto == IPPROTO_UDP && *check == 0)
		*check = 0xffff;   /* RFC 768: a computed 0 is sent as all ones */
}

/* Request of a NAT service, its MACs already rewritten as for DSR
 * (forward()): to the backend's own address and port. Returns XDP_TX, or
 * XDP_DROP when the backend's target is being rewritten. */
static __always_inline int nat_request(const struct packet *pkt, const struct dest *dst)
{
	union nat_backend_word *entry, target;
	struct iphdr *iph = pkt->iph;
	__sum16 *check;
	__be16 *dport;
	__u32 bid = dst->bid;

	entry = (union nat_backend_word *)nat_backends.lookup(&bid);
	if (!entry)
		return nat_counted(NAT_STAT_NO_TARGET, XDP_DROP);
	target.word = *(volatile __u64 *)&entry->word;
	if (!target.nb.ready)
		return nat_counted(NAT_STAT_NO_TARGET, XDP_DROP);
	if (!nat_l4_fields(pkt, 0, &check, &dport))
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);
	nat_rewrite(iph, pkt->l4_proto, check, &iph->daddr, target.nb.addr, dport, target.nb.port);
	count_nat(NAT_STAT_REQUEST);
	return XDP_TX;
}

/* What a reply's bpf_fib_lookup result `rc` means (see the top of this
 * file): CONTINUE when it may be translated and sent by `fib`, else the
 * final action, counted. Shared by both families (nat6.h). */
static __always_inline int nat_fib_verdict(struct xdp_md *ctx, const struct packet *pkt, int rc,
					   const struct bpf_fib_lookup *fib)
{
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)   /* to the gateway itself, or no route */
		return nat_counted(NAT_STAT_STACK, XDP_PASS);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return nat_counted(NAT_STAT_NO_NEIGH, XDP_DROP);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return nat_counted(NAT_STAT_NO_ROUTE, XDP_DROP);
	if (fib->ifindex != ctx->ingress_ifindex && is_vlan_proto(pkt->eth->h_proto))
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);
	return CONTINUE;
}

/* A translated reply leaves with the MACs of the lookup: XDP_TX when the
 * next hop is on the ingress interface, else XDP_REDIRECT. */
static __always_inline int nat_reply_send(struct xdp_md *ctx, const struct packet *pkt,
					  const struct bpf_fib_lookup *fib)
{
	/* The MACs come from the stack (fib), not from a map: no race to test. */
	__builtin_memcpy(pkt->eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, fib->smac, ETH_ALEN);
	if (fib->ifindex == ctx->ingress_ifindex)
		return nat_counted(NAT_STAT_REPLY_TX, XDP_TX);
	count_nat(NAT_STAT_REPLY_REDIRECT);
	/* A constant action, so the verifier knows the steps after are skipped. */
	return bpf_redirect(fib->ifindex, 0) == XDP_REDIRECT ? XDP_REDIRECT : XDP_ABORTED;
}

/*
 * The reply step, for a TCP/UDP packet whose source port is in nat_ports:
 * CONTINUE when (source address, source port, protocol) is no NAT backend's
 * (the usual steps decide), else the reply's fate (see the top of this file).
 */
static __always_inline int nat_reply(struct xdp_md *ctx, const struct packet *pkt)
{
	struct nat_rev_key key = {};
	union nat_rev_word *entry, rev;
	struct bpf_fib_lookup fib = {};
	struct iphdr *iph = pkt->iph;
	__sum16 *check;
	__be16 *sport;
	int rc;

	key.addr = pkt->flow.src;
	key.port = pkt->flow.sport;
	key.proto = pkt->flow.proto;
	entry = (union nat_rev_word *)nat_reverse.lookup(&key);
	if (!entry)
		return CONTINUE;
	rev.word = *(volatile __u64 *)&entry->word;
	if (rev.rev.bport != key.port)   /* an element recycled under us (lb_maps.h) */
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);

	rc = nat_fib_lookup(ctx, iph, pkt->l4_proto, rev.rev.vip, rev.rev.vport, pkt->flow.dport, &fib);
	rc = nat_fib_verdict(ctx, pkt, rc, &fib);
	if (rc != CONTINUE)
		return rc;
	if (!nat_l4_fields(pkt, 1, &check, &sport))
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);
	nat_rewrite(iph, pkt->l4_proto, check, &iph->saddr, rev.rev.vip, sport, rev.rev.vport);
	return nat_reply_send(ctx, pkt, &fib);
}

#endif /* XDPLB_NAT_H */
