/*
 * C inner loop of the udp backend, loaded with ctypes (see ../accel.py).
 *
 * Built at install time by setup.py as the extension module flannel.backends.udp._fastpath and
 * installed inside the package; the daemon never compiles anything. It is not meant to be
 * imported (accel.py CDLL-loads the file); when Python's headers are there it is still a valid,
 * empty module, so `import` does not crash either.
 *
 * Same decisions as packet.py / proxy.py (tests compare them): flannel's wire format (one raw IPv4
 * packet per datagram, TTL-1 with RFC 1624 checksum patch), longest-prefix match, ICMP
 * net-unreachable exactly as flannel's proxy.c, the anti-spoof rule on receive (docs/udp.md).
 * Batching: up to BATCH packets read from the TUN go out in one sendmmsg(); recvmmsg() takes up to
 * BATCH datagrams. Each worker runs until state->stop is set. An idle worker sleeps in poll() on its
 * input and on state->stop_fd (an eventfd the owner writes to stop the workers), so an idle agent
 * does not wake at all; without a stop_fd (-1) it looks at state->stop every POLL_MS.
 */
#if defined(__has_include)
#  if __has_include(<Python.h>)
#    define PY_SSIZE_T_CLEAN
#    include <Python.h>
#    define FL_HAVE_PYTHON 1
#  endif
#endif
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef FL_HAVE_PYTHON
static struct PyModuleDef fl_module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "udp fast path; loaded with ctypes by flannel.backends.udp.accel", -1, NULL,
    NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&fl_module); }
#else
void *PyInit__fastpath(void);
void *PyInit__fastpath(void) { return 0; }
#endif

#define BATCH 64
#define POLL_MS 200
#define FL_ABI 3           /* layout of fl_table / fl_state; packet.TABLE_ABI must match */
#define FL_MAX_WORKERS 64

enum {
    C_TUN_RX, C_TX_PACKETS, C_TX_BYTES, C_RX_PACKETS, C_TUN_TX_PACKETS, C_TUN_TX_BYTES,
    C_DROP_SHORT, C_DROP_VERSION, C_DROP_TTL, C_DROP_NO_ROUTE, C_ICMP, C_DROP_UNKNOWN_PEER,
    C_DROP_SPOOFED, C_SEND_ERRORS, C_TUN_WRITE_ERRORS, C_DROP_MALFORMED, C_NCOUNTERS
};

/* One prefix length: `count` routes starting at `start` in routes[], sorted by net. */
struct fl_group { uint32_t mask; uint32_t start; uint32_t count; };
/* All values host byte order. */
struct fl_route { uint32_t net; uint32_t peer; };
struct fl_src { uint32_t peer; uint32_t net; uint32_t mask; };
struct fl_net { uint32_t net; uint32_t mask; };

/* Table layout (packet.TableBuilder.c_layout): header, groups (longest prefix first), routes,
 * sources (sorted by peer, net), trusted outer-source networks. Immutable once published;
 * replaced as a whole (see fl_publish). */
struct fl_table {
    uint32_t ngroups, nroutes, nsources, ntrusted;
    uint32_t net, netmask;   /* the overlay Network (0/0: unknown, everything counts as inside) */
    uint32_t abi, pad;
    /* struct fl_group groups[ngroups]; struct fl_route routes[nroutes]; struct fl_src src[nsources];
     * struct fl_net trusted[ntrusted]; */
};

/* Shared by every worker of one Network. `table` is swapped by fl_publish; a replaced table is
 * freed by the owner only once every worker has been seen outside it: worker w stores the
 * generation it read before loading the table into seen[w], and FL_IDLE while it holds none
 * (epoch-based reclamation, no lock in the packet path). */
#define FL_IDLE UINT64_MAX
struct fl_state {
    volatile int32_t stop;
    uint32_t tun_addr;   /* host order, ICMP source */
    uint16_t port;       /* host order, destination port for every peer */
    uint16_t pad;
    int32_t mtu;         /* read size from the TUN / max inner packet */
    int32_t stop_fd;     /* eventfd, readable once the workers must stop; -1: none (poll every POLL_MS) */
    struct fl_table *volatile table;
    volatile uint64_t gen;
    volatile uint64_t seen[FL_MAX_WORKERS];
};

int fl_abi(void) { return FL_ABI; }
int fl_max_workers(void) { return FL_MAX_WORKERS; }

/* Swap in a new table; returns the new generation. A table replaced by generation g may be freed
 * once fl_oldest_seen() >= g. Sequentially consistent, so a worker that published its generation
 * before this swap is seen by the owner's next fl_oldest_seen(). */
uint64_t fl_publish(struct fl_state *st, struct fl_table *t) {
    __atomic_store_n(&st->table, t, __ATOMIC_SEQ_CST);
    return __atomic_add_fetch(&st->gen, 1, __ATOMIC_SEQ_CST);
}

uint64_t fl_oldest_seen(struct fl_state *st, int nworkers) {
    uint64_t m = FL_IDLE;
    for (int w = 0; w < nworkers && w < FL_MAX_WORKERS; w++) {
        uint64_t s = __atomic_load_n(&st->seen[w], __ATOMIC_SEQ_CST);
        if (s < m) m = s;
    }
    return m;
}

static inline struct fl_table *table_enter(struct fl_state *st, int w) {
    __atomic_store_n(&st->seen[w], __atomic_load_n(&st->gen, __ATOMIC_SEQ_CST), __ATOMIC_SEQ_CST);
    return __atomic_load_n(&st->table, __ATOMIC_SEQ_CST);
}
static inline void table_leave(struct fl_state *st, int w) {
    __atomic_store_n(&st->seen[w], FL_IDLE, __ATOMIC_SEQ_CST);
}

