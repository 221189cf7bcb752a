/* SPDX-License-Identifier: GPL-2.0 */
/*
 * flow_hash.h - the hash that picks a Maglev slot for a new flow.
 *
 * xdplb/flowhash.py computes the same function so tests and `xdplb simulate`
 * can say which backend a flow goes to; change both together. Each 32-bit
 * word is the packet's bytes loaded in the CPU's native order (what a __u32
 * load of network-order data gives), mixed with the murmur3 finalizer.
 */
#ifndef XDPLB_FLOW_HASH_H
#define XDPLB_FLOW_HASH_H

#include <linux/types.h>

static __always_inline __u32 fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 hash_word(__u32 h, __u32 w)
{
	return fmix32(h ^ w) + 0x9e3779b9;
}

/* persistence = flow: source, destination, both ports and the protocol. */
static __always_inline __u32 flow_hash_v4(__u32 seed, __be32 saddr, __be32 daddr,
					  __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = seed;

	h = hash_word(h, saddr);
	h = hash_word(h, daddr);
	h = hash_word(h, (__u32)sport | ((__u32)dport << 16));
	h = hash_word(h, proto);
	return fmix32(h);
}

/* persistence = client: the source address only, so every connection from
 * one modality or workstation lands on the same backend. */
static __always_inline __u32 client_hash_v4(__u32 seed, __be32 saddr)
{
	return fmix32(hash_word(seed, saddr));
}

#endif /* XDPLB_FLOW_HASH_H */
