/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Minimal CO-RE views of the kernel structures nsflow reads (through
 * bpf_probe_read_kernel: for GSO sk_buffs, and a receiving socket's cgroup
 * at a flow's first packet).
 *
 * A full vmlinux.h is 134k lines; these stubs name only the fields the
 * program dereferences. preserve_access_index makes clang emit CO-RE
 * relocations, so the loader (cilium/ebpf) rewrites every offset against the
 * running kernel's BTF: the layout below need not match any real kernel.
 */
#ifndef NSFLOW_KERNEL_H
#define NSFLOW_KERNEL_H

#include <linux/types.h>

struct net_device {
	unsigned int gso_max_size;      /* GSO limit for IPv6 and others */
	unsigned int gso_ipv4_max_size; /* GSO limit for IPv4 (6.3+) */
	unsigned short gso_max_segs;    /* u16 in the kernel */
	/* netdev_features_t: what netif_skb_features starts from. */
	__u64 features;
	__u64 vlan_features;
	__u64 hw_enc_features;
	__u64 gso_partial_features;
	__u64 mangleid_features; /* 6.18.y and 6.19+; absent before */
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
	unsigned char *head;
	unsigned int end; /* sk_buff_data_t: an offset from head on 64-bit */
	__u16 inner_transport_header; /* offsets from head */
	__u16 mac_header;
	__u8 ip_summed : 2;
	__u8 encapsulation : 1;
} __attribute__((preserve_access_index));

struct skb_shared_info {
	struct sk_buff *frag_list;
	unsigned int gso_type;
} __attribute__((preserve_access_index));

/* A socket's cgroup v2 id (socket_cgroup in nsflow.c): the id of the
 * kernfs node of the cgroup the socket was created in (cgroup_id()). */
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct sock_cgroup_data {
	struct cgroup *cgroup; /* v2 */
} __attribute__((preserve_access_index));

struct sock {
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));

#endif
