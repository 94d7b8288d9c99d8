//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * nsflow TC programs: count every packet per observation point
 * (network namespace, interface, direction) and per flow.
 *
 * Two kinds of programs:
 *
 * - a stub per hook (interface x direction), nsflow_stub_ingress/egress: a
 *   template of a few instructions whose totals slot is a constant that
 *   user space patches in before each load (SLOT_TEMPLATE). Counting into a
 *   per-CPU array at a constant index is the cheapest exact counter there
 *   is: no hash, no key, no device or namespace lookup. Verifying such a
 *   program takes microseconds, so an attachment costs an attach and a tiny
 *   load, never a load of the parser.
 * - the parser, loaded once and shared by every hook, nsflow_ingress/egress:
 *   the stubs tail-call it (through account_progs) when it is needed: with
 *   per-flow accounting, and for GSO sk_buffs, which may stand for several
 *   packets on the wire (tx_segments, rx_segments). It learns the slot and
 *   the hook's link layer from the stub, through the packet's cb (handoff).
 *   A flow is keyed by the slot: the slot names the observation point
 *   (namespace, interface, direction), user space knows which. No program
 *   reads the packet's device or namespace to attribute it, and none needs a
 *   kfunc: they load on Linux 6.1.
 *
 * The programs never change a verdict: they always return TC_NEXT (TCX_NEXT
 * == TC_ACT_UNSPEC == -1), so the next program on the hook, or the kernel's
 * default, decides.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "kernel.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Both TCX_NEXT (not in Debian's UAPI headers yet) and TC_ACT_UNSPEC. */
#define TC_NEXT -1

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

/* Constants user space shares with the programs (bpf2go -type consts
 * generates them in Go: NsflowConstsSLOT_TEMPLATE, ...). */
enum consts {
	/* The stub's totals slot: an immediate that user space replaces in
	 * each copy of the stub before loading it (as Cilium templates its
	 * programs). */
	SLOT_TEMPLATE = 0x5107a11d,
	/* The stub's link layer (enum link), patched like the slot. */
	LINK_TEMPLATE = 0x11fe7a11,
	/* cb[1] of a hand-off: cb[0] ^ HANDOFF_MAGIC (handoff below). */
	HANDOFF_MAGIC = 0x4e5f4c57,
	/* The highest slot a flow key can name (flow_key.slot is 16 bits):
	 * user space never has more points. */
	MAX_SLOTS = 65536,
	/* How many IPv6 extension headers the parser walks before the
	 * transport header; a frame with more keeps its flow, without ports. */
	IPV6_MAX_EXT_HEADERS = 6,
};

/* What a hook's frames start with. */
enum link {
	LINK_NONE = 0,  /* the network header (tun, wireguard, ip tunnels) */
	LINK_ETHER = 1, /* an Ethernet header (veth, bridges, lo, ...) */
};

enum direction {
	DIR_RX = 0, /* ingress hook: the namespace receives */
	DIR_TX = 1, /* egress hook: the namespace sends */
};

/* An observation point: what one slot of totals counts (points map). */
struct obs_key {
	__u32 netns;   /* inode of the network namespace */
	__u32 ifindex; /* interface index inside that namespace */
	__u8 dir;      /* enum direction */
	__u8 pad[3];
};

struct counters {
	__u64 packets;
	__u64 bytes; /* skb->len at the hook: the L2 frame, Ethernet header included */
};

/* A flow as seen at one observation point: the slot of totals that names
 * the point (user space maps it to namespace, interface and direction).
 * 40 bytes. Ports are in host byte order; for ICMP and ICMPv6 they carry
 * the message type and code. */
struct flow_key {
	__u16 slot;
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* IPPROTO_* of the transport header (after IPv6 extensions) */
	__u16 sport;
	__u16 dport;
	__u8 saddr[16]; /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
};

/* 48 bytes. */
struct flow_val {
	__u64 packets;
	__u64 bytes;
	__u64 first_ns; /* CLOCK_MONOTONIC_COARSE */
	__u64 last_ns;
	/* The cgroup (v2 id: the inode of its directory) of the flow's socket
	 * in this namespace, 0 unknown. At egress (attribution) the sending
	 * socket's (bpf_skb_cgroup_id), written at the flow's insert, or at a
	 * later packet while it is still 0 (the first packets of a flow may
	 * carry no socket); at ingress (sk_lookup) the receiving socket's,
	 * looked up at the flow's first packet only (socket_cgroup). */
	__u64 cgroup;
	__u8 tcp_flags; /* OR of the TCP flags seen */
	__u8 pad[7];
};

/* A key of the containers map: an observation point's slot and a cgroup
 * (0: no socket, or unknown). */
struct container_key {
	__u64 cgroup;
	__u32 slot;
	__u32 pad;
};

/* Per-CPU event counters, indexed by enum stat. */
enum stat {
	STAT_TOTALS_FULL = 0, /* packets no slot of totals could take (the parser ran without a stub) */
	STAT_FLOW_NEW = 1,    /* flows created (evictions = created - live - deleted) */
	STAT_FLOW_ERR = 2,    /* a new flow could not be inserted */
	STAT_NON_IP = 3,      /* frames that carry no IPv4/IPv6 (ARP, ...): totals only */
	STAT_TRUNCATED = 4,   /* IP frames too short to parse: totals only */
	STAT_NO_DEV = 5,      /* GSO sk_buffs whose device could not be read: counted as gso_segs */
	STAT_EVENTS_LOST = 6, /* new-flow events dropped: the ring buffer was full */
	STAT_MAX = 7,
};

