/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parsing_helpers.h - packet header parsers.
 *
 * The contract of every parser here (after xdp-tools' parsing_helpers.h):
 *   - it first checks that the whole header lies before data_end
 *     (`hdr + 1 > data_end`, or the full variable length for IPv4);
 *   - on success it advances the cursor past the header, stores a pointer
 *     to the header in *out and returns the next protocol (or, for L4, 0);
 *   - on failure it returns -1 and leaves the cursor where it was.
 * The verifier needs the bounds check before any read; doing it first, the
 * same way everywhere, keeps each parser obviously correct.
 */
#ifndef XDPLB_PARSING_HELPERS_H
#define XDPLB_PARSING_HELPERS_H

#include <linux/if_ether.h>
#include <linux/if_vlan.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>

/* IPv4 frag_off bits (host order); uapi headers do not export them. */
#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1FFF
#endif

struct hdr_cursor {
	void *pos;
};

/* 802.1Q / 802.1ad tag; the kernel's struct vlan_hdr lives in a header that
 * is not usable from BPF, so declare the 4 bytes here. */
struct lb_vlan_hdr {
	__be16 tci;                /* network order: PCP, DEI, VLAN id */
	__be16 encapsulated_proto; /* network order: next EtherType */
};

static __always_inline int is_vlan_proto(__be16 proto)
{
	return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Ethernet. Returns the EtherType (network order). */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end,
					struct ethhdr **out)
{
	struct ethhdr *eth = nh->pos;

	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	*out = eth;
	return eth->h_proto;
}

/* One VLAN tag (xdplb accepts at most one). Returns the inner EtherType. */
static __always_inline int parse_vlanhdr(struct hdr_cursor *nh, void *data_end,
					 struct lb_vlan_hdr **out)
{
	struct lb_vlan_hdr *vlh = nh->pos;

	if ((void *)(vlh + 1) > data_end)
		return -1;
	nh->pos = vlh + 1;
	*out = vlh;
	return vlh->encapsulated_proto;
}

/* IPv4 with any valid IHL (5..15 words). Checks the version, that the header
 * length is sane before reading that many bytes, and that tot_len covers the
 * header. Returns the L4 protocol. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
				       struct iphdr **out)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->version != 4 || iph->ihl < 5)
		return -1;
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return -1;
	if (bpf_ntohs(iph->tot_len) < hdrsize)
		return -1;
	nh->pos += hdrsize;
	*out = iph;
	return iph->protocol;
}

/* TCP: only the fixed 20-byte header is needed (ports and flags), but the
 * data offset must still be valid. Returns 0. */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end,
					struct tcphdr **out)
{
	struct tcphdr *tcph = nh->pos;

	if ((void *)(tcph + 1) > data_end)
		return -1;
	if (tcph->doff < 5)
		return -1;
	nh->pos = tcph + 1;
	*out = tcph;
	return 0;
}

/* UDP. Returns 0. */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end,
					struct udphdr **out)
{
	struct udphdr *udph = nh->pos;

	if ((void *)(udph + 1) > data_end)
		return -1;
	if (bpf_ntohs(udph->len) < sizeof(*udph))
		return -1;
	nh->pos = udph + 1;
	*out = udph;
	return 0;
}

/* True for any IPv4 fragment: MF set or a non-zero offset. */
static __always_inline int ipv4_is_fragment(const struct iphdr *iph)
{
	return (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET)) != 0;
}

#endif /* XDPLB_PARSING_HELPERS_H */
