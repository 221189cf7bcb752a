/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The maps exactly as main up to 440b3ed declared and pinned them (the
 * headers beside this file are that commit's), before the layout map and
 * with BPF_F_NO_COMMON_LRU on the flow table. tests/packet/test_pinning.py
 * loads this to stand in for an installed older version on upgrade.
 */
#include "lb_maps.h"

int xdplb_ingress(struct xdp_md *ctx)
{
	return XDP_PASS;
}