/* What parse() made of a frame: a complete flow key, or why not (the frame
 * then counts in the totals only, and in the stat parse_stat names). A
 * type of its own, so that no result is mistaken for an index of stats. */
enum parse_result {
	PARSE_FLOW = 0,      /* the flow key is complete */
	PARSE_NON_IP = 1,    /* no IPv4/IPv6 (ARP, ...): STAT_NON_IP */
	PARSE_TRUNCATED = 2, /* an IP frame too short to parse: STAT_TRUNCATED */
	PARSE_NOT_YET = 3,   /* not parsed (yet) */
};

/* A new flow, streamed to user space through the flow_events ring buffer. */
struct flow_event {
	__u64 ts_ns; /* CLOCK_MONOTONIC */
	struct flow_key key;
};

/* Set by the loader before load (CollectionSpec.Variables). */
volatile const __u8 flows_enabled = 1;
volatile const __u8 events_enabled = 0;
/* The lowest NAPI ID (MIN_NAPI_ID is NR_CPUS + 1): the loader sets it to
 * the number of possible CPUs + 1, above any sender_cpu that shares the
 * field at ingress, and at or below every real NAPI ID. */
volatile const __u32 napi_id_min = 0xffffffff;
/* Set on PREEMPT_RT kernels: counters are added atomically (below). */
volatile const __u8 atomic_counts = 0;
/* Per-container attribution (Options.Attribution, SocketLookup,
 * ContainerEntries), all off by default: the loader then loads the parsers
 * without it (account's attr), which never read these. */
volatile const __u8 attribution = 0;        /* egress: the sending socket's cgroup into the flow */
volatile const __u8 sk_lookup = 0;          /* ingress: the receiving socket's cgroup, at a flow's first packet */
volatile const __u8 containers_enabled = 0; /* per (slot, cgroup) counters (containers map) */

/* Exact totals, one slot per observation point, assigned by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct counters);
} totals SEC(".maps");

/* What each slot of totals counts (obs_key; netns 0: free). Only user space
 * reads and writes it; pinned, it survives the process with totals. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct obs_key);
} points SEC(".maps");

/* The parser programs, by direction, for the stubs' tail calls. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} account_progs SEC(".maps");

/* The flows: one value shared by every CPU, updated with atomic adds (not
 * per-CPU: a per-CPU value costs its size once per possible CPU, and the
 * kernel initializes every CPU's copy at each insert, so both the memory
 * and a new flow's cost would grow with the CPU count; docs/BENCHMARKS.md). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flows SEC(".maps");

/* Packets and bytes per observation point and cgroup (containers_enabled,
 * which needs flows_enabled): at egress the sending socket's cgroup, at
 * ingress the flow's (the receiving socket's, with sk_lookup), 0 when
 * unknown or not IP. Every packet the parser counts in totals counts in one
 * entry, so that per slot the entries add up to the slot's totals (until
 * the LRU evicts one). Shared values, atomic adds (as flows). The loader
 * sizes it (Options.ContainerEntries; 1 when off). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1);
	__type(key, struct container_key);
	__type(value, struct counters);
} containers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Force BTF for the types user space decodes (bpf2go -type). */
const enum direction *unused_direction __attribute__((unused));
const enum link *unused_link __attribute__((unused));
const enum stat *unused_stat __attribute__((unused));
const enum parse_result *unused_parse_result __attribute__((unused));
const enum consts *unused_consts __attribute__((unused));
const struct flow_event *unused_flow_event __attribute__((unused));
const struct container_key *unused_container_key __attribute__((unused));

/*
 * add adds to a per-CPU counter. On a standard kernel TC programs run with
 * bottom halves disabled, so nothing else on this CPU touches the value
 * between the load and the store: a plain add is exact. On PREEMPT_RT a TC
 * program runs preemptible (migration disabled only), and a kernel that no
 * longer serializes bottom halves per CPU (the RT softirq lock is optional
 * since 6.18) may run another packet's program on this CPU in between: the
 * loader sets atomic_counts there, and the add is a locked one (on a line
 * no other CPU writes: no contention, a few cycles more).
 */
static __always_inline void add(__u64 *p, __u64 v)
{
	if (atomic_counts)
		__sync_fetch_and_add(p, v);
	else
		*p += v;
}

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		add(v, 1);
}

static __always_inline void count_total(__u32 slot, __u32 packets, __u64 len)
{
	struct counters *c = bpf_map_lookup_elem(&totals, &slot);

	if (!c) {
		stat_inc(STAT_TOTALS_FULL);
		return;
	}
	/* Per-CPU value: no other CPU writes it (add). */
	add(&c->packets, packets);
	add(&c->bytes, len);
}

