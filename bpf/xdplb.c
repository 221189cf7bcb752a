/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdplb.c - the XDP fast path, compiled at attach time by bcc.
 *
 * xdplb_ingress: parse -> flow table (established) or match service -> Maglev
 * -> DSR forward. Every path ends at the single `out:` label, which counts the
 * action.
 *
 * Cost: a hash map lookup is several kernel calls, an array lookup is inlined
 * by the verifier, so the hit path does a single hash lookup (the flow
 * table) and checks the flow's service through the service_ids array; the
 * services hash is looked up only for new or re-chosen flows, and neither
 * for a port no service uses (see lb_maps.h for both arrays).
 *
 * What happens to what (counted in not_forwarded / events):
 *   - not IPv4, not TCP/UDP, or not a configured (VIP, port, protocol):
 *     XDP_PASS, byte for byte unchanged (the gateway's SSH, ARP, routing,
 *     and pings to the VIP all go to its own stack);
 *   - Ethernet or IPv4 header truncated or invalid: XDP_PASS unchanged, the
 *     kernel stack validates and drops it (REASON_MALFORMED);
 *   - TCP/UDP IPv4 fragment to a VIP: XDP_DROP (REASON_FRAGMENT). Only the
 *     first fragment carries ports, so fragments cannot be steered
 *     consistently; TCP with path-MTU discovery does not fragment. Other
 *     fragments to a VIP (ICMP: a large ping) and all fragments to other
 *     addresses pass to the stack, which reassembles them;
 *   - ICMP "fragmentation needed" to a VIP about a reply of one of its flows:
 *     XDP_TX to the flow's backend (EVENT_ICMP_TOO_BIG), so path-MTU
 *     discovery works with DSR; any other ICMP passes (handle_icmp.h);
 *   - TCP/UDP to a VIP with a truncated L4 header: XDP_DROP (REASON_MALFORMED);
 *   - IPv4 options: forwarded as usual (DSR leaves the IP header alone),
 *     counted as EVENT_IP_OPTIONS;
 *   - service with no backend in its table (slot 0): XDP_PASS to the gateway's
 *     own stack, which holds the VIP and answers TCP with a RST and UDP with
 *     ICMP port unreachable, so clients fail fast instead of hanging; or
 *     XDP_DROP where the pool says no_backend = "drop" (REASON_NO_BACKEND);
 *   - otherwise XDP_TX to the flow's backend.
 */
#include "lb_maps.h"
#include "parsing_helpers.h"
#include "flow_hash.h"
#include "forward.h"
#include "stats.h"

/* A backend id from the flow table or a Maglev slot is usable only while the
 * backend is up and still belongs to the service (ids are per service). */
static __always_inline struct backend_info *live_backend(__u32 id, __u32 service_id)
{
	struct backend_info *be;

	if (id == 0 || id >= MAX_BACKENDS)
		return NULL;
	be = backends.lookup(&id);
	if (!be || !(be->flags & F_BACKEND_UP) || be->service_id != service_id)
		return NULL;
	return be;
}

/* Maglev lookup in the service's live table. Returns the backend id, 0 when
 * the slot is empty (no healthy backend). */
static __always_inline __u32 maglev_pick(const struct service_info *svc, __u32 hash)
{
	__u32 idx = svc->id * TABLES_PER_SERVICE + (svc->table & 1);
	struct maglev_table *table = maglev_tables.lookup(&idx);
	__u32 slot = hash % MAGLEV_SIZE;

	if (!table)
		return 0;
	/* The verifier does not derive a range from a modulo, and clang drops a
	 * plain re-check as redundant; the empty asm hides what clang knows so
	 * the bounds check stays in the bytecode for the verifier to see. */
	asm volatile("" : "+r"(slot));
	if (slot >= MAGLEV_SIZE)
		return 0;
	return table->slots[slot];
}

/* Whether any service uses this destination port (service_ports in lb_maps.h). */
static __always_inline int port_in_use(__be16 dport)
{
	__u32 port = bpf_ntohs(dport);
	__u32 word = port / 32;
	__u32 *bits = service_ports.lookup(&word);

	return bits && (*bits & (1U << (port % 32)));
}

/* Whether service id `sid` serves (daddr, dport, proto) now (service_ids in lb_maps.h). */
static __always_inline int service_serves(__u32 sid, __be32 daddr, __be16 dport, __u8 proto)
{
	struct service_key *ref = service_ids.lookup(&sid);

	return ref && ref->vip == daddr && ref->port == dport && ref->proto == proto;
}

static __always_inline int is_vip(__be32 daddr)
{
	struct lb_addr key = {};

	key.v4 = daddr;
	return vips.lookup(&key) != NULL;
}

#include "handle_icmp.h"

