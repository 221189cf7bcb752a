/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat6.h - forwarding = "nat" over IPv6: what nat.h does for IPv4, with the
 * IPv6 maps (lb_maps6.h: nat_backends6, nat_reverse6, nat_addrs6; nat_ports
 * and nat_stats are shared) and the same outcomes and counters. Where IPv6
 * differs:
 *   - there is no IP header checksum: only the TCP/UDP checksum is updated,
 *     incrementally over the 16-byte address and the port (csum.h);
 *   - a UDP checksum of 0 is not "none" as in IPv4: RFC 8200 (8.1) makes
 *     it mandatory and a receiver discards a datagram with 0. A request or
 *     a reply with UDP checksum 0 is therefore dropped and counted as
 *     NAT_STAT_UNTRANSLATABLE (translating it would hand the backend or the
 *     client a datagram its stack discards anyway, and recomputing a full
 *     checksum is not this program's business). A computed 0 is sent as
 *     0xffff, as for IPv4;
 *   - the L4 header is wherever parse_ipv6 left the cursor after the
 *     extension headers (hop-by-hop, destination options, routing with
 *     Segments Left 0), which stay as they are. ingress_ipv6 keeps its
 *     offset in struct packet (l4_off; the IPv4 path never sets it). With a
 *     routing header of Segments Left 0 the destination is the final one,
 *     which the pseudo-header holds, so the same update is right;
 *   - bpf_fib_lookup runs with AF_INET6: flowinfo (traffic class and flow
 *     label) from the header, source the VIP, destination the client,
 *     tot_len payload_len + 40; it needs forwarding on the interface it is
 *     given, the ingress one: net.ipv6.conf.<if>.forwarding = 1 (its own;
 *     net.ipv6.conf.all.forwarding is not read);
 *   - fragments: an IPv6 fragment header naming TCP or UDP, from a NAT
 *     backend's address (nat_addrs6) and routed on, is dropped and counted
 *     (NAT_STAT_FRAGMENT); a TCP/UDP header cut short likewise
 *     (NAT_STAT_TRUNCATED): nat_unreadable6;
 *   - a chain parse_ipv6 does not walk to its end (IPV6_EXT_LIMIT, a
 *     routing header with Segments Left > 0: IPV6_ROUTING) hides the ports
 *     too: from a NAT backend's address, not to a VIP, and routed on, it is
 *     dropped and counted (NAT_STAT_UNTRANSLATABLE), whatever its protocol:
 *     nat_unreadable6 again (unwalked_chain6, xdplb6.h). The stack would
 *     otherwise forward it untranslated;
 *   - ICMPv6 errors a NAT backend sends to a client about a NAT flow
 *     (Destination Unreachable, Packet Too Big, Time Exceeded, Parameter
 *     Problem) are dropped and counted (NAT_STAT_ICMP): nat_backend_icmp6.
 *     A Packet Too Big to the VIP quoting a NAT service's reply is dropped
 *     and counted the same way by send_to_owner (handle_icmp.h).
 * The hop limit is left alone, as the IPv4 path leaves the TTL.
 *
 * Called from ingress_ipv6 (xdplb6.h), truncated_l4 and forward (xdplb.c)
 * only with a flow_key6, so the IPv4 path has none of this code.
 * Part of xdplb.c, included after nat.h.
 */
#ifndef XDPLB_NAT6_H
#define XDPLB_NAT6_H

#include <linux/icmpv6.h>
#include "csum.h"
#include "nat.h"
#include "parse_ipv6.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif

static __always_inline int same_addr6(const struct in6_addr *a, const __be32 *b);   /* xdplb6.h */

/* The traffic class and flow label: the first word of the IPv6 header less the version. */
#define NAT6_FLOWINFO_MASK 0x0FFFFFFF

/* Upper bound the verifier needs on struct packet's l4_off (a frame is at
 * most a page in XDP, well within it). */
#define NAT6_L4_OFF_MAX 16383

/* The IPv6 header of a frame parse_l2 accepted: after the Ethernet header
 * and its VLAN tag, if any. NULL when cut short (never, after parse_ipv6). */
static __always_inline struct ipv6hdr *nat_ip6hdr(const struct packet *pkt)
{
	struct ipv6hdr *ip6h = (void *)(pkt->eth + 1);

	if (is_vlan_proto(pkt->eth->h_proto))
		ip6h = (void *)ip6h + sizeof(struct lb_vlan_hdr);
	if ((void *)(ip6h + 1) > pkt->data_end)
		return NULL;
	return ip6h;
}

/* The L4 checksum and port of the TCP/UDP header ingress_ipv6 found (l4_off). */
static __always_inline int nat_l4_fields6(const struct packet *pkt, int source, __sum16 **check, __be16 **port)
{
	__u32 off = pkt->l4_off;
	void *l4;

	if (off == 0)
		return 0;
	asm volatile("" : "+r"(off));   /* a plain upper bound, not folded into the test for 0 */
	if (off > NAT6_L4_OFF_MAX)
		return 0;
	l4 = (void *)pkt->eth + off;
	/* One pointer for the bounds check and the fields: without the empty
	 * asm, clang adds the header's offsets to `off` before the frame's
	 * start, and the verifier cannot tie the check to the fields. */
	asm volatile("" : "+r"(l4));
	return l4_fields_at(pkt, l4, source, check, port);
}

static __always_inline void copy_words6(__be32 *to, const __be32 *from)
{
	to[0] = from[0];
	to[1] = from[1];
	to[2] = from[2];
	to[3] = from[3];
}

/* Whether `addr` is some IPv6 NAT backend's address (nat_addrs6). */
static __always_inline int nat_backend_addr6(const __be32 *addr)
{
	struct lb_addr key;

	copy_words6(key.v6, addr);
	return nat_addrs6.lookup(&key) != NULL;
}

/* bpf_fib_lookup for a packet from `ip6h` leaving with source `saddr` (the
 * VIP for a translated reply, else the packet's own) and these ports. */
static __always_inline int nat_fib_lookup6(struct xdp_md *ctx, const struct ipv6hdr *ip6h, __u8 proto,
					   const __be32 *saddr, __be16 sport, __be16 dport,
					   struct bpf_fib_lookup *fib)
{
	fib->family = AF_INET6;
	fib->flowinfo = *(const __be32 *)ip6h & bpf_htonl(NAT6_FLOWINFO_MASK);
	fib->l4_protocol = proto;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
	copy_words6(fib->ipv6_src, saddr);
	copy_words6(fib->ipv6_dst, ip6h->daddr.in6_u.u6_addr32);
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* Whether the gateway would route `ip6h` on rather than take it itself
 * (nat_routed_on for IPv6). */
static __always_inline int nat_routed_on6(struct xdp_md *ctx, const struct ipv6hdr *ip6h, __u8 proto)
{
	struct bpf_fib_lookup fib = {};

	return nat_fib_lookup6(ctx, ip6h, proto, ip6h->saddr.in6_u.u6_addr32, 0, 0, &fib) !=
	       BPF_FIB_LKUP_RET_NOT_FWDED;
}

/*
 * nat_unreadable for IPv6: a packet whose ports cannot be read (a TCP/UDP
 * fragment; an L4 header cut short; a chain not walked to its end, `proto`
 * then the IPv6 header's Next Header), not to a VIP. From a NAT backend's
 * address and routed on: dropped and counted as `stat`; else it passes.
 */
static __always_inline int nat_unreadable6(const struct packet *pkt, const struct flow_key6 *k6, __u8 proto,
					   __u32 stat)
{
	struct ipv6hdr *ip6h;

	if (nat_backend_addr6(k6->src)) {
		ip6h = nat_ip6hdr(pkt);
		if (ip6h && nat_routed_on6(pkt->ctx, ip6h, proto))
			return nat_counted(stat, XDP_DROP);
	}
	return counted(REASON_NOT_SERVICE, XDP_PASS);
}

/*
 * nat_backend_icmp for ICMPv6: an error a NAT backend sends to a client
 * quoting what it received (client -> backend:port, a translated request),
 * which would reach the client naming an address and port it never used.
 * Dropped and counted (NAT_STAT_ICMP), unless it is to the gateway itself.
 * `pos` is the ICMPv6 header; CONTINUE for anything else.
 */
static __always_inline int nat_backend_icmp6(const struct packet *pkt, const struct flow_key6 *k6, void *pos,
					     void *data_end)
{
	struct hdr_cursor nh = { .pos = pos };
	struct icmp6hdr *icmp6 = pos;
	struct ipv6_chain chain = {};
	struct nat_rev_key6 key = {};
	struct ipv6hdr *inner, *outer;
	__be16 *ports;
	int proto;

	if ((void *)(icmp6 + 1) > data_end)
		return CONTINUE;
	if (icmp6->icmp6_type != ICMPV6_DEST_UNREACH && icmp6->icmp6_type != ICMPV6_PKT_TOOBIG &&
	    icmp6->icmp6_type != ICMPV6_TIME_EXCEED && icmp6->icmp6_type != ICMPV6_PARAMPROB)
		return CONTINUE;
	nh.pos = icmp6 + 1;
	proto = parse_ipv6(&nh, data_end, &inner, &chain);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return CONTINUE;
	/* From the backend about a packet to it, sent back to that packet's
	 * source (a client, not a VIP); a later fragment has no ports. */
	if (chain.later_fragment || !same_addr6(&inner->daddr, k6->src) || !same_addr6(&inner->saddr, k6->dst))
		return CONTINUE;
	ports = nh.pos;
	if ((void *)(ports + 2) > data_end)
		return CONTINUE;
	if (!nat_port_in_use(ports[1]))
		return CONTINUE;
	copy_words6(key.addr, k6->src);
	key.port = ports[1];
	key.proto = proto;
	if (!nat_reverse6.lookup(&key))
		return CONTINUE;
	outer = nat_ip6hdr(pkt);
	if (!outer || !nat_routed_on6(pkt->ctx, outer, IPPROTO_ICMPV6))
		return CONTINUE;
	return nat_counted(NAT_STAT_ICMP, XDP_DROP);
}

/* Rewrite the address `addr` (in the IPv6 header) and the port `*port`
 * (in the L4 header) to the new ones, and the L4 checksum over both (the
 * pseudo-header holds the address). The caller has refused a UDP checksum
 * of 0. */
static __always_inline void nat_rewrite6(__u8 proto, __sum16 *check, __be32 *addr, const __be32 *new_addr,
					 __be16 *port, __be16 new_port)
{
	__be32 old_addr[4];
	__be16 old_port = *port;

	copy_words6(old_addr, addr);
	copy_words6(addr, new_addr);
	*port = new_port;
	lb_csum_replace16(check, old_addr, new_addr);
	lb_csum_replace2(check, old_port, new_port);
	if (proto == IPPROTO_UDP && *check == 0)
		*check = 0xffff;   /* RFC 8200 8.1: a computed 0 is sent as all ones */
}

/* Whether the TCP/UDP checksum at `check` can be updated: not UDP's 0. */
static __always_inline int nat_csum_usable6(__u8 proto, const __sum16 *check)
{
	return proto != IPPROTO_UDP || *check != 0;
}

/* nat_request for IPv6: the request of an IPv6 NAT service, its MACs
 * already rewritten (forward()), to the backend's own address and port.
 * nat_backends6 follows rule 1: `ready` is read first, the fields after it
 * (lb_maps6.h). */
static __always_inline int nat_request6(const struct packet *pkt, const struct dest *dst)
{
	struct nat_backend6 *entry;
	struct ipv6hdr *ip6h;
	__be32 addr[4];
	__sum16 *check;
	__be16 *dport, port;
	__u32 bid = dst->bid;

	entry = nat_backends6.lookup(&bid);
	if (!entry || !*(volatile __u8 *)&entry->ready)
		return nat_counted(NAT_STAT_NO_TARGET, XDP_DROP);
	asm volatile("" : : : "memory");   /* the fields are read after `ready` */
	copy_words6(addr, entry->addr);
	port = entry->port;
	ip6h = nat_ip6hdr(pkt);
	if (!ip6h || !nat_l4_fields6(pkt, 0, &check, &dport) || !nat_csum_usable6(pkt->l4_proto, check))
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);
	nat_rewrite6(pkt->l4_proto, check, ip6h->daddr.in6_u.u6_addr32, addr, dport, port);
	count_nat(NAT_STAT_REQUEST);
	return XDP_TX;
}

/*
 * nat_reply for IPv6, for a TCP/UDP packet whose source port is in
 * nat_ports: CONTINUE when (source address, source port, protocol) is no
 * IPv6 NAT backend's, else the reply's fate, as for IPv4 (nat.h).
 */
static __always_inline int nat_reply6(struct xdp_md *ctx, const struct packet *pkt, const struct flow_key6 *k6)
{
	struct nat_rev_key6 key = {};
	struct nat_rev_value6 *entry;
	struct bpf_fib_lookup fib = {};
	struct ipv6hdr *ip6h;
	__be32 vip[4];
	__be16 vport, *sport;
	__sum16 *check;
	int rc;

	copy_words6(key.addr, k6->src);
	key.port = k6->sport;
	key.proto = k6->proto;
	entry = nat_reverse6.lookup(&key);
	if (!entry)
		return CONTINUE;
	copy_words6(vip, entry->vip);
	vport = entry->vport;
	if (entry->bport != key.port)   /* never, while the controller keeps lb_maps6.h's protocol */
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);
	ip6h = nat_ip6hdr(pkt);
	if (!ip6h)
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);

	rc = nat_fib_lookup6(ctx, ip6h, k6->proto, vip, vport, k6->dport, &fib);
	rc = nat_fib_verdict(ctx, pkt, rc, &fib);
	if (rc != CONTINUE)
		return rc;
	if (!nat_l4_fields6(pkt, 1, &check, &sport) || !nat_csum_usable6(k6->proto, check))
		return nat_counted(NAT_STAT_UNTRANSLATABLE, XDP_DROP);
	nat_rewrite6(k6->proto, check, ip6h->saddr.in6_u.u6_addr32, vip, sport, vport);
	return nat_reply_send(ctx, pkt, &fib);
}

#endif /* XDPLB_NAT6_H */