/* Sleep until `fd` is readable or the owner signals stop (st->stop_fd). Only for idle waits: the
 * caller looks at st->stop and retries its read either way. */
static void wait_input(struct fl_state *st, int fd) {
    struct pollfd pf[2] = {{fd, POLLIN, 0}, {st->stop_fd, POLLIN, 0}};
    if (st->stop_fd >= 0) poll(pf, 2, -1);
    else poll(pf, 1, POLL_MS);
}

static inline struct fl_group *groups_of(struct fl_table *t) { return (struct fl_group *)(t + 1); }
static inline struct fl_route *routes_of(struct fl_table *t) { return (struct fl_route *)(groups_of(t) + t->ngroups); }
static inline struct fl_src *sources_of(struct fl_table *t) { return (struct fl_src *)(routes_of(t) + t->nroutes); }
static inline struct fl_net *trusted_of(struct fl_table *t) { return (struct fl_net *)(sources_of(t) + t->nsources); }

static uint16_t csum(const uint8_t *p, size_t n) {
    uint32_t s = 0;
    for (; n > 1; p += 2, n -= 2) s += (uint32_t)(p[0] << 8 | p[1]);
    if (n) s += (uint32_t)(p[0] << 8);
    while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)~s;
}

/* Returns 0 when the TTL expires (drop), 1 otherwise. */
int fl_decrement_ttl(uint8_t *pkt) {
    if (pkt[8] <= 1) return 0;
    pkt[8]--;
    uint32_t c = (uint32_t)(pkt[10] << 8 | pkt[11]);
    if (c >= 0xFFFF - 0x100) c = (c + 0x101) & 0xFFFF; else c += 0x100;
    pkt[10] = (uint8_t)(c >> 8);
    pkt[11] = (uint8_t)c;
    return 1;
}

/* ICMP net-unreachable for `pkt` into `out` (>= 88 bytes); returns its length or 0 (none). */
int fl_icmp_unreach(const uint8_t *pkt, int len, uint32_t tun_addr, uint8_t *out) {
    if (len < 20) return 0;
    int ihl = (pkt[0] & 0x0F) * 4;
    if (pkt[9] == 1) return 0;
    if (((pkt[6] << 8) | pkt[7]) & 0x1FFF) return 0;
    if (ihl >= 60 || ihl < 20 || len < ihl + 8) return 0;
    int total = 20 + 8 + ihl + 8;
    memset(out, 0, 28);
    out[0] = 0x45; out[2] = (uint8_t)(total >> 8); out[3] = (uint8_t)total;
    out[8] = 8; out[9] = 1;
    out[12] = (uint8_t)(tun_addr >> 24); out[13] = (uint8_t)(tun_addr >> 16);
    out[14] = (uint8_t)(tun_addr >> 8); out[15] = (uint8_t)tun_addr;
    memcpy(out + 16, pkt + 12, 4);
    uint16_t c = csum(out, 20);
    out[10] = (uint8_t)(c >> 8); out[11] = (uint8_t)c;
    out[20] = 3; out[21] = 0;
    memcpy(out + 28, pkt, (size_t)(ihl + 8));
    c = csum(out + 20, (size_t)(8 + ihl + 8));
    out[22] = (uint8_t)(c >> 8); out[23] = (uint8_t)c;
    return total;
}

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Longest-prefix match; returns the peer (host order) or 0. */
uint32_t fl_lookup(struct fl_table *t, uint32_t dst) {
    if (!t) return 0;
    struct fl_group *g = groups_of(t);
    struct fl_route *r = routes_of(t);
    for (uint32_t i = 0; i < t->ngroups; i++) {
        uint32_t key = dst & g[i].mask;
        uint32_t lo = g[i].start, hi = g[i].start + g[i].count;
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (r[mid].net == key) return r[mid].peer;
            if (r[mid].net < key) lo = mid + 1; else hi = mid;
        }
    }
    return 0;
}

/* First source entry of `outer` (sources sorted by peer), or nsources. */
static uint32_t first_source(struct fl_table *t, uint32_t outer) {
    struct fl_src *s = sources_of(t);
    uint32_t lo = 0, hi = t->nsources;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (s[mid].peer < outer) lo = mid + 1; else hi = mid;
    }
    return lo < t->nsources && s[lo].peer == outer ? lo : t->nsources;
}

static int trusted(struct fl_table *t, uint32_t outer) {
    struct fl_net *n = trusted_of(t);
    for (uint32_t i = 0; i < t->ntrusted; i++)
        if ((outer & n[i].mask) == n[i].net) return 1;
    return 0;
}

/* Whether datagrams from `outer` are looked at at all (packet.PeerTable.known_sender). */
int fl_known_sender(struct fl_table *t, uint32_t outer) {
    if (!t) return 0;
    return first_source(t, outer) < t->nsources || trusted(t, outer);
}

/* The anti-spoof rule (packet.PeerTable.source_allowed, docs/udp.md): 0 ok, 3 unknown peer,
 * 4 spoofed (same codes as packet.py). */