static __always_inline void emit_flow_event(struct flow_key *key)
{
	struct flow_event *e = bpf_ringbuf_reserve(&flow_events, sizeof(*e), 0);

	if (!e) {
		stat_inc(STAT_EVENTS_LOST);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(&e->key, key, sizeof(*key));
	bpf_ringbuf_submit(e, 0);
}

/*
 * delivered_locally tells whether the stack delivers a packet of flow key,
 * arrived on this hook's device, to this namespace (rather than forwarding
 * it), asking the FIB as the stack's input route does (bpf_fib_lookup, no
 * flags: the namespace's rules and tables). A socket lookup alone cannot
 * tell: a listener on the wildcard address (or an unbound UDP socket)
 * matches any destination, so in a namespace that forwards (a node's host
 * namespace under a routed CNI) a host process on *:8080 would be taken for
 * the receiver of forwarded pod traffic to podIP:8080. NOT_FWDED: a local
 * (or broadcast, multicast) route. FWD_DISABLED: the device does not
 * forward (the kernel checks that before the route: every packet of a pod
 * that does not forward), so the packet is local or dropped. Anything else
 * (a unicast route: forwarded; blackhole, unreachable, ...): not local.
 * tot_len 0: no MTU check (it only tells forwarded packets apart).
 */
static __always_inline int delivered_locally(struct __sk_buff *ctx, struct flow_key *key)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.l4_protocol = key->proto;
	fib.sport = bpf_htons(key->sport);
	fib.dport = bpf_htons(key->dport);
	fib.ifindex = ctx->ifindex; /* an ingress hook: the device it arrived on */
	if (key->family == 4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, key->saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, key->daddr, 4);
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, key->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, key->daddr, 16);
	}
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	return rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

/*
 * socket_cgroup returns the cgroup of the socket in this namespace that
 * receives a packet of flow key (the one the stack will deliver it to: for
 * TCP an established socket, else a listener; for UDP a connected or bound
 * one), 0 when there is none or the protocol has no socket lookup. The
 * socket's cgroup is read through bpf_probe_read_kernel: TC programs have no
 * bpf_sk_cgroup_id (cgroup_skb programs do), and the verifier forbids any
 * arithmetic on the socket pointer the lookup returns, so the pointer is
 * first copied out of the stack as a plain number. A socket bound to a
 * wildcard address receives the packet only if the namespace delivers it
 * to itself (delivered_locally): a forwarded one has no receiving socket
 * here. A helper call (two for a wildcard socket) and four probe reads:
 * done once per flow, at its first packet.
 */
static __always_inline __u64 socket_cgroup(struct __sk_buff *ctx, struct flow_key *key)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;
	__u64 cg = 0, addr = 0;

	if (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP)
		return 0;
	if (key->family == 4) {
		__builtin_memcpy(&t.ipv4.saddr, key->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, key->daddr, 4);
		t.ipv4.sport = bpf_htons(key->sport);
		t.ipv4.dport = bpf_htons(key->dport);
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, key->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, key->daddr, 16);
		t.ipv6.sport = bpf_htons(key->sport);
		t.ipv6.dport = bpf_htons(key->dport);
		size = sizeof(t.ipv6);
	}
	if (key->proto == IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	else if (key->proto == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	else
		return 0;
	if (!sk)
		return 0;
	/* A socket bound to a wildcard address matches any destination: the
	 * packet is its only if the namespace delivers it to itself. One bound
	 * to an address (or connected) has a local address of this namespace:
	 * the packet is for this namespace, no FIB lookup. */
	if ((key->family == 4 ? sk->src_ip4 == 0
			      : (sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] | sk->src_ip6[3]) == 0) &&
	    !delivered_locally(ctx, key)) {
		bpf_sk_release(sk);
		return 0;
	}
	{
		struct bpf_sock *volatile slot = sk;

		bpf_probe_read_kernel(&addr, sizeof(addr), (void *)&slot);
	}
	if (addr)
		cg = BPF_CORE_READ((struct sock *)addr, sk_cgrp_data.cgroup, kn, id);
	bpf_sk_release(sk);
	return cg;
}

/* The cgroup a flow is attributed to at one of its packets (flow_val.cgroup):
 * skb_cg, when not 0, is the packet's, already read. */
static __always_inline __u64 flow_cgroup(struct __sk_buff *ctx, struct flow_key *key, __u8 dir, __u64 skb_cg)
{
	if (dir == DIR_TX)
		return !attribution ? 0 : skb_cg ? skb_cg : bpf_skb_cgroup_id(ctx);
	return sk_lookup ? socket_cgroup(ctx, key) : 0;
}

/* Counts a packet in its flow; returns the flow's cgroup when want_cg (else
 * 0: the flow value's cgroup is not read). attr: the program of the
 * attribution variant (a constant: account). */