int xdplb_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	__u64 frame_len = data_end - data;
	struct service_key skey = {};
	struct flow_key fkey = {};
	struct flow_value fval = {};
	struct lb_vlan_hdr *vlh;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct tcphdr *tcph;
	struct udphdr *udph;
	struct service_info *svc;
	struct backend_info *be = NULL;
	struct lb_config *cfg;
	struct flow_value *fv;
	__u32 action = XDP_PASS;
	__u32 zero = 0, sid, bid, hash;
	__be16 sport, dport;
	int new_flow = 0;
	int proto;

	proto = parse_ethhdr(&nh, data_end, &eth);
	if (proto < 0) {
		count_reason(REASON_MALFORMED);
		goto out;
	}
	if (is_vlan_proto(proto)) {
		proto = parse_vlanhdr(&nh, data_end, &vlh);
		if (proto < 0) {
			count_reason(REASON_MALFORMED);
			goto out;
		}
		count_event(EVENT_VLAN);
	}
	if (proto != bpf_htons(ETH_P_IP)) {
		count_reason(REASON_NOT_SERVICE);
		goto out;
	}
	proto = parse_iphdr(&nh, data_end, &iph);
	if (proto < 0) {
		count_reason(REASON_MALFORMED);
		goto out;
	}
	if (ipv4_is_fragment(iph)) {
		if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) && is_vip(iph->daddr)) {
			count_reason(REASON_FRAGMENT);
			action = XDP_DROP;
		} else {
			count_reason(REASON_NOT_SERVICE);
		}
		goto out;
	}
	if (iph->ihl > 5)
		count_event(EVENT_IP_OPTIONS);

	if (proto == IPPROTO_TCP) {
		if (parse_tcphdr(&nh, data_end, &tcph) < 0)
			goto truncated_l4;
		sport = tcph->source;
		dport = tcph->dest;
	} else if (proto == IPPROTO_UDP) {
		if (parse_udphdr(&nh, data_end, &udph) < 0)
			goto truncated_l4;
		sport = udph->source;
		dport = udph->dest;
	} else if (proto == IPPROTO_ICMP) {
		action = handle_icmp_v4(&nh, data_end, eth, iph);
		goto out;
	} else {
		count_reason(REASON_NOT_SERVICE);
		goto out;
	}

	if (!port_in_use(dport)) {
		count_reason(REASON_NOT_SERVICE);
		goto out;
	}

	fkey.src = iph->saddr;
	fkey.dst = iph->daddr;
	fkey.sport = sport;
	fkey.dport = dport;
	fkey.proto = proto;
	fv = flows.lookup(&fkey);
	/* Established fast path: the flow's service still serves this packet's
	 * (VIP, port, protocol), which is what the services lookup below would
	 * tell, and its backend is live. Anything else takes the full path.
	 * The entry's service id is read once: an LRU entry can be recycled for
	 * another flow by another CPU while this one reads it, and the id that
	 * was checked must be the id used (live_backend then ties the backend
	 * to it). The volatile read stops clang from loading it again. */
	if (fv)
		sid = *(volatile __u32 *)&fv->service_id;
	if (fv && service_serves(sid, iph->daddr, dport, proto)) {
		cfg = lb_config.lookup(&zero);
		if (!cfg || !cfg->ready) {
			count_reason(REASON_NO_CONFIG);
			goto out;
		}
		bid = fv->backend_id;
		be = live_backend(bid, sid);
		if (be) {
			count_event(EVENT_FLOW_HIT);
			goto forward;
		}
	}

	skey.vip = iph->daddr;
	skey.port = dport;
	skey.proto = proto;
	svc = services.lookup(&skey);
	if (!svc) {
		count_reason(REASON_NOT_SERVICE);
		goto out;
	}
	cfg = lb_config.lookup(&zero);
	if (!cfg || !cfg->ready) {
		count_reason(REASON_NO_CONFIG);
		goto out;
	}
	sid = svc->id;

	if (fv) {
		bid = fv->backend_id;
		be = live_backend(bid, sid);
		count_event(be ? EVENT_FLOW_HIT : EVENT_FLOW_RESELECT);
	} else {
		count_event(EVENT_FLOW_NEW);
	}

	if (!be) {
		if (svc->flags & F_SVC_CLIENT_PERSIST)
			hash = client_hash_v4(cfg->hash_seed, iph->saddr);
		else
			hash = flow_hash_v4(cfg->hash_seed, iph->saddr, iph->daddr,
					    sport, dport, proto);
		bid = maglev_pick(svc, hash);
		if (bid == 0) {
			count_reason(REASON_NO_BACKEND);
			action = (cfg->flags & F_CFG_NO_BACKEND_DROP) ? XDP_DROP : XDP_PASS;
			goto out;
		}
		be = live_backend(bid, sid);
		if (!be) {
			count_reason(REASON_BACKEND_GONE);
			action = XDP_DROP;
			goto out;
		}
		fval.backend_id = bid;
		fval.service_id = sid;
		flows.update(&fkey, &fval);
		new_flow = 1;
	}

forward:
	count_traffic(service_stats.lookup(&sid), frame_len, new_flow);
	count_traffic(backend_stats.lookup(&bid), frame_len, new_flow);
	dsr_rewrite(eth, be, cfg);
	action = XDP_TX;
	goto out;

truncated_l4:
	if (is_vip(iph->daddr)) {
		count_reason(REASON_MALFORMED);
		action = XDP_DROP;
	} else {
		count_reason(REASON_NOT_SERVICE);
	}
out:
	return record_action(action);
}