int fl_source_allowed(struct fl_table *t, uint32_t outer, uint32_t inner) {
    if (!t) return 3;
    uint32_t i = first_source(t, outer);
    int is_peer = i < t->nsources;
    if (!is_peer && !trusted(t, outer)) return 3;
    if ((inner & t->netmask) != t->net) return 0;         /* outside Network: not a node's address */
    if (is_peer) {
        struct fl_src *s = sources_of(t);
        for (; i < t->nsources && s[i].peer == outer; i++)
            if ((inner & s[i].mask) == s[i].net) return 0;
        return 4;
    }
    return fl_lookup(t, inner) ? 0 : 4;
}

static int tun_write(int fd, const uint8_t *p, int n, uint64_t *c) {
    for (int tries = 0; tries < 100; tries++) {
        ssize_t w = write(fd, p, (size_t)n);
        if (w >= 0) return 1;
        if (errno == EAGAIN || errno == EINTR) continue;
        break;
    }
    c[C_TUN_WRITE_ERRORS]++;
    return 0;
}

/* TUN -> UDP worker. */
int fl_tun_to_udp(struct fl_state *st, uint64_t *c, int tun_fd, int udp_fd, int w) {
    uint8_t (*bufs)[9000] = malloc(sizeof(uint8_t[BATCH][9000]));
    if (!bufs) return -1;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in dst[BATCH];
    uint8_t icmp[128];
    int rsize = st->mtu > 9000 ? 9000 : st->mtu;
    while (!st->stop) {
        int n = 0;
        struct fl_table *t = table_enter(st, w);
        while (n < BATCH) {
            ssize_t len = read(tun_fd, bufs[n], (size_t)rsize);
            if (len < 0) break;
            c[C_TUN_RX]++;
            uint8_t *p = bufs[n];
            if (len < 20) { c[C_DROP_SHORT]++; continue; }
            if ((p[0] >> 4) != 4) { c[C_DROP_VERSION]++; continue; }
            uint32_t peer = fl_lookup(t, rd32(p + 16));
            if (!peer) {
                c[C_DROP_NO_ROUTE]++;
                int il = fl_icmp_unreach(p, (int)len, st->tun_addr, icmp);
                if (il && tun_write(tun_fd, icmp, il, c)) c[C_ICMP]++;
                continue;
            }
            if (!fl_decrement_ttl(p)) { c[C_DROP_TTL]++; continue; }
            memset(&dst[n], 0, sizeof dst[n]);
            dst[n].sin_family = AF_INET;
            dst[n].sin_port = htons(st->port);
            dst[n].sin_addr.s_addr = htonl(peer);
            iov[n].iov_base = p; iov[n].iov_len = (size_t)len;
            memset(&msgs[n].msg_hdr, 0, sizeof msgs[n].msg_hdr);
            msgs[n].msg_hdr.msg_name = &dst[n];
            msgs[n].msg_hdr.msg_namelen = sizeof dst[n];
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            n++;
        }
        table_leave(st, w);
        int off = 0;
        while (off < n) {
            int s = sendmmsg(udp_fd, msgs + off, (unsigned)(n - off), 0);
            if (s < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) {
                    struct pollfd pf = {udp_fd, POLLOUT, 0};
                    poll(&pf, 1, POLL_MS);
                    if (st->stop) break;
                    continue;
                }
                c[C_SEND_ERRORS]++;
                off++;  /* skip the failing datagram (e.g. EHOSTUNREACH), keep the rest */
                continue;
            }
            for (int i = off; i < off + s; i++) { c[C_TX_PACKETS]++; c[C_TX_BYTES] += iov[i].iov_len; }
            off += s;
        }
        if (n == 0) wait_input(st, tun_fd);
    }
    free(bufs);
    return 0;
}