static __always_inline __u64 count_flow(struct __sk_buff *ctx, struct flow_key *key, __u32 packets, __u64 len,
					__u8 tcp_flags, __u8 dir, __u64 skb_cg, __u8 want_cg, int attr)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_val *v = bpf_map_lookup_elem(&flows, key);

	if (!v) {
		struct flow_val init = {
			.packets = packets,
			.bytes = len,
			.first_ns = now,
			.last_ns = now,
			.cgroup = attr ? flow_cgroup(ctx, key, dir, skb_cg) : 0,
			.tcp_flags = tcp_flags,
		};
		long err = bpf_map_update_elem(&flows, key, &init, BPF_NOEXIST);

		if (!err) {
			stat_inc(STAT_FLOW_NEW);
			/* Only the CPU whose insert won reports the flow: once. */
			if (events_enabled)
				emit_flow_event(key);
			return init.cgroup;
		}
		/* Another CPU inserted it meanwhile. */
		v = bpf_map_lookup_elem(&flows, key);
		if (!v) {
			stat_inc(STAT_FLOW_ERR);
			return init.cgroup;
		}
	}
	/* Shared by every CPU: the counts are added atomically. The clock
	 * and the flags are written only when they change (a flow's packets
	 * rarely run on two CPUs at the same instant; two CPUs setting
	 * different new flags at once could lose one of them). */
	__sync_fetch_and_add(&v->packets, packets);
	__sync_fetch_and_add(&v->bytes, len);
	if (v->last_ns != now)
		v->last_ns = now;
	if ((v->tcp_flags | tcp_flags) != v->tcp_flags)
		v->tcp_flags |= tcp_flags;
	/* An egress flow whose first packets had no socket (or no cgroup)
	 * takes the first one a later packet has; once set, it is only read. */
	if (attr && dir == DIR_TX && attribution && !v->cgroup) {
		__u64 cg = skb_cg ? skb_cg : bpf_skb_cgroup_id(ctx);

		if (cg)
			v->cgroup = cg;
		return cg;
	}
	return attr && want_cg ? v->cgroup : 0;
}

/* Counts a packet under its observation point and cgroup (containers). */
static __always_inline void count_container(__u32 slot, __u64 cgroup, __u32 packets, __u64 len)
{
	struct container_key k = {
		.cgroup = cgroup,
		.slot = slot,
	};
	struct counters *c = bpf_map_lookup_elem(&containers, &k);

	if (!c) {
		struct counters init = {
			.packets = packets,
			.bytes = len,
		};

		if (!bpf_map_update_elem(&containers, &k, &init, BPF_NOEXIST))
			return;
		/* Another CPU inserted it meanwhile. */
		c = bpf_map_lookup_elem(&containers, &k);
		if (!c)
			return;
	}
	__sync_fetch_and_add(&c->packets, packets);
	__sync_fetch_and_add(&c->bytes, len);
}

/* What the parser learns beyond the flow key. */
struct l4_info {
	__u64 hdr_len;  /* bytes of headers before the transport payload */
	__u16 l3_proto; /* ethertype of the network header (after a VLAN tag), network order */
	__u16 l3_len;   /* bytes of the network header, IPv6 extension headers included */
	__u8 tcp_flags;
	__u8 ip_df;     /* IPv4: the Don't Fragment bit is set */
};

/*
 * Parses the transport header at off. Returns 0 when ports (and TCP flags)
 * were read, -1 when the frame ends too early. Every access is checked against
 * data_end right before it: the verifier rejects any packet read it cannot
 * prove in bounds.
 */
static __always_inline int parse_l4(void *data, void *data_end, __u64 off, struct flow_key *key,
				    struct l4_info *l4i)
{
	__u8 *l4 = data + off;

	l4i->hdr_len = off;
	switch (key->proto) {
	case IPPROTO_TCP:
		/* ports (4), seq (4), ack (4), data offset (1), flags (1) */
		if ((void *)(l4 + 14) > data_end)
			return -1;
		l4i->tcp_flags = l4[13];
		l4i->hdr_len = off + (l4[12] >> 4) * 4;
		if ((void *)(l4 + 4) > data_end)
			return -1;
		key->sport = ((__u16)l4[0] << 8) | l4[1];
		key->dport = ((__u16)l4[2] << 8) | l4[3];
		return 0;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
		l4i->hdr_len = off + 8;
		/* fallthrough */
	case IPPROTO_SCTP:
		if ((void *)(l4 + 4) > data_end)
			return -1;
		key->sport = ((__u16)l4[0] << 8) | l4[1];
		key->dport = ((__u16)l4[2] << 8) | l4[3];
		return 0;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if ((void *)(l4 + 2) > data_end)
			return -1;
		key->sport = l4[0]; /* type */
		key->dport = l4[1]; /* code */
		return 0;
	}
	return 0; /* no ports in this protocol */
}

static __always_inline int parse_ipv4(void *data, void *data_end, __u64 off, struct flow_key *key,
				      struct l4_info *l4i)
{
	struct iphdr *ip = data + off;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	key->family = 4;
	key->proto = ip->protocol;
	l4i->l3_len = ip->ihl * 4;
	l4i->ip_df = !!(ip->frag_off & bpf_htons(0x4000));
	__builtin_memcpy(key->saddr, &ip->saddr, 4);
	__builtin_memcpy(key->daddr, &ip->daddr, 4);
	/* Non-first fragments carry no transport header: ports stay 0. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	return parse_l4(data, data_end, off + ip->ihl * 4, key, l4i);
}

static __always_inline int parse_ipv6(void *data, void *data_end, __u64 off, struct flow_key *key,
				      struct l4_info *l4i)
{
	struct ipv6hdr *ip6 = data + off;
	__u64 start = off;
	__u8 next;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (ip6->version != 6)
		return -1;
	key->family = 6;
	__builtin_memcpy(key->saddr, &ip6->saddr, 16);
	__builtin_memcpy(key->daddr, &ip6->daddr, 16);
	next = ip6->nexthdr;
	off += sizeof(*ip6);

	/* A bounded walk over extension headers; the verifier needs the bound. */
#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		__u8 *ext = data + off;

		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(ext + 2) > data_end)
				return -1;
			next = ext[0];
			off += ((__u64)ext[1] + 1) * 8;
			continue;
		case IPPROTO_AH:
			if ((void *)(ext + 2) > data_end)
				return -1;
			next = ext[0];
			off += ((__u64)ext[1] + 2) * 4;
			continue;
		case IPPROTO_FRAGMENT:
			/* next (1), reserved (1), offset+flags (2), id (4) */
			if ((void *)(ext + 8) > data_end)
				return -1;
			next = ext[0];
			off += 8;
			if (((ext[2] << 8) | ext[3]) & 0xfff8) {
				/* Not the first fragment: no transport header. */
				key->proto = next;
				return 0;
			}
			continue;
		}
		break;
	}
	key->proto = next;
	switch (next) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		/* More extension headers than we walk: keep the flow, without ports. */
		return 0;
	}
	/* off is bounded by the unrolled walk (each step adds at most 2048). */
	if (off > 0xffff)
		return -1;
	l4i->l3_len = off - start;
	return parse_l4(data, data_end, off, key, l4i);
}

