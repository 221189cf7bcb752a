/* SPDX-License-Identifier: GPL-2.0 */
/*
 * race_window.h - a delay compiled into test builds only.
 *
 * tests/packet/test_flip_stress.py defines XDPLB_RACE_DELAY to hold each
 * packet between a read and the reads that depend on it (XDPLB_RACE_DELAY
 * clock reads, some tens of nanoseconds each), so races with the controller
 * that last tens of nanoseconds in a real build happen often enough to
 * count. A fixed count, not a deadline: one path for the verifier (bcc
 * cannot hand bpf_loop a callback). Without the define, race_window() is
 * nothing.
 */
#ifndef XDPLB_RACE_WINDOW_H
#define XDPLB_RACE_WINDOW_H

#ifdef XDPLB_RACE_DELAY
static __always_inline void race_window(void)
{
	__u64 sink = 0;

	for (int i = 0; i < XDPLB_RACE_DELAY; i++)
		sink += bpf_ktime_get_ns();
	asm volatile("" : : "r"(sink));
}
/* The widened build has no IPv6 program (xdplb.c, XDPLB_IPV6_PATH): its
 * delay loops take the verifier past its million instructions in the IPv6
 * program's steps. The stress test runs IPv4 services. */
#ifndef XDPLB_IPV6_PATH
#define XDPLB_IPV6_PATH 0
#endif
#else
#define race_window() do { } while (0)
#endif

#endif /* XDPLB_RACE_WINDOW_H */