/* UDP -> TUN worker. */
int fl_udp_to_tun(struct fl_state *st, uint64_t *c, int udp_fd, int tun_fd, int w) {
    uint8_t (*bufs)[9000] = malloc(sizeof(uint8_t[BATCH][9000]));
    if (!bufs) return -1;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in src[BATCH];
    int rsize = st->mtu > 9000 ? 9000 : st->mtu;
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = (size_t)rsize;
    }
    while (!st->stop) {
        for (int i = 0; i < BATCH; i++) {
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_name = &src[i];
            msgs[i].msg_hdr.msg_namelen = sizeof src[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(udp_fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) {
            wait_input(st, udp_fd);
            continue;
        }
        struct fl_table *t = table_enter(st, w);
        for (int i = 0; i < n; i++) {
            uint8_t *p = bufs[i];
            int len = (int)msgs[i].msg_len;
            c[C_RX_PACKETS]++;
            uint32_t outer = ntohl(src[i].sin_addr.s_addr);
            /* strangers first, whatever they send; then shape; then the inner source */
            if (!fl_known_sender(t, outer)) { c[C_DROP_UNKNOWN_PEER]++; continue; }
            if (len < 20) { c[C_DROP_SHORT]++; continue; }
            if ((p[0] >> 4) != 4) { c[C_DROP_VERSION]++; continue; }
            if (fl_source_allowed(t, outer, rd32(p + 12)) != 0) { c[C_DROP_SPOOFED]++; continue; }
            if (!fl_decrement_ttl(p)) { c[C_DROP_TTL]++; continue; }
            if (tun_write(tun_fd, p, len, c)) {
                c[C_TUN_TX_PACKETS]++;
                c[C_TUN_TX_BYTES] += (uint64_t)len;
            }
        }
        table_leave(st, w);
    }
    free(bufs);
    return 0;
}

int fl_ncounters(void) { return C_NCOUNTERS; }

/* ======================================================================================
 * Offload mode (TUN with IFF_VNET_HDR + TUNSETOFFLOAD(CSUM|TSO4), UDP_SEGMENT / UDP_GRO).
 *
 * The wire format does not change: a TSO super-packet read from the TUN is cut here into
 * ordinary MTU-sized TCP/IPv4 packets with complete checksums (exactly what the kernel would
 * have sent without TSO), TTL-1 each, and handed to the kernel in one sendmsg() with
 * UDP_SEGMENT = the packet size, so every datagram on the wire is still one raw IPv4 packet.
 * On receive, UDP_GRO gives many datagrams per recvmsg(); consecutive in-order segments of one
 * TCP flow are merged back into one GSO packet written into the TUN with a virtio-net header.
 * So a Go flannel peer interoperates unchanged (nothing to negotiate).
 * ====================================================================================== */

#include <netinet/udp.h>

#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_ECN 0x80
#define SOL_UDP_ 17
#define UDP_SEGMENT_ 103
#define UDP_GRO_ 104
#define BIGBUF 65536
#define RX_BATCH 8
#define MAX_GSO_PAYLOAD 65000

struct vnet_hdr { uint8_t flags, gso_type; uint16_t hdr_len, gso_size, csum_start, csum_offset; };

/* one's-complement sum of native 16-bit words (byte-order independent, RFC 1071 §2(B)), as a
 * 64-bit sum of 32-bit words folded at the end. It runs over every byte the offload path sends (the
 * TCP checksum of each segment), so it is compiled twice: with AVX2 (about twice as fast, picked at
 * load time when the CPU has it) and for plain x86-64 / other architectures. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static uint64_t sum_native(const uint8_t *p, size_t n, uint64_t acc) {
    uint64_t a0 = 0, a1 = 0;   /* independent chains; each adds 32-bit halves, no overflow < 2^31 words */
    while (n >= 16) {
        uint64_t w0, w1;
        memcpy(&w0, p, 8); memcpy(&w1, p + 8, 8);
        a0 += (w0 & 0xFFFFFFFFu) + (w0 >> 32);
        a1 += (w1 & 0xFFFFFFFFu) + (w1 >> 32);
        p += 16; n -= 16;
    }
    acc += a0 + a1;
    while (n >= 4) { uint32_t w; memcpy(&w, p, 4); acc += w; p += 4; n -= 4; }
    if (n >= 2) { uint16_t w; memcpy(&w, p, 2); acc += w; p += 2; n -= 2; }
    if (n) { uint16_t w = 0; memcpy(&w, p, 1); acc += w; }
    return acc;
}
static uint16_t fold(uint64_t acc) {
    while (acc >> 16) acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)acc;
}
static uint64_t pseudo_sum(const uint8_t *iph, uint8_t proto, uint16_t l4len) {
    uint8_t ph[12];
    memcpy(ph, iph + 12, 8);
    ph[8] = 0; ph[9] = proto; ph[10] = (uint8_t)(l4len >> 8); ph[11] = (uint8_t)l4len;
    return sum_native(ph, 12, 0);
}
static void ip_fix_csum(uint8_t *iph, int ihl) {
    iph[10] = iph[11] = 0;
    uint16_t c = (uint16_t)~fold(sum_native(iph, (size_t)ihl, 0));
    memcpy(iph + 10, &c, 2);
}

/* Complete a CHECKSUM_PARTIAL packet (virtio NEEDS_CSUM): the field already holds the
 * pseudo-header sum. Returns 0 if the offsets are out of range. */
int fl_complete_csum(uint8_t *pkt, int len, int start, int off) {
    if (start < 20 || start + off + 2 > len) return 0;
    uint16_t c = (uint16_t)~fold(sum_native(pkt + start, (size_t)(len - start), 0));
    if (c == 0 && pkt[9] == 17) c = 0xFFFF;
    memcpy(pkt + start + off, &c, 2);
    return 1;
}

#define MAX_SEGS 1024
#define MAX_HL 120

/* Per-segment headers of a TCP/IPv4 TSO packet: every segment gets its own IP header (length,
 * id+i, TTL-1, checksum) and TCP header (seq, FIN/PSH only on the last, CWR only on the first,
 * full checksum over header+payload) in `hdrs` (nseg * hl bytes); iov[2i], iov[2i+1] = header,
 * payload slice of the original. Returns nseg (0: malformed, too many segments or TTL expired). */