/* The kernel's netdev_features_t bits (NETIF_F_*_BIT) and SKB_GSO_* types
 * that decide whether a device takes a GSO sk_buff whole. These bits have
 * kept their positions since the features were introduced (the ones added
 * later went above NETIF_F_GSO_FRAGLIST). */
#define F_IP_CSUM (1ULL << 1)
#define F_HW_CSUM (1ULL << 3)
#define F_IPV6_CSUM (1ULL << 4)
#define F_FRAGLIST (1ULL << 6)
#define F_TSO_MANGLEID (1ULL << 19)
#define F_TSO6 (1ULL << 20)
#define F_GSO_UDP_L4 (1ULL << 33)
#define F_CSUM_MASK (F_IP_CSUM | F_HW_CSUM | F_IPV6_CSUM)
#define F_GSO_SHIFT 16
/* NETIF_F_GSO_MASK: TSO (16) to the last GSO bit (35 in 6.18; clearing
 * a later, unrelated bit too changes none of the decisions below). */
#define F_GSO_MASK (((1ULL << 36) - 1) & ~((1ULL << F_GSO_SHIFT) - 1))

#define GSO_TCPV4 (1U << 0)
#define GSO_DODGY (1U << 1)
#define __GSO_TCP_FIXEDID (1U << 3)
#define GSO_TCPV6 (1U << 4)
#define GSO_PARTIAL (1U << 12)
#define GSO_UDP_L4 (1U << 17)
/* 6.18.y, 6.19+: FIXEDID moved to bits 30/31, both mapping to bit 3. */
#define GSO_TCP_FIXEDID_OUTER_INNER (3U << 30)

#define CSUM_NONE 0
#define CSUM_UNNECESSARY 1
#define CSUM_PARTIAL 3

/* can_checksum_protocol (include/linux/netdevice.h), without FCoE. */
static __always_inline int can_checksum(__u64 f, __u16 proto)
{
	if (f & F_HW_CSUM)
		return 1;
	if (proto == bpf_htons(ETH_P_IP))
		return !!(f & F_IP_CSUM);
	if (proto == bpf_htons(ETH_P_IPV6))
		return !!(f & F_IPV6_CSUM);
	return 0;
}

/* netdev_intersect_features: HW_CSUM on one side stands for IP+IPV6_CSUM. */
static __always_inline __u64 intersect_features(__u64 f1, __u64 f2)
{
	if ((f1 ^ f2) & F_HW_CSUM) {
		if (f1 & F_HW_CSUM)
			f1 |= F_IP_CSUM | F_IPV6_CSUM;
		else
			f2 |= F_IP_CSUM | F_IPV6_CSUM;
	}
	return f1 & f2;
}

/*
 * The kernel's sk_buff and net_device fields the GSO replay needs, with
 * CO-RE offsets (relocated against the running kernel's BTF), read one of
 * two ways, chosen at load time (only GSO sk_buffs at egress read them):
 *
 * - kctx (nsflow_egress_k): where the kernel has the bpf_cast_to_kern_ctx
 *   kfunc (6.3+; the loader looks for it in the kernel's BTF), the context
 *   becomes a trusted sk_buff pointer and the fields are plain loads;
 * - otherwise (nsflow_egress; 6.1, 6.2) through bpf_probe_read_kernel from
 *   the context pointer itself: at run time a TC program's context is the
 *   sk_buff (the verifier rewrites every __sk_buff access into an access to
 *   it). A helper call per field: slower, still once per GSO packet.
 *
 * trusted is a constant in each program: the compiler keeps one way only.
 */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

#define KREAD(trusted, p, f) ((trusted) ? (p)->f : BPF_CORE_READ(p, f))
#define KREAD_BITFIELD(trusted, p, f) ((trusted) ? BPF_CORE_READ_BITFIELD(p, f) : BPF_CORE_READ_BITFIELD_PROBED(p, f))

static __always_inline struct sk_buff *kskb(struct __sk_buff *ctx, int trusted)
{
	return trusted ? bpf_cast_to_kern_ctx(ctx) : (struct sk_buff *)ctx;
}

