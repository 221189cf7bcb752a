/* SPDX-License-Identifier: GPL-2.0 */
/*
 * bench_floor.c - the floor of the data-plane benchmark (tools/bench).
 *
 * The least an XDP forwarder can do: parse Ethernet and IPv4 (or the fixed
 * IPv6 header), swap the two MAC addresses and send the frame back out
 * (XDP_TX). No map, no hash, no counter. The benchmark runs it under
 * BPF_PROG_TEST_RUN next to xdplb and reports every xdplb case as a ratio to
 * this program's cost per packet. Anything else passes unchanged. The IPv6
 * branch sits where IPv4 frames never go, so the IPv4 floor is unchanged.
 *
 * Not part of xdplb: the controller never loads it.
 */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

int bench_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6h;
	struct iphdr *iph;
	__u8 tmp[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		if (eth->h_proto != bpf_htons(ETH_P_IPV6))
			return XDP_PASS;
		ip6h = (void *)(eth + 1);
		if ((void *)(ip6h + 1) > data_end || ip6h->version != 6)
			return XDP_PASS;
		goto swap;
	}
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return XDP_PASS;
	if (iph->version != 4 || iph->ihl < 5)
		return XDP_PASS;
swap:

	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	return XDP_TX;
}
