/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdplb.c - the XDP fast path, compiled at attach time by bcc.
 *
 * xdplb_ingress runs four named steps, each an inline function that either
 * decides (counts why and returns the XDP action) or hands on to the next:
 *   1. parse_l2 / parse_l3 / parse_l4: Ethernet, IPv4, TCP/UDP ports, into a
 *      struct packet (EtherType and L4 protocol kept apart);
 *   2. connection_table_lookup: the established fast path;
 *   3. pick_backend: the services lookup, then the flow's backend if still
 *      live, or Maglev (place_new_flow);
 *   4. forward: counters and the DSR rewrite.
 * Every packet leaves through record_action, which counts the action.
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
 *   - IPv4 fragment to a VIP: XDP_DROP (REASON_FRAGMENT). Only the first
 *     fragment carries ports, so fragments cannot be steered consistently;
 *     TCP with path-MTU discovery does not fragment. Fragments to other
 *     addresses pass;
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
#include "race_window.h"
#include "forward.h"
#include "stats.h"

/* A step returns CONTINUE when the next step decides, FORWARD when the packet
 * has its backend, or the final XDP action (after counting why). */
#define CONTINUE (-1)
#define FORWARD (-2)

/* What the parse steps learned about a packet. */
struct packet {
	struct ethhdr *eth;    /* for the MAC rewrite (and a check of h_dest) */
	struct iphdr *iph;     /* set once parse_l3 accepted the IPv4 header */
	__u64 frame_len;       /* bytes, for the traffic counters */
	__be16 eth_proto;      /* network order: EtherType after at most one VLAN tag */
	__u8 l4_proto;         /* IPPROTO_* of the IPv4 header */
	__u8 tcp_flags;        /* TCP_FLAGS_* of a TCP segment (byte 13 of its header), 0 otherwise */
	struct flow_key flow;  /* the 5-tuple, as the flow table keys it (pad zero) */
};

/* A service_ref as one 64-bit word: read in one load (lb_maps.h, rule 5). */
union service_ref_word {
	struct service_ref ref;
	__u64 word;
};

/* A flow_value as one 64-bit word: read in one load (lb_maps.h, rule 5). */
union flow_value_word {
	struct flow_value value;
	__u64 word;
};

/* Where the packet goes, as the flow and backend steps find out. */
struct dest {
	struct lb_config *cfg;
	union flow_value_word flow; /* the flow's entry as read, when has_flow */
	int has_flow;             /* 1 when the flow table has an entry for the packet */
	struct backend_info *be;  /* the backend chosen (FORWARD) */
	__u32 sid;                /* service id: index of the service counters */
	__u32 bid;                /* backend id: index of the backend counters */
	int new_flow;             /* 1 when Maglev chose the backend for this packet */
};

/* Byte 13 of a TCP header holds its flags: CWR ECE URG ACK PSH RST SYN FIN. */
#define TCP_FLAGS_OFFSET 13
#define TCP_FLAGS_FIN 0x01
#define TCP_FLAGS_SYN 0x02
#define TCP_FLAGS_RST 0x04
#define TCP_FLAGS_ACK 0x10


/* A backend id from the flow table or a Maglev slot is usable only while the
 * backend is published, up, and still belongs to the service (ids are per
 * service). Its flags are read once: READY and UP are checked together. */
static __always_inline struct backend_info *live_backend(__u32 id, __u32 service_id)
{
	const __u8 need = F_BACKEND_UP | F_BACKEND_READY;
	struct backend_info *be;

	if (id == 0 || id >= MAX_BACKENDS)
		return NULL;
	be = backends.lookup(&id);
	if (!be || (*(volatile __u8 *)&be->flags & need) != need || be->service_id != service_id)
		return NULL;
	return be;
}

/* Whether backend `id` of the service is up but unpublished: the controller
 * is rewriting it (a new MAC, lb_maps.h rule 1) for a few milliseconds. Its
 * fields may be torn and are used only to decide to hold its flows (drop:
 * TCP resends) rather than move them to another backend. */
static __always_inline int backend_busy(__u32 id, __u32 service_id)
{
	struct backend_info *be;

	if (id == 0 || id >= MAX_BACKENDS)
		return 0;
	be = backends.lookup(&id);
	return be && (*(volatile __u8 *)&be->flags & (F_BACKEND_UP | F_BACKEND_READY)) == F_BACKEND_UP &&
	       be->service_id == service_id;
}

/* Maglev lookup in the live table named by the service's state. Returns
 * the backend id, 0 when the slot is empty (no healthy backend). */