/*
 * encap_hdr_len sets the headers each segment of an encapsulated (tunnel)
 * GSO packet repeats: the outer ones and the inner ones up to the inner
 * transport payload, as qdisc_pkt_len_init counts them
 * (skb_inner_transport_offset, plus the inner TCP or UDP header). At egress
 * the packet starts at the MAC header. Left as parsed (the outer headers)
 * if the inner transport header is not in the linear data.
 */
static __always_inline void encap_hdr_len(struct __sk_buff *ctx, struct sk_buff *skb, int trusted, __u32 gso_type,
					  struct l4_info *l4i)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 off = (__u32)KREAD(trusted, skb, inner_transport_header) - (__u32)KREAD(trusted, skb, mac_header);
	__u8 *th;

	if (off > 1024)
		return;
	th = data + off;
	if (gso_type & (GSO_TCPV4 | GSO_TCPV6)) {
		if ((void *)(th + 13) > data_end)
			return;
		l4i->hdr_len = off + (th[12] >> 4) * 4;
	} else if (gso_type & GSO_UDP_L4) {
		l4i->hdr_len = off + 8;
	} else {
		l4i->hdr_len = off;
	}
}

/*
 * tx_segments returns how many packets the device puts on the wire for a
 * GSO sk_buff at egress, and so how many its counters count: gso_segs when
 * the kernel segments it in software after the TC hook, 1 when the device
 * takes it whole (TSO, or a virtual device passing it on). The decision is
 * validate_xmit_skb's (net/core/dev.c), replayed on the device's features
 * as they are when the packet passes: netif_skb_features (gso_features_check,
 * the encapsulation and VLAN masks, harmonize_features' checksum check)
 * then netif_needs_gso (net_gso_ok on the GSO type, frag_list, ip_summed).
 * Reading the features live needs no refresh on `ethtool -K`, and costs
 * only GSO sk_buffs, never the stub's fast path. Segmented in software, an
 * encapsulated packet's segments repeat its inner headers too
 * (encap_hdr_len). Not replayed: a driver's own ndo_features_check (many
 * NICs restrict tunnel offloads there), MPLS, several stacked VLAN tags,
 * GSO_PARTIAL, and for encapsulated packets the TSO_MANGLEID and IPv6
 * extension header checks on the inner headers (they read the outer ones).
 * docs/RELIABILITY.md lists what the tests cover.
 */
static __always_inline __u32 tx_segments(struct __sk_buff *ctx, struct l4_info *l4i, int trusted)
{
	struct sk_buff *skb = kskb(ctx, trusted);
	struct net_device *dev;
	struct skb_shared_info *si;
	__u32 segs = ctx->gso_segs;
	__u32 gso_type = 0, max;
	void *frag_list = 0;
	__u64 f, gso;
	__u8 ip_summed, encap;

	if (!skb) {
		stat_inc(STAT_NO_DEV);
		return segs;
	}
	dev = KREAD(trusted, skb, dev);
	if (!dev) {
		stat_inc(STAT_NO_DEV);
		return segs;
	}
	si = (void *)(KREAD(trusted, skb, head) + KREAD(trusted, skb, end));
	ip_summed = KREAD_BITFIELD(trusted, skb, ip_summed);
	encap = KREAD_BITFIELD(trusted, skb, encapsulation);
	bpf_core_read(&gso_type, sizeof(gso_type), &si->gso_type);
	bpf_core_read(&frag_list, sizeof(frag_list), &si->frag_list);
	f = KREAD(trusted, dev, features);

	/* gso_features_check */
	/* gso_ipv4_max_size is 6.3+; before, gso_max_size limits both. */
	max = KREAD(trusted, dev, gso_max_size);
	if (ctx->protocol != bpf_htons(ETH_P_IPV6) && bpf_core_field_exists(dev->gso_ipv4_max_size))
		max = KREAD(trusted, dev, gso_ipv4_max_size);
	if (segs > KREAD(trusted, dev, gso_max_segs) || ctx->len >= max || !gso_type) {
		f &= ~F_GSO_MASK;
	} else {
		if (!(gso_type & GSO_PARTIAL))
			f &= ~KREAD(trusted, dev, gso_partial_features);
		/* mangleid_features is 6.18.y and 6.19+; before, TSO_MANGLEID. */
		if ((gso_type & GSO_TCPV4) && !encap && !l4i->ip_df)
			f &= bpf_core_field_exists(dev->mangleid_features) ? ~KREAD(trusted, dev, mangleid_features)
									   : ~F_TSO_MANGLEID;
		/* NETIF_F_IPV6_CSUM (and TSO that depends on it) cannot handle
		 * IPv6 extension headers. */
		if ((f & F_IPV6_CSUM) && !encap &&
		    ((gso_type & GSO_TCPV6) || ((gso_type & GSO_UDP_L4) && l4i->l3_proto == bpf_htons(ETH_P_IPV6))) &&
		    l4i->l3_len != sizeof(struct ipv6hdr))
			f &= ~(F_IPV6_CSUM | F_TSO6 | F_GSO_UDP_L4);
	}
	if (encap)
		f &= KREAD(trusted, dev, hw_enc_features);
	if (ctx->vlan_present || ctx->protocol == bpf_htons(ETH_P_8021Q_) || ctx->protocol == bpf_htons(ETH_P_8021AD_))
		/* The VLAN TX offload bits the kernel adds back change no GSO
		 * or checksum bit: left out. */
		f = intersect_features(f, KREAD(trusted, dev, vlan_features));
	/* harmonize_features */
	if (ip_summed != CSUM_NONE && !can_checksum(f, l4i->l3_proto))
		f &= ~(F_CSUM_MASK | F_GSO_MASK);

	/* netif_needs_gso: skb_gso_ok, or a checksum the device must finish. */
	if (gso_type & GSO_TCP_FIXEDID_OUTER_INNER)
		gso_type |= __GSO_TCP_FIXEDID;
	gso = ((__u64)gso_type << F_GSO_SHIFT) & F_GSO_MASK;
	if ((f & gso) == gso && (!frag_list || (f & F_FRAGLIST)) &&
	    (ip_summed == CSUM_PARTIAL || ip_summed == CSUM_UNNECESSARY))
		return 1; /* the device takes it whole */
	/* Software GSO. Each segment of an encapsulated packet repeats the
	 * inner headers too. */
	if (encap)
		encap_hdr_len(ctx, skb, trusted, gso_type, l4i);
	/* gso_segs segments; an untrusted source's (DODGY) count is
	 * recomputed, as qdisc_pkt_len_init does. */
	if ((gso_type & GSO_DODGY) && ctx->gso_size && l4i->hdr_len < ctx->len)
		segs = (ctx->len - l4i->hdr_len + ctx->gso_size - 1) / ctx->gso_size;
	return segs;
}