static int tso_prepare(const uint8_t *pkt, int len, int mss, uint8_t *hdrs, struct iovec *iov, int *hl_out) {
    if (len < 40 || (pkt[0] >> 4) != 4 || pkt[9] != 6 || mss <= 0) return 0;
    int ihl = (pkt[0] & 0x0F) * 4;
    if (ihl < 20 || len < ihl + 20) return 0;
    int thl = (pkt[ihl + 12] >> 4) * 4;
    int hl = ihl + thl;
    if (thl < 20 || len < hl || hl > MAX_HL) return 0;
    if (pkt[8] <= 1) return 0;
    int payload = len - hl;
    int nseg = payload ? (payload + mss - 1) / mss : 1;
    if (nseg > MAX_SEGS) return 0;
    uint32_t seq = rd32(pkt + ihl + 4);
    uint16_t id = (uint16_t)(pkt[4] << 8 | pkt[5]);
    uint8_t flags = pkt[ihl + 13];
    for (int i = 0; i < nseg; i++) {
        int plen = payload ? (i == nseg - 1 ? payload - i * mss : mss) : 0;
        const uint8_t *data = pkt + hl + (size_t)i * (size_t)mss;
        uint8_t *o = hdrs + (size_t)i * (size_t)hl;
        memcpy(o, pkt, (size_t)hl);
        int tot = hl + plen;
        o[2] = (uint8_t)(tot >> 8); o[3] = (uint8_t)tot;
        uint16_t nid = (uint16_t)(id + i);
        o[4] = (uint8_t)(nid >> 8); o[5] = (uint8_t)nid;
        o[8] = (uint8_t)(pkt[8] - 1);
        ip_fix_csum(o, ihl);
        uint8_t *th = o + ihl;
        uint32_t sq = seq + (uint32_t)i * (uint32_t)mss;
        th[4] = (uint8_t)(sq >> 24); th[5] = (uint8_t)(sq >> 16); th[6] = (uint8_t)(sq >> 8); th[7] = (uint8_t)sq;
        uint8_t f = flags;
        if (i != nseg - 1) f &= (uint8_t)~0x09;   /* FIN, PSH only on the last */
        if (i != 0) f &= (uint8_t)~0x80;          /* CWR only on the first */
        th[13] = f;
        th[16] = th[17] = 0;
        uint64_t acc = pseudo_sum(o, 6, (uint16_t)(thl + plen));
        acc = sum_native(th, (size_t)thl, acc);
        acc = sum_native(data, (size_t)plen, acc);   /* thl is a multiple of 4: word alignment holds */
        uint16_t c = (uint16_t)~fold(acc);
        memcpy(th + 16, &c, 2);
        iov[2 * i].iov_base = o; iov[2 * i].iov_len = (size_t)hl;
        iov[2 * i + 1].iov_base = (void *)data; iov[2 * i + 1].iov_len = (size_t)plen;
    }
    *hl_out = hl;
    return nseg;
}

/* Test/reference entry: the segments of a TSO packet back to back in `out`. */
int fl_tso_segment(const uint8_t *pkt, int len, int mss, uint8_t *out, int *seg_len) {
    uint8_t *hdrs = malloc(MAX_SEGS * MAX_HL);
    struct iovec *iov = malloc(sizeof(struct iovec) * 2 * MAX_SEGS);
    int hl = 0, n = 0;
    if (hdrs && iov) {
        n = tso_prepare(pkt, len, mss, hdrs, iov, &hl);
        uint8_t *o = out;
        for (int i = 0; i < 2 * n; i++) { memcpy(o, iov[i].iov_base, iov[i].iov_len); o += iov[i].iov_len; }
    }
    free(hdrs); free(iov);
    *seg_len = hl + mss;
    return n;
}

/* Transmit accumulator of the offload path: datagrams to one peer, all `seg` bytes long except
 * possibly the last, sent with one sendmsg(UDP_SEGMENT = seg). Why: a ~64 KB TSO packet is ~45
 * segments, one more than fits in one UDP send (65507 bytes), so sending each TSO packet on its own
 * costs two sendmsg() calls, the second with one or two segments: two kernel traversals, and on
 * the receiver two datagrams the GRO merge cannot always join (a second TUN write). Here the full
 * segments left over from one TSO packet wait for the next packet read from the TUN and go out
 * with it; small packets (pure ACKs, pod UDP) of the same size to the same peer are batched the
 * same way. Nothing waits for long: everything queued is sent before the worker sleeps (the TUN
 * read returned EAGAIN). Wire format unchanged: still one IPv4 packet per datagram, in the order
 * they were read.
 *
 * Queued TSO segments point into the read buffer and header area they came from (two of each,
 * used in turn; `refs` = which ones are referenced, flushed before one is reused); other packets
 * are copied into `stage`. */
#define TX_MAX_SEGS 64
#define STAGE_SIZE 65536
struct txacc {
    struct sockaddr_in dst;
    int seg;        /* datagram size of the batch */
    int per;        /* segments per sendmsg for this size */
    int n;          /* datagrams queued */
    int closed;     /* the last one is shorter than seg: nothing may follow */
    int refs;       /* bit i: references read buffer / header area i */
    int niov;
    size_t bytes, staged;
    struct iovec iov[2 * TX_MAX_SEGS];
    uint8_t *stage;
};

