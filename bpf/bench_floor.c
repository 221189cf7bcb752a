/* SPDX-License-Identifier: GPL-2.0 */
/*
 * bench_floor.c - the floor of the data-plane benchmark (tools/bench).
 *
 * The least an XDP forwarder can do: parse Ethernet and IPv4, swap the two
 * MAC addresses and send the frame back out (XDP_TX). No map, no hash, no
 * counter. The benchmark runs it under BPF_PROG_TEST_RUN next to xdplb and
 * reports every xdplb case as a ratio to this program's cost per packet.
 * Anything that is not a valid IPv4 frame passes unchanged.
 *
 * Not part of xdplb: the controller never loads it.
 */
#include <linux/if_ether.h>
#include <linux/ip.h>

int bench_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	__u8 tmp[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return XDP_PASS;
	if (iph->version != 4 || iph->ihl < 5)
		return XDP_PASS;

	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	return XDP_TX;
}
