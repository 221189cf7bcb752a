/* SPDX-License-Identifier: GPL-2.0 */
/*
 * forward.h - direct server return on the same L2 segment.
 *
 * The IP packet is not touched: the backend holds the VIP on its loopback and
 * answers the client directly. Only the Ethernet addresses change, so no
 * checksum needs fixing and a VLAN tag, if any, stays as it was.
 */
#ifndef XDPLB_FORWARD_H
#define XDPLB_FORWARD_H

#include <linux/if_ether.h>
#include "lb_structs.h"
#include "race_window.h"

static __always_inline void copy_mac(__u8 *dst, const __u8 *src)
{
	/* Six single-byte stores: the verifier and every architecture accept
	 * them whatever the alignment of the Ethernet header. */
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	race_window();          /* test builds only: a MAC copied in two halves far apart */
	dst[3] = src[3];
	dst[4] = src[4];
	dst[5] = src[5];
}

/* Rewrite the frame towards the backend; the caller returns XDP_TX. */
static __always_inline void dsr_rewrite(struct ethhdr *eth,
					const struct backend_info *be,
					const struct lb_config *cfg)
{
	copy_mac(eth->h_dest, be->mac);
	copy_mac(eth->h_source, cfg->mac);
}

#endif /* XDPLB_FORWARD_H */