static void acc_flush(struct txacc *a, int udp_fd, uint64_t *c, volatile int32_t *stop) {
    if (!a->n) return;
    char cbuf[CMSG_SPACE(sizeof(uint16_t))];
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_name = &a->dst; mh.msg_namelen = sizeof a->dst;
    mh.msg_iov = a->iov; mh.msg_iovlen = (size_t)a->niov;
    if (a->n > 1) {
        memset(cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf; mh.msg_controllen = sizeof cbuf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_UDP_; cm->cmsg_type = UDP_SEGMENT_; cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t gs = (uint16_t)a->seg;
        memcpy(CMSG_DATA(cm), &gs, sizeof gs);
    }
    for (;;) {
        ssize_t r = sendmsg(udp_fd, &mh, 0);
        if (r >= 0) {
            c[C_TX_PACKETS] += (uint64_t)a->n;
            c[C_TX_BYTES] += (uint64_t)a->bytes;
            break;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == ENOBUFS) {
            struct pollfd pf = {udp_fd, POLLOUT, 0};
            poll(&pf, 1, POLL_MS);
            if (!*stop) continue;
        }
        c[C_SEND_ERRORS] += (uint64_t)a->n;
        break;
    }
    a->n = 0; a->niov = 0; a->bytes = 0; a->staged = 0; a->refs = 0; a->closed = 0;
}

/* Whether a datagram of `len` bytes to `dst` may join the queued batch: same peer, the batch's size
 * (or shorter: then it ends the batch). */
static int acc_joins(const struct txacc *a, const struct sockaddr_in *dst, int len) {
    return !a->closed && len <= a->seg && a->dst.sin_addr.s_addr == dst->sin_addr.s_addr
        && a->dst.sin_port == dst->sin_port;
}

/* Queue one datagram of `len` bytes made of hdr (+ payload, may be NULL); a datagram that cannot
 * join the batch sends it first. */
static void acc_add(struct txacc *a, const struct sockaddr_in *dst, const uint8_t *hdr, size_t hlen,
                    const uint8_t *pay, size_t plen, int ref, int udp_fd, uint64_t *c, volatile int32_t *stop) {
    int len = (int)(hlen + plen);
    if (a->n && !acc_joins(a, dst, len)) acc_flush(a, udp_fd, c, stop);
    if (!a->n) {
        a->dst = *dst;
        a->seg = len;
        a->per = MAX_GSO_PAYLOAD / len;
        if (a->per > TX_MAX_SEGS) a->per = TX_MAX_SEGS;
        if (a->per < 1) a->per = 1;
    }
    a->iov[a->niov].iov_base = (void *)hdr; a->iov[a->niov].iov_len = hlen; a->niov++;
    if (plen) { a->iov[a->niov].iov_base = (void *)pay; a->iov[a->niov].iov_len = plen; a->niov++; }
    a->n++;
    a->bytes += (size_t)len;
    if (ref >= 0) a->refs |= 1 << ref;
    if (len < a->seg) a->closed = 1;
    if (a->closed || a->n >= a->per) acc_flush(a, udp_fd, c, stop);
}

/* Queue a copy of a single packet (its buffer is reused by the next read). A batch it cannot join
 * is sent before the copy is placed: sending resets the stage, and the copy must not land where
 * the next one will. */
static void acc_add_copy(struct txacc *a, const struct sockaddr_in *dst, const uint8_t *p, int len,
                         int udp_fd, uint64_t *c, volatile int32_t *stop) {
    if (len > STAGE_SIZE) { c[C_DROP_MALFORMED]++; return; }
    if (a->n && (!acc_joins(a, dst, len) || a->staged + (size_t)len > STAGE_SIZE)) acc_flush(a, udp_fd, c, stop);
    uint8_t *o = a->stage + a->staged;
    memcpy(o, p, (size_t)len);
    a->staged += (size_t)len;
    acc_add(a, dst, o, (size_t)len, NULL, 0, -1, udp_fd, c, stop);
}

static int tun_writev(int fd, const struct vnet_hdr *vh, const uint8_t *p, int n, uint64_t *c) {
    struct iovec iov[2] = {{(void *)vh, VNET_HDR_LEN}, {(void *)p, (size_t)n}};
    for (int tries = 0; tries < 100; tries++) {
        ssize_t w = writev(fd, iov, 2);
        if (w >= 0) return 1;
        if (errno == EAGAIN || errno == EINTR) continue;
        break;
    }
    c[C_TUN_WRITE_ERRORS]++;
    return 0;
}

/* TUN (vnet hdr, TSO) -> UDP (GSO) worker. */
int fl_tun_to_udp_gso(struct fl_state *st, uint64_t *c, int tun_fd, int udp_fd, int w) {
    uint8_t *inb[2] = {malloc(BIGBUF + 64), malloc(BIGBUF + 64)};
    uint8_t *hdrb[2] = {malloc(MAX_SEGS * MAX_HL), malloc(MAX_SEGS * MAX_HL)};
    struct iovec *iov = malloc(sizeof(struct iovec) * 2 * MAX_SEGS);
    struct txacc *a = malloc(sizeof *a);
    uint8_t *stage = malloc(STAGE_SIZE);
    uint8_t icmp[128];
    struct vnet_hdr zero;
    memset(&zero, 0, sizeof zero);
    if (!inb[0] || !inb[1] || !hdrb[0] || !hdrb[1] || !iov || !a || !stage) {
        free(inb[0]); free(inb[1]); free(hdrb[0]); free(hdrb[1]); free(iov); free(a); free(stage);
        return -1;
    }
    memset(a, 0, sizeof *a);
    a->stage = stage;
    int cur = 0;
    while (!st->stop) {
        if (a->refs & (1 << cur)) acc_flush(a, udp_fd, c, &st->stop);
        uint8_t *in = inb[cur];
        ssize_t n = read(tun_fd, in, BIGBUF + 64);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                acc_flush(a, udp_fd, c, &st->stop);   /* nothing more right now: send what waits */
                wait_input(st, tun_fd);
            }
            continue;
        }
        c[C_TUN_RX]++;
        if (n < VNET_HDR_LEN) { c[C_DROP_SHORT]++; continue; }
        struct vnet_hdr vh;
        memcpy(&vh, in, VNET_HDR_LEN);
        uint8_t *p = in + VNET_HDR_LEN;
        int len = (int)n - VNET_HDR_LEN;
        if (len < 20) { c[C_DROP_SHORT]++; continue; }
        if ((p[0] >> 4) != 4) { c[C_DROP_VERSION]++; continue; }
        uint32_t peer = fl_lookup(table_enter(st, w), rd32(p + 16));
        table_leave(st, w);
        if (!peer) {
            c[C_DROP_NO_ROUTE]++;
            if ((vh.flags & VNET_F_NEEDS_CSUM) && vh.gso_type == VNET_GSO_NONE)
                fl_complete_csum(p, len, vh.csum_start, vh.csum_offset);
            int il = fl_icmp_unreach(p, len, st->tun_addr, icmp);
            if (il && tun_writev(tun_fd, &zero, icmp, il, c)) c[C_ICMP]++;
            continue;
        }
        struct sockaddr_in dst;
        memset(&dst, 0, sizeof dst);
        dst.sin_family = AF_INET;
        dst.sin_port = htons(st->port);
        dst.sin_addr.s_addr = htonl(peer);
        if ((vh.gso_type & ~VNET_GSO_ECN) == VNET_GSO_TCPV4 && vh.gso_size > 0) {
            int hl = 0;
            if (p[8] <= 1) { c[C_DROP_TTL]++; continue; }
            int nseg = tso_prepare(p, len, vh.gso_size, hdrb[cur], iov, &hl);
            if (nseg == 0) { c[C_DROP_MALFORMED]++; continue; }
            for (int i = 0; i < nseg; i++)
                acc_add(a, &dst, iov[2 * i].iov_base, iov[2 * i].iov_len, iov[2 * i + 1].iov_base,
                        iov[2 * i + 1].iov_len, cur, udp_fd, c, &st->stop);
            cur ^= 1;   /* what is still queued points into this buffer: read the next one elsewhere */
            continue;
        }
        if (vh.gso_type != VNET_GSO_NONE) { c[C_DROP_MALFORMED]++; continue; }  /* not offered */
        if (vh.flags & VNET_F_NEEDS_CSUM) fl_complete_csum(p, len, vh.csum_start, vh.csum_offset);
        if (!fl_decrement_ttl(p)) { c[C_DROP_TTL]++; continue; }
        acc_add_copy(a, &dst, p, len, udp_fd, c, &st->stop);
    }
    acc_flush(a, udp_fd, c, &st->stop);
    free(inb[0]); free(inb[1]); free(hdrb[0]); free(hdrb[1]); free(iov); free(a); free(stage);
    return 0;
}