static __always_inline __u32 maglev_pick(__u32 sid, __u8 state, __u32 hash)
{
	__u32 idx = sid * TABLES_PER_SERVICE + ((state & SVC_STATE_HALF) ? 1 : 0);
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

/* Whether service id `sid` serves the packet's (VIP, port, protocol) now
 * (service_ids in lb_maps.h): one 64-bit load of its service_ref, compared
 * without the state byte, which is returned in *state. */
static __always_inline int service_serves(__u32 sid, const struct flow_key *flow, __u8 *state)
{
	union service_ref_word want = {}, mask = {}, got;
	union service_ref_word *ref;

	if (sid >= MAX_SERVICES)
		return 0;
	ref = (union service_ref_word *)service_ids.lookup(&sid);
	if (!ref)
		return 0;
	got.word = *(volatile __u64 *)&ref->word;
	want.ref.vip = flow->dst;
	want.ref.port = flow->dport;
	want.ref.proto = flow->proto;
	mask.ref.vip = 0xffffffff;
	mask.ref.port = 0xffff;
	mask.ref.proto = 0xff;
	*state = got.ref.state;
	return (got.word & mask.word) == want.word;
}

static __always_inline int is_vip(__be32 daddr)
{
	struct lb_addr key = {};

	key.v4 = daddr;
	return vips.lookup(&key) != NULL;
}

/* lb_config once the controller has written it, else NULL. */
static __always_inline struct lb_config *ready_config(void)
{
	__u32 zero = 0;
	struct lb_config *cfg = lb_config.lookup(&zero);

	return cfg && cfg->ready ? cfg : NULL;
}

/* Step 1a, Ethernet and at most one VLAN tag. */
static __always_inline int parse_l2(struct hdr_cursor *nh, void *data_end, struct packet *pkt)
{
	struct lb_vlan_hdr *vlh;
	int eth_proto;

	eth_proto = parse_ethhdr(nh, data_end, &pkt->eth);
	if (eth_proto < 0)
		return counted(REASON_MALFORMED, XDP_PASS);
	if (is_vlan_proto(eth_proto)) {
		eth_proto = parse_vlanhdr(nh, data_end, &vlh);
		if (eth_proto < 0)
			return counted(REASON_MALFORMED, XDP_PASS);
		count_event(EVENT_VLAN);
	}
	pkt->eth_proto = eth_proto;
	return CONTINUE;
}

/* Step 1b, IPv4: anything else passes; fragments to a VIP are dropped. */
static __always_inline int parse_l3(struct hdr_cursor *nh, void *data_end, struct packet *pkt)
{
	struct iphdr *iph;
	int l4_proto;

	if (pkt->eth_proto != bpf_htons(ETH_P_IP))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	l4_proto = parse_iphdr(nh, data_end, &iph);
	if (l4_proto < 0)
		return counted(REASON_MALFORMED, XDP_PASS);
	if (ipv4_is_fragment(iph)) {
		if (is_vip(iph->daddr))
			return counted(REASON_FRAGMENT, XDP_DROP);
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	}
	if (iph->ihl > 5)
		count_event(EVENT_IP_OPTIONS);
	pkt->iph = iph;
	pkt->l4_proto = l4_proto;
	pkt->flow.src = iph->saddr;
	pkt->flow.dst = iph->daddr;
	pkt->flow.proto = l4_proto;
	return CONTINUE;
}

/* A TCP/UDP header cut short: dropped when it is addressed to a VIP. */
static __always_inline int truncated_l4(const struct packet *pkt)
{
	if (is_vip(pkt->flow.dst))
		return counted(REASON_MALFORMED, XDP_DROP);
	return counted(REASON_NOT_SERVICE, XDP_PASS);
}

/* Step 1c, TCP or UDP ports (and TCP flags); only ports some service uses go on. */
static __always_inline int parse_l4(struct hdr_cursor *nh, void *data_end, struct packet *pkt)
{
	struct tcphdr *tcph;
	struct udphdr *udph;

	if (pkt->l4_proto == IPPROTO_TCP) {
		if (parse_tcphdr(nh, data_end, &tcph) < 0)
			return truncated_l4(pkt);
		pkt->flow.sport = tcph->source;
		pkt->flow.dport = tcph->dest;
		pkt->tcp_flags = ((__u8 *)tcph)[TCP_FLAGS_OFFSET];
	} else if (pkt->l4_proto == IPPROTO_UDP) {
		if (parse_udphdr(nh, data_end, &udph) < 0)
			return truncated_l4(pkt);
		pkt->flow.sport = udph->source;
		pkt->flow.dport = udph->dest;
	} else {
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	}
	if (!port_in_use(pkt->flow.dport))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	return CONTINUE;
}

/*
 * Step 2, the established fast path: the flow's entry names a service that
 * still serves this packet's (VIP, port, protocol), which is what the
 * services lookup would tell, and a live backend. FORWARD then; CONTINUE
 * (with the entry as read kept for the next step) when anything is missing.
 * The entry is read in one 64-bit load: an LRU entry can be recycled for
 * another flow by another CPU while this one reads it, so both ids come from
 * one version, and the ids that were checked are the ids used (lb_maps.h,
 * rule 5). The volatile read stops clang from loading it again.
 */
static __always_inline int connection_table_lookup(struct packet *pkt, struct dest *dst)
{
	union flow_value_word *fv;
	__u8 state;

	fv = (union flow_value_word *)flows.lookup(&pkt->flow);
	if (!fv)
		return CONTINUE;
	dst->has_flow = 1;
	dst->flow.word = *(volatile __u64 *)&fv->word;
	race_window();
	if (!service_serves(dst->flow.value.service_id, &pkt->flow, &state))
		return CONTINUE;
	dst->cfg = ready_config();
	if (!dst->cfg)
		return counted(REASON_NO_CONFIG, XDP_PASS);
	dst->bid = dst->flow.value.backend_id;
	dst->be = live_backend(dst->bid, dst->flow.value.service_id);
	if (!dst->be)
		return CONTINUE;
	dst->sid = dst->flow.value.service_id;
	count_event(EVENT_FLOW_HIT);
	return FORWARD;
}

/* Maglev places the flow in the service's live table and the flow table
 * remembers it. */
static __always_inline int place_new_flow(struct packet *pkt, __u8 state, struct dest *dst)
{
	struct flow_value fval = {};
	__u32 hash;

	if (state & F_SVC_CLIENT_PERSIST)
		hash = client_hash_v4(dst->cfg->hash_seed, pkt->flow.src);
	else
		hash = flow_hash_v4(dst->cfg->hash_seed, pkt->flow.src, pkt->flow.dst,
				    pkt->flow.sport, pkt->flow.dport, pkt->flow.proto);
	dst->bid = maglev_pick(dst->sid, state, hash);
	if (dst->bid == 0)
		return counted(REASON_NO_BACKEND,
			       (dst->cfg->flags & F_CFG_NO_BACKEND_DROP) ? XDP_DROP : XDP_PASS);
	dst->be = live_backend(dst->bid, dst->sid);
	if (!dst->be)
		return counted(REASON_BACKEND_GONE, XDP_DROP);
	fval.backend_id = dst->bid;
	fval.service_id = dst->sid;
	flows.update(&pkt->flow, &fval);
	dst->new_flow = 1;
	return FORWARD;
}

/* The service id the packet's (VIP, port, protocol) has, from the services
 * hash, confirmed in service_ids (lb_maps.h, rule 5), with its state. A
 * services element replaced while this packet read it can hold another
 * key's id and fail the check; the lookup is then made once more. */
static __always_inline int find_service(const struct packet *pkt, __u32 *sid, __u8 *state)
{
	struct service_key skey = {};
	struct service_info *svc;

	skey.vip = pkt->flow.dst;
	skey.port = pkt->flow.dport;
	skey.proto = pkt->flow.proto;
	for (int attempt = 0; attempt < 2; attempt++) {
		svc = services.lookup(&skey);
		if (!svc)
			return 0;
		race_window();
		*sid = *(volatile __u32 *)&svc->id;
		race_window();
		if (service_serves(*sid, &pkt->flow, state))
			return 1;
	}
	return 0;
}

/* Step 3, a new or re-chosen flow: the services lookup names the service;
 * a flow entry whose backend is still live keeps it, otherwise Maglev
 * places the flow. */
static __always_inline int pick_backend(struct packet *pkt, struct dest *dst)
{
	__u8 state = 0;

	if (!find_service(pkt, &dst->sid, &state))
		return counted(REASON_NOT_SERVICE, XDP_PASS);
	dst->cfg = ready_config();
	if (!dst->cfg)
		return counted(REASON_NO_CONFIG, XDP_PASS);

	if (dst->has_flow) {
		dst->bid = dst->flow.value.backend_id;
		dst->be = live_backend(dst->bid, dst->sid);
		if (dst->be) {
			count_event(EVENT_FLOW_HIT);
			return FORWARD;
		}
		if (backend_busy(dst->bid, dst->sid))
			return counted(REASON_BACKEND_GONE, XDP_DROP);
		count_event(EVENT_FLOW_RESELECT);
	} else {
		count_event(EVENT_FLOW_NEW);
	}
	return place_new_flow(pkt, state, dst);
}

/* Step 4, count the traffic and send the frame to its backend. */
static __always_inline int forward(const struct packet *pkt, const struct dest *dst)
{
	count_traffic(service_stats.lookup((__u32 *)&dst->sid), pkt->frame_len, dst->new_flow);
	count_traffic(backend_stats.lookup((__u32 *)&dst->bid), pkt->frame_len, dst->new_flow);
	race_window();
	dsr_rewrite(pkt->eth, dst->be, dst->cfg);
	return XDP_TX;
}

int xdplb_ingress(struct xdp_md *ctx)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = (void *)(long)ctx->data };
	struct packet pkt = {};
	struct dest dst = {};
	int action;

	pkt.frame_len = data_end - nh.pos;
	action = parse_l2(&nh, data_end, &pkt);
	/* Here pkt.eth is parsed: the place for a check of the destination MAC. */
	if (action == CONTINUE)
		action = parse_l3(&nh, data_end, &pkt);
	/* Here the IPv4 header is parsed, L4 not yet: the place for ICMP to a VIP
	 * (pkt.l4_proto == IPPROTO_ICMP, pkt.flow.dst the VIP). */
	if (action == CONTINUE)
		action = parse_l4(&nh, data_end, &pkt);
	if (action == CONTINUE)
		action = connection_table_lookup(&pkt, &dst);
	if (action == CONTINUE)
		action = pick_backend(&pkt, &dst);
	if (action == FORWARD)
		action = forward(&pkt, &dst);
	return record_action(action);
}
