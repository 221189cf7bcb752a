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

/* ---- IPv6 (the same mixing over the 16-byte addresses, word by word) ---- */

static __always_inline __u32 hash_words4(__u32 h, const __be32 *w)
{
	h = hash_word(h, w[0]);
	h = hash_word(h, w[1]);
	h = hash_word(h, w[2]);
	return hash_word(h, w[3]);
}

/* persistence = flow, IPv6. */
static __always_inline __u32 flow_hash_v6(__u32 seed, const __be32 *saddr, const __be32 *daddr,
					  __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = seed;

	h = hash_words4(h, saddr);
	h = hash_words4(h, daddr);
	h = hash_word(h, (__u32)sport | ((__u32)dport << 16));
	h = hash_word(h, proto);
	return fmix32(h);
}

/* Word `i` (0-3) of an IPv6 address kept to its first `prefix` bits. */
static __always_inline __u32 prefix_word(__be32 w, int i, __u32 prefix)
{
	int bits = (int)prefix - 32 * i;

	if (bits >= 32)
		return w;
	if (bits <= 0)
		return 0;
	return w & bpf_htonl(0xffffffffU << (32 - bits));
}

/* persistence = client, IPv6: the client address kept to its first
 * `prefix` bits (1..128), so a client whose privacy addresses change the
 * interface identifier stays on its backend. */
static __always_inline __u32 client_hash_v6(__u32 seed, const __be32 *saddr, __u32 prefix)
{
	__u32 h = seed;

	h = hash_word(h, prefix_word(saddr[0], 0, prefix));
	h = hash_word(h, prefix_word(saddr[1], 1, prefix));
	h = hash_word(h, prefix_word(saddr[2], 2, prefix));
	h = hash_word(h, prefix_word(saddr[3], 3, prefix));
	return fmix32(h);
}

#endif /* XDPLB_FLOW_HASH_H */