/* Coalescing state for UDP -> TUN: the first packet's headers (copied, to rewrite lengths and
 * checksums) and the payload slices, referenced in the receive buffers until the flush. */
#define MAX_COAL 64
struct coal {
    uint8_t hdr[MAX_HL];
    const uint8_t *first;  /* first packet (for single-packet writes) */
    int first_len;
    int len;               /* total merged packet length */
    int hl, ihl, mss, nseg;
    uint32_t next_seq;
    int closed;            /* no more segments may be appended */
    int refs;              /* bit i: points into receive buffer set i (flushed before it is reused) */
    struct iovec iov[MAX_COAL + 2];
};

static void coal_flush(struct coal *k, int tun_fd, uint64_t *c) {
    if (!k->nseg) return;
    struct vnet_hdr vh;
    memset(&vh, 0, sizeof vh);
    int ok;
    if (k->nseg > 1) {
        uint8_t *p = k->hdr;
        p[2] = (uint8_t)(k->len >> 8); p[3] = (uint8_t)k->len;
        ip_fix_csum(p, k->ihl);
        uint16_t ps = fold(pseudo_sum(p, 6, (uint16_t)(k->len - k->ihl)));  /* NEEDS_CSUM: not inverted */
        memcpy(p + k->ihl + 16, &ps, 2);
        vh.flags = VNET_F_NEEDS_CSUM;
        vh.gso_type = VNET_GSO_TCPV4;
        vh.hdr_len = (uint16_t)k->hl;
        vh.gso_size = (uint16_t)k->mss;
        vh.csum_start = (uint16_t)k->ihl;
        vh.csum_offset = 16;
        k->iov[0].iov_base = &vh; k->iov[0].iov_len = VNET_HDR_LEN;
        k->iov[1].iov_base = k->hdr; k->iov[1].iov_len = (size_t)k->hl;
        ok = 0;
        for (int tries = 0; tries < 100; tries++) {
            if (writev(tun_fd, k->iov, k->nseg + 2) >= 0) { ok = 1; break; }
            if (errno != EAGAIN && errno != EINTR) break;
        }
        if (!ok) c[C_TUN_WRITE_ERRORS]++;
    } else {
        ok = tun_writev(tun_fd, &vh, k->first, k->first_len, c);
    }
    if (ok) {
        c[C_TUN_TX_PACKETS] += (uint64_t)k->nseg;
        c[C_TUN_TX_BYTES] += (uint64_t)k->len;
    }
    k->nseg = 0; k->len = 0; k->refs = 0;
}