/*
 * rx_segments returns how many packets the device counted for a GSO sk_buff
 * at ingress. GRO (in a NAPI poll: a NIC's, or a veth's whose peer cannot
 * do TSO) merges received frames into one sk_buff before the TC hook, after
 * the device counted each frame: gso_segs of them. A GSO packet that a
 * virtual device passed on whole (veth without NAPI, the default) was
 * counted once. NAPI marks what it received with its NAPI ID (busy-poll
 * kernels: CONFIG_NET_RX_BUSY_POLL); without one the sk_buff did not come
 * through a NAPI poll, and GRO did not build it.
 */
static __always_inline __u32 rx_segments(struct __sk_buff *ctx)
{
	return ctx->napi_id >= napi_id_min ? ctx->gso_segs : 1; /* 0: counted as 1 */
}

/* Parses the frame into key (PARSE_FLOW: complete); link is the hook's
 * enum link. */
static __always_inline enum parse_result parse(struct __sk_buff *ctx, __u32 link, struct flow_key *key,
					       struct l4_info *l4i)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 off = 0;
	__u16 proto = ctx->protocol; /* network byte order */

	/* Devices without a link-layer header (tun, wireguard) start at L3. */
	if (link == LINK_ETHER) {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return PARSE_TRUNCATED;
		proto = eth->h_proto;
		off = sizeof(*eth);
		if (proto == bpf_htons(ETH_P_8021Q_) || proto == bpf_htons(ETH_P_8021AD_)) {
			/* One VLAN tag: TCI (2), then the encapsulated ethertype (2). */
			__u16 *vlan = data + off;

			if ((void *)(vlan + 2) > data_end)
				return PARSE_TRUNCATED;
			proto = vlan[1];
			off += 4;
		}
	}
	l4i->l3_proto = proto;
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(data, data_end, off, key, l4i) ? PARSE_TRUNCATED : PARSE_FLOW;
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(data, data_end, off, key, l4i) ? PARSE_TRUNCATED : PARSE_FLOW;
	return PARSE_NON_IP;
}

/* The stat a frame without a flow counts in. */
static __always_inline __u32 parse_stat(enum parse_result res)
{
	return res == PARSE_NON_IP ? STAT_NON_IP : STAT_TRUNCATED;
}

/*
 * The hand-off: a stub tells the parser it tail-calls its slot and its
 * hook's link layer in the packet's control block, which is per packet
 * (safe under PREEMPT_RT, where another packet's program may run on the
 * same CPU between the stub and the parser) and survives the tail call:
 * cb[0] = slot | link << 16, cb[1] = cb[0] ^ HANDOFF_MAGIC. __sk_buff->cb
 * is qdisc_skb_cb's data, the TC layer's scratch: nothing before the hook
 * leaves anything there for after it (at egress a qdisc initializes its own
 * cb at enqueue, after the hook; at ingress the next layer, IP or a bridge,
 * its own), and every TC program that passes state in it (Cilium's tail
 * calls, for one) writes it before it reads. A parser run without a stub
 * (attached directly) finds no matching pair and counts nothing; it
 * clears cb[1] so that a later run on the same packet (another hook) never
 * takes this hand-off for its own.
 */
struct handoff {
	__u32 slot;
	__u32 link;
	__u8 ok;
};

static __always_inline struct handoff take_handoff(struct __sk_buff *ctx)
{
	__u32 w = ctx->cb[0];
	struct handoff h = {
		.slot = w & 0xffff,
		.link = (w >> 16) & 1,
		.ok = ctx->cb[1] == (w ^ HANDOFF_MAGIC),
	};

	ctx->cb[1] = 0;
	return h;
}

