/* SPDX-License-Identifier: GPL-2.0 */
/*
 * csum.h - incremental Internet checksum updates (RFC 1624, eqn. 3).
 *
 * HC' = ~(~HC + ~m + m'), summed in 16-bit ones' complement words. The
 * words are added as they lie in memory: the ones' complement sum is byte
 * order independent (RFC 1071, 2.(B)), so addresses and ports are passed
 * in network order and the result is stored as is.
 *
 * The result is never 0x0000 turned into 0xffff or back by mistake: the
 * folded sum of non-zero words is never 0, so HC' lies in 0x0000..0xfffe,
 * as a checksum computed from scratch does (scapy's, in the packet tests).
 * UDP's "no checksum" (0) is the caller's business (nat.h; IPv6 has no
 * such thing, nat6.h).
 *
 * Valid only on a complete checksum. A CHECKSUM_PARTIAL skb (a local sender
 * with TX checksum offload, seen by generic XDP) holds the pseudo-header sum
 * instead, which these updates would corrupt; README "Offloads" says which
 * offloads NAT needs off.
 */
#ifndef XDPLB_CSUM_H
#define XDPLB_CSUM_H

#include <linux/types.h>

/* Fold a 64-bit sum of 16-bit words to 16 bits, end-around carries kept. */
static __always_inline __u16 csum_fold64(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* *check covers a 32-bit field that changes from `from` to `to`. */
static __always_inline void lb_csum_replace4(__sum16 *check, __be32 from, __be32 to)
{
	__u32 nfrom = ~(__u32)from;
	__u64 sum = (__u16)~*check;

	sum += (nfrom & 0xffff) + (nfrom >> 16);
	sum += ((__u32)to & 0xffff) + ((__u32)to >> 16);
	*check = (__sum16)~csum_fold64(sum);
}

/* *check covers a 128-bit field (an IPv6 address, four 32-bit words in
 * network order) that changes from `from` to `to`: one sum, one fold. */
static __always_inline void lb_csum_replace16(__sum16 *check, const __be32 *from, const __be32 *to)
{
	__u64 sum = (__u16)~*check;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		__u32 nfrom = ~(__u32)from[i];

		sum += (nfrom & 0xffff) + (nfrom >> 16);
		sum += ((__u32)to[i] & 0xffff) + ((__u32)to[i] >> 16);
	}
	*check = (__sum16)~csum_fold64(sum);
}

/* *check covers a 16-bit field that changes from `from` to `to`. */
static __always_inline void lb_csum_replace2(__sum16 *check, __be16 from, __be16 to)
{
	__u64 sum = (__u16)~*check;

	sum += (__u16)~from;
	sum += (__u16)to;
	*check = (__sum16)~csum_fold64(sum);
}

#endif /* XDPLB_CSUM_H */
