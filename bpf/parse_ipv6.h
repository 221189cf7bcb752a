/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parse_ipv6.h - the IPv6 header and its extension-header chain.
 *
 * Same contract as parsing_helpers.h: every read is bounds-checked first,
 * and the cursor moves only past what was checked.
 *
 * The chain is walked in a bounded loop of at most IPV6_EXT_MAX extension
 * headers (the verifier walks each turn). 4 is the longest chain in RFC
 * 8200's order (4.1) without a repeated header, AH or ESP: hop-by-hop,
 * destination options, routing, destination options; a fragment header ends
 * the walk. Kinds walked:
 *   - hop-by-hop options (0), only right after the IPv6 header (RFC 8200
 *     4.3; anywhere else: IPV6_MALFORMED, the stack answers it);
 *   - destination options (60);
 *   - routing (43) with Segments Left 0: the packet has reached its last
 *     segment, this address. With Segments Left > 0 the packet is still on
 *     its way to another address (SRv6, type 2 for mobile IPv6): it is the
 *     stack's business (IPV6_ROUTING);
 *   - fragment (44): the walk stops there, since only a first fragment
 *     carries what follows; *frag says so and the fragment header's Next
 *     Header is returned.
 * A chain that has more extension headers than IPV6_EXT_MAX returns
 * IPV6_EXT_LIMIT. AH (51), ESP (50) and any other Next Header end the walk
 * and are returned as the upper-layer protocol (not TCP/UDP: passed).
 */
#ifndef XDPLB_PARSE_IPV6_H
#define XDPLB_PARSE_IPV6_H

#include <linux/ipv6.h>
#include <linux/in6.h>
#include "parsing_helpers.h"

#ifndef IPV6_EXT_MAX
#define IPV6_EXT_MAX 4
#endif

#define IPV6_MALFORMED (-1)   /* a header cut short, or not version 6, or hop-by-hop not first */
#define IPV6_EXT_LIMIT (-2)   /* more than IPV6_EXT_MAX extension headers */
#define IPV6_ROUTING (-3)     /* a routing header with Segments Left > 0 */

/* The first 4 bytes of hop-by-hop, destination options and routing headers. */
struct lb_ipv6_ext {
	__u8 nexthdr;
	__u8 hdrlen;           /* 8-byte units, not counting the first 8 */
	__u8 routing_type;     /* routing header only */
	__u8 segments_left;    /* routing header only */
};

/* The fragment header, 8 bytes. */
struct lb_ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;       /* network order: offset (13 bits, 8-byte units), 2 reserved, M */
	__be32 identification;
};

/* IPv6 fragment-offset mask, in host order (the low 3 bits are flags). */
#define IPV6_FRAG_OFFSET_MASK 0xFFF8

/* What the walk saw besides the upper-layer protocol. */
struct ipv6_chain {
	__u8 ext_headers;      /* extension headers walked (fragment header included) */
	__u8 fragment;         /* 1: a fragment header ended the walk */
	__u8 later_fragment;   /* 1: ... with a non-zero offset (no upper-layer header here) */
};

static __always_inline int ipv6_ext_kind(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_DSTOPTS || next == IPPROTO_ROUTING ||
	       next == IPPROTO_FRAGMENT;
}

/* The IPv6 header and its chain. Returns the upper-layer protocol (>= 0),
 * or IPV6_MALFORMED / IPV6_EXT_LIMIT / IPV6_ROUTING. *out is set whenever
 * the fixed 40-byte header was valid, whatever the chain. */
static __always_inline int parse_ipv6(struct hdr_cursor *nh, void *data_end, struct ipv6hdr **out,
				      struct ipv6_chain *chain)
{
	struct ipv6hdr *ip6h = nh->pos;
	struct lb_ipv6_frag *frag;
	struct lb_ipv6_ext *ext;
	void *pos;
	__u8 next;
	int i;

	if ((void *)(ip6h + 1) > data_end)
		return IPV6_MALFORMED;
	if (ip6h->version != 6)
		return IPV6_MALFORMED;
	*out = ip6h;
	pos = ip6h + 1;
	next = ip6h->nexthdr;
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		if (!ipv6_ext_kind(next))
			break;
		if (next == IPPROTO_FRAGMENT) {
			frag = pos;
			if ((void *)(frag + 1) > data_end)
				return IPV6_MALFORMED;
			chain->ext_headers++;
			chain->fragment = 1;
			chain->later_fragment = (bpf_ntohs(frag->frag_off) & IPV6_FRAG_OFFSET_MASK) != 0;
			nh->pos = frag + 1;
			return frag->nexthdr;
		}
		ext = pos;
		if ((void *)(ext + 1) > data_end)
			return IPV6_MALFORMED;
		if (next == IPPROTO_HOPOPTS && i > 0)
			return IPV6_MALFORMED;
		if (next == IPPROTO_ROUTING && ext->segments_left)
			return IPV6_ROUTING;
		pos += (ext->hdrlen + 1) * 8;
		if (pos > data_end)
			return IPV6_MALFORMED;
		chain->ext_headers++;
		next = ext->nexthdr;
	}
	if (ipv6_ext_kind(next))
		return IPV6_EXT_LIMIT;
	nh->pos = pos;
	return next;
}

#endif /* XDPLB_PARSE_IPV6_H */