/* Append a checked, TTL-decremented packet: merge into the current flow or flush and restart. */
static void coal_add(struct coal *k, const uint8_t *p, int len, int set, int tun_fd, uint64_t *c) {
    int ihl = (p[0] & 0x0F) * 4;
    int mergeable = p[9] == 6 && ihl == 20 && len >= 40 && !(((p[6] << 8) | p[7]) & 0x3FFF)
        && ((p[2] << 8) | p[3]) == len;
    int thl = 0, plen = 0;
    uint8_t fl = 0;
    if (mergeable) {
        thl = (p[ihl + 12] >> 4) * 4;
        fl = p[ihl + 13];
        plen = len - ihl - thl;
        mergeable = thl >= 20 && ihl + thl <= MAX_HL && plen > 0 && (fl & ~0x18) == 0;   /* only ACK / PSH */
    }
    if (mergeable && k->nseg && !k->closed && k->nseg < MAX_COAL) {
        const uint8_t *q = k->hdr;
        int same = k->hl == ihl + thl && plen <= k->mss && k->len + plen <= 65535
            && rd32(p + ihl + 4) == k->next_seq
            && memcmp(p + 12, q + 12, 8) == 0                         /* addresses */
            && p[1] == q[1] && p[8] == q[8] && p[6] == q[6]            /* tos, ttl, DF */
            && memcmp(p + ihl, q + ihl, 4) == 0                        /* ports */
            && memcmp(p + ihl + 8, q + ihl + 8, 5) == 0                /* ack, data offset */
            && memcmp(p + ihl + 14, q + ihl + 14, 2) == 0              /* window */
            && memcmp(p + ihl + 20, q + ihl + 20, (size_t)(thl - 20)) == 0;  /* options */
        if (same) {
            k->iov[k->nseg + 2].iov_base = (void *)(p + ihl + thl);
            k->iov[k->nseg + 2].iov_len = (size_t)plen;
            k->len += plen;
            k->nseg++;
            k->next_seq += (uint32_t)plen;
            k->hdr[ihl + 13] |= fl;  /* PSH of the last one */
            k->refs |= 1 << set;
            if (plen < k->mss || (fl & 0x08)) k->closed = 1;
            return;
        }
    }
    coal_flush(k, tun_fd, c);
    k->first = p;
    k->first_len = len;
    k->refs = 1 << set;
    k->len = len;
    k->nseg = 1;
    k->closed = !mergeable || (fl & 0x08);
    if (mergeable) {
        k->ihl = ihl; k->hl = ihl + thl; k->mss = plen;
        memcpy(k->hdr, p, (size_t)(ihl + thl));
        k->iov[2].iov_base = (void *)(p + ihl + thl);
        k->iov[2].iov_len = (size_t)plen;
        k->next_seq = rd32(p + ihl + 4) + (uint32_t)plen;
    }
}

/* UDP (GRO) -> TUN (vnet hdr) worker. The merge state survives from one recvmmsg() to the next
 * (two sets of receive buffers used in turn; a set still referenced is flushed before it is
 * reused): the sender's batches do not line up with TCP flows (a UDP send carries the tail of one
 * TSO packet and the head of the next), so flushing at the end of every recvmmsg() would cut most
 * packets in two, each half a TUN write and a trip through the pod's stack. Everything pending
 * is written before the worker sleeps (recvmmsg found nothing). */
int fl_udp_to_tun_gro(struct fl_state *st, uint64_t *c, int udp_fd, int tun_fd, int w) {
    uint8_t *sets[2] = {malloc((size_t)RX_BATCH * BIGBUF), malloc((size_t)RX_BATCH * BIGBUF)};
    struct coal k;
    memset(&k, 0, sizeof k);
    if (!sets[0] || !sets[1]) { free(sets[0]); free(sets[1]); return -1; }
    struct mmsghdr msgs[RX_BATCH];
    struct iovec iov[RX_BATCH];
    struct sockaddr_in src[RX_BATCH];
    char cbuf[RX_BATCH][CMSG_SPACE(sizeof(int))];
    int cur = 0;
    while (!st->stop) {
        if (k.refs & (1 << cur)) coal_flush(&k, tun_fd, c);
        uint8_t *bufs = sets[cur];
        for (int i = 0; i < RX_BATCH; i++) {
            iov[i].iov_base = bufs + (size_t)i * BIGBUF;
            iov[i].iov_len = BIGBUF;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_name = &src[i];
            msgs[i].msg_hdr.msg_namelen = sizeof src[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = cbuf[i];
            msgs[i].msg_hdr.msg_controllen = sizeof cbuf[i];
        }
        int n = recvmmsg(udp_fd, msgs, RX_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) {
            coal_flush(&k, tun_fd, c);
            wait_input(st, udp_fd);
            continue;
        }
        struct fl_table *t = table_enter(st, w);
        for (int i = 0; i < n; i++) {
            int total = (int)msgs[i].msg_len;
            int gso = total;
            for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msgs[i].msg_hdr); cm; cm = CMSG_NXTHDR(&msgs[i].msg_hdr, cm))
                if (cm->cmsg_level == SOL_UDP_ && cm->cmsg_type == UDP_GRO_) {
                    int g; memcpy(&g, CMSG_DATA(cm), sizeof g);
                    if (g > 0) gso = g;
                }
            uint32_t outer = ntohl(src[i].sin_addr.s_addr);
            int known = fl_known_sender(t, outer);
            uint8_t *base = bufs + (size_t)i * BIGBUF;
            for (int off = 0; off < total || (total == 0 && off == 0); off += gso) {
                uint8_t *p = base + off;
                int len = total - off < gso ? total - off : gso;
                c[C_RX_PACKETS]++;
                if (!known) { c[C_DROP_UNKNOWN_PEER]++; if (total == 0) break; continue; }
                if (len < 20) { c[C_DROP_SHORT]++; if (total == 0) break; continue; }
                if ((p[0] >> 4) != 4) { c[C_DROP_VERSION]++; continue; }
                if (fl_source_allowed(t, outer, rd32(p + 12)) != 0) { c[C_DROP_SPOOFED]++; continue; }
                if (!fl_decrement_ttl(p)) { c[C_DROP_TTL]++; continue; }
                coal_add(&k, p, len, cur, tun_fd, c);
            }
        }
        table_leave(st, w);
        cur ^= 1;
    }
    coal_flush(&k, tun_fd, c);
    free(sets[0]); free(sets[1]);
    return 0;
}
