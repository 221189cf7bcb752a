/* SPDX-License-Identifier: GPL-2.0 */
/*
 * stats.h - per-CPU counter helpers.
 *
 * Every counter map is per-CPU, so a plain increment is enough: no other CPU
 * writes the same memory, and XDP runs with preemption disabled. The
 * controller sums the CPUs when it reads.
 */
#ifndef XDPLB_STATS_H
#define XDPLB_STATS_H

#include "lb_maps.h"

static __always_inline void count_u64(void *map_lookup_result)
{
	__u64 *cnt = map_lookup_result;

	if (cnt)
		*cnt += 1;
}

static __always_inline void count_reason(__u32 reason)
{
	count_u64(not_forwarded.lookup(&reason));
}

/* Count why a packet was not forwarded and return the action it gets. */
static __always_inline int counted(__u32 reason, int action)
{
	count_reason(reason);
	return action;
}

static __always_inline void count_event(__u32 event)
{
	count_u64(events.lookup(&event));
}

static __always_inline void count_traffic(struct lb_counters *c, __u64 bytes,
					  int new_flow)
{
	if (!c)
		return;
	c->packets += 1;
	c->bytes += bytes;
	if (new_flow)
		c->new_flows += 1;
}

/* Count the action and return it: the program's single exit goes through here. */
static __always_inline int record_action(__u32 action)
{
	if (action < ACTION_MAX)
		count_u64(xdp_actions.lookup(&action));
	return action;
}

#endif /* XDPLB_STATS_H */