/* The parser: totals with GSO segments, then the flow. trusted: the GSO
 * replay reads through bpf_cast_to_kern_ctx (KREAD). attr: the variant with
 * the per-container attribution (attribution, sk_lookup, containers_enabled),
 * which the loader loads in place of the one without when any is on: the
 * one without is the parser as it was before them, instruction for
 * instruction (nothing of theirs, not even the loads of their switches, is
 * in it; docs/BENCHMARKS.md). */
static __always_inline int account(struct __sk_buff *ctx, __u8 dir, int trusted, int attr)
{
	struct handoff h = take_handoff(ctx);
	__u64 bytes = ctx->len;
	__u32 packets;

	if (!h.ok) {
		stat_inc(STAT_TOTALS_FULL);
		return TC_NEXT;
	}

	struct flow_key fkey = {
		.slot = h.slot,
	};
	struct l4_info l4i = {};
	enum parse_result res = PARSE_NOT_YET;

	packets = 1;
	if (ctx->gso_size) {
		res = parse(ctx, h.link, &fkey, &l4i);
		packets = dir == DIR_TX ? tx_segments(ctx, &l4i, trusted) : rx_segments(ctx);
		if (!packets)
			packets = 1;
		/* Each segment repeats the headers (qdisc_pkt_len_init). */
		if (packets > 1 && res == PARSE_FLOW && l4i.hdr_len < bytes)
			bytes += (packets - 1) * l4i.hdr_len;
	}
	count_total(h.slot, packets, bytes);

	if (!flows_enabled)
		return TC_NEXT;
	/* The containers map counts an egress packet under its own socket's
	 * cgroup (read once, for the flow too), an ingress one under its
	 * flow's. The switch is read once: off, the packet pays one load. */
	__u8 containers_on = attr && containers_enabled;
	__u64 skb_cg = 0, cg;

	if (containers_on && dir == DIR_TX)
		skb_cg = bpf_skb_cgroup_id(ctx);
	if (res == PARSE_NOT_YET)
		res = parse(ctx, h.link, &fkey, &l4i);
	if (res != PARSE_FLOW) {
		stat_inc(parse_stat(res));
		if (containers_on)
			count_container(h.slot, skb_cg, packets, bytes);
		return TC_NEXT;
	}
	cg = count_flow(ctx, &fkey, packets, bytes, l4i.tcp_flags, dir, skb_cg, containers_on && dir == DIR_RX, attr);
	if (containers_on)
		count_container(h.slot, dir == DIR_TX ? skb_cg : cg, packets, bytes);
	return TC_NEXT;
}

SEC("tc")
int nsflow_ingress(struct __sk_buff *ctx)
{
	return account(ctx, DIR_RX, 0, 0);
}

/* The egress parser for kernels without bpf_cast_to_kern_ctx (probe reads). */
SEC("tc")
int nsflow_egress(struct __sk_buff *ctx)
{
	return account(ctx, DIR_TX, 0, 0);
}

/* The egress parser where the kernel has bpf_cast_to_kern_ctx: the loader
 * loads it as nsflow_egress's replacement. */
SEC("tc")
int nsflow_egress_k(struct __sk_buff *ctx)
{
	return account(ctx, DIR_TX, 1, 0);
}

/* The same three with the per-container attribution (account's attr): the
 * loader loads them in place of the three above when it is on (names of at
 * most 15 characters: the kernel's program names). */
SEC("tc")
int nsflow_attr_in(struct __sk_buff *ctx)
{
	return account(ctx, DIR_RX, 0, 1);
}

SEC("tc")
int nsflow_attr_eg(struct __sk_buff *ctx)
{
	return account(ctx, DIR_TX, 0, 1);
}

SEC("tc")
int nsflow_attr_egk(struct __sk_buff *ctx)
{
	return account(ctx, DIR_TX, 1, 1);
}

/*
 * The stub: counts the packet into its slot, or hands the slot to the parser
 * when per-flow accounting is on or the packet is a GSO sk_buff (whose
 * segments the parser counts: one more load and compare than counting, the
 * cost of the non-GSO fast path). If the tail call fails (no parser in
 * account_progs), it counts the packet itself: totals never miss one.
 */
static __always_inline int stub(struct __sk_buff *ctx, __u32 dir)
{
	__u64 slot;

	/* A 64-bit move of the template immediate, patched before load. */
	asm volatile("%0 = %1" : "=r"(slot) : "i"(SLOT_TEMPLATE));
	/* gso_size, not gso_segs: an untrusted source's (DODGY) GSO packet
	 * may carry gso_segs 0 until it is segmented. */
	if (flows_enabled || ctx->gso_size) {
		__u64 link;
		__u32 w;

		asm volatile("%0 = %1" : "=r"(link) : "i"(LINK_TEMPLATE));
		w = (__u32)slot | (__u32)link << 16;
		ctx->cb[0] = w;
		ctx->cb[1] = w ^ HANDOFF_MAGIC;
		bpf_tail_call(ctx, &account_progs, dir);
		ctx->cb[1] = 0;
	}
	count_total(slot, 1, ctx->len);
	return TC_NEXT;
}

SEC("tc")
int nsflow_stub_ingress(struct __sk_buff *ctx)
{
	return stub(ctx, DIR_RX);
}

SEC("tc")
int nsflow_stub_egress(struct __sk_buff *ctx)
{
	return stub(ctx, DIR_TX);
}
