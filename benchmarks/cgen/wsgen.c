/*
 * wsgen: an independent load generator for WebSocket broadcast servers, in C.
 *
 * Why it exists: fastim's own generator (`fastim bench`) is Python on uvloop. On a
 * 2-core machine its one worker core needs about as long to read a tick of 1,000
 * sockets as the node needs to write it, so a slow node and a slow generator look the
 * same. This program reads with one epoll loop and plain read(2) calls, parses
 * WebSocket frames by hand and never allocates per message, so the server under test
 * is the slower side. It shares no code with fastim (issue P10, item 0).
 *
 * What it does: N subscribers and one publisher on one WebSocket endpoint. The
 * publisher keeps at most W messages that are not yet received by *every* subscriber
 * (the strict window: the slowest subscriber paces it). Each message carries a
 * sequence number; every subscriber checks it gets 1, 2, 3, ... (no loss, no
 * duplicate, no reordering). Latency is measured per delivery (read time minus send
 * time, both CLOCK_MONOTONIC) and per message until the last subscriber has it.
 *
 * Modes:
 *   fastim  subscribers send {"op":"sub","ch":C}; the publisher sends
 *           {"op":"pub","ch":C,"data":P}; deliveries are {"op":"msg",...,"data":P}.
 *   raw     the peers' protocol (benchmarks/peers): every message a client sends is
 *           broadcast to every other client; the publisher sends P itself.
 *
 * Output: one JSON object on stdout. Exit status 0 when every delivery checked out,
 * 1 on a protocol error, loss, duplicate or reordering, 2 on a usage error.
 *
 *   cc -O2 -o wsgen wsgen.c
 *   ./wsgen --port 7071 --path /ws --subs 1000 --duration 5 --window 64 --size 64
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF (256 * 1024)
#define MAXFRAME (64 * 1024)
/* Latency histogram, log-linear (as HdrHistogram): microseconds below 64 exactly, then
 * 32 buckets per power of two (3% wide) up to 2^31 us. 1,024 counters: it stays in the
 * cache (a 1-us-per-bucket array of seconds did not, a miss per delivery). */
#define HIST_SUB 32
#define HIST_N (64 + 26 * HIST_SUB)

typedef struct {
    int fd;
    uint64_t count;   /* messages received */
    char *carry;      /* an incomplete frame kept from the previous read */
    size_t ncarry;
} conn_t;

static const char *host = "127.0.0.1";
static int port = 7071;
static const char *path = "/ws";
static int nsubs = 1000;
static double duration = 5.0;
static double warmup = 1.0;
static int window = 64;
static int size = 64;
static int fastim_mode = 1;
static const char *channel = "bench";
static int bind_spread = 0;
static int marks = 0; /* --marks: "mark start" / "mark end" lines around the measured window */

static conn_t *subs;
static conn_t pub;
static int ep;

static uint64_t sent = 0;   /* messages published */
static uint64_t minc = 0;   /* every subscriber has 1..minc */
static uint32_t *at;        /* at[c & rmask]: subscribers whose count is c */
static uint64_t rmask;
static uint64_t *sendt;     /* send time of message k: sendt[k & rmask] */
static uint32_t *hist_d;    /* per-delivery latency */
static uint32_t *hist_all;  /* per message, until every subscriber has it */
static uint64_t errors = 0;
static char errmsg[512] = "";
static uint64_t acks = 0;
static uint64_t pings = 0;
static uint64_t xorshift = 88172645463325252ULL;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void fail(const char *what) {
    if (!errors) {
        /* kept for the JSON report: no quote, backslash or control character */
        size_t i = 0;
        for (; what[i] && i < sizeof errmsg - 1; i++) {
            char ch = what[i];
            errmsg[i] = (ch == '"' || ch == '\\' || (unsigned char)ch < 0x20) ? '\'' : ch;
        }
        errmsg[i] = 0;
    }
    errors++;
}

static void die(const char *what) {
    fprintf(stderr, "wsgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint32_t rnd32(void) {
    xorshift ^= xorshift << 13;
    xorshift ^= xorshift >> 7;
    xorshift ^= xorshift << 17;
    return (uint32_t)xorshift;
}

/* A masked client frame (text) holding payload p[0..n). Returns its length. */
static size_t ws_frame(char *out, const char *p, size_t n) {
    size_t h = 0;
    out[h++] = (char)0x81;
    if (n < 126) {
        out[h++] = (char)(0x80 | n);
    } else {
        out[h++] = (char)(0x80 | 126);
        out[h++] = (char)(n >> 8);
        out[h++] = (char)(n & 0xff);
    }
    uint32_t m = rnd32();
    unsigned char mk[4] = {m & 0xff, (m >> 8) & 0xff, (m >> 16) & 0xff, m >> 24};
    memcpy(out + h, mk, 4);
    h += 4;
    for (size_t i = 0; i < n; i++)
        out[h + i] = p[i] ^ mk[i & 3];
    return h + n;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                struct timespec ts = {0, 50000};
                nanosleep(&ts, NULL);
                continue;
            }
            die("write");
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Connect and upgrade; anything the server sent after its 101 goes to c->carry. */
static void ws_open(conn_t *c, int index) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind_spread) {
        /* 127.0.0.x source addresses: more than one address's ephemeral ports */
        struct sockaddr_in src = {0};
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7f000000u | (uint32_t)(2 + index / 20000));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0)
            die("bind");
    }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "wsgen: --host must be an IPv4 address, got %s\n", host);
        exit(2);
    }
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port);
    write_all(fd, req, (size_t)n);
    char buf[4096];
    size_t got = 0;
    char *end = NULL;
    while (!end) {
        ssize_t r = read(fd, buf + got, sizeof buf - 1 - got);
        if (r <= 0) {
            fprintf(stderr, "wsgen: connection %d: the server closed during the upgrade\n", index);
            exit(1);
        }
        got += (size_t)r;
        buf[got] = 0;
        end = strstr(buf, "\r\n\r\n");
        if (!end && got >= sizeof buf - 1) {
            fprintf(stderr, "wsgen: connection %d: upgrade answer too long\n", index);
            exit(1);
        }
    }
    if (strncmp(buf, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "wsgen: connection %d: upgrade refused: %.60s\n", index, buf);
        exit(1);
    }
    size_t head = (size_t)(end + 4 - buf);
    c->fd = fd;
    c->count = 0;
    c->carry = malloc(MAXFRAME + 16);
    if (!c->carry)
        die("malloc");
    c->ncarry = got - head;
    memcpy(c->carry, buf + head, c->ncarry);
}

static int hist_bucket(uint64_t us) {
    if (us < 64)
        return (int)us;
    int e = 63 - __builtin_clzll(us); /* 6.. */
    if (e > 31)
        return HIST_N - 1;
    int sub = (int)((us >> (e - 5)) & (HIST_SUB - 1));
    return 64 + (e - 6) * HIST_SUB + sub;
}

static double hist_value_ms(int b) {
    /* the middle of bucket b, in ms */
    if (b < 64)
        return b / 1000.0;
    int e = (b - 64) / HIST_SUB + 6;
    int sub = (b - 64) % HIST_SUB;
    double lo = (double)(1ULL << e) + (double)sub * (double)(1ULL << (e - 5));
    return (lo + (double)(1ULL << (e - 5)) / 2) / 1000.0;
}

static void lat_add(uint32_t *hist, uint64_t ns) {
    hist[hist_bucket(ns / 1000)]++;
}

static double hist_q(const uint32_t *hist, double q) {
    uint64_t total = 0, run = 0;
    for (int i = 0; i < HIST_N; i++)
        total += hist[i];
    if (!total)
        return -1;
    uint64_t want = (uint64_t)(q * (double)(total - 1)) + 1;
    for (int i = 0; i < HIST_N; i++) {
        run += hist[i];
        if (run >= want)
            return hist_value_ms(i);
    }
    return hist_value_ms(HIST_N - 1);
}

/* A subscriber got message ``seq`` (read at ``t``). */
static void delivered(conn_t *c, uint64_t seq, uint64_t t, int measure) {
    if (seq != c->count + 1) {
        char m[160];
        snprintf(m, sizeof m, "subscriber fd %d: message %llu after %llu (loss, duplicate or reorder)",
                 c->fd, (unsigned long long)seq, (unsigned long long)c->count);
        fail(m);
        return;
    }
    if (seq > sent) {
        fail("a message that was not published");
        return;
    }
    uint64_t old = c->count++;
    at[old & rmask]--;
    at[c->count & rmask]++;
    if (measure)
        lat_add(hist_d, t - sendt[seq & rmask]);
    while (minc < sent && at[minc & rmask] == 0) {
        minc++;
        if (measure)
            lat_add(hist_all, t - sendt[minc & rmask]);
    }
}

static uint64_t parse_seq(const char *p, size_t n) {
    /* "s":<digits> inside the payload */
    for (size_t i = 0; i + 4 < n; i++) {
        if (p[i] == '"' && p[i + 1] == 's' && p[i + 2] == '"' && p[i + 3] == ':') {
            uint64_t v = 0;
            for (size_t j = i + 4; j < n && p[j] >= '0' && p[j] <= '9'; j++)
                v = v * 10 + (uint64_t)(p[j] - '0');
            return v;
        }
    }
    return 0;
}

static void pong(conn_t *c, const char *p, size_t n) {
    char out[160];
    if (n > 125)
        n = 125;
    size_t len = ws_frame(out, p, n);
    out[0] = (char)0x8A;
    write_all(c->fd, out, len);
    pings++;
}

/* Parse the complete frames in p[0..n); return the bytes used. */
static size_t frames(conn_t *c, const char *p, size_t n, int is_pub, uint64_t t, int measure) {
    size_t used = 0;
    while (n - used >= 2) {
        const unsigned char *h = (const unsigned char *)p + used;
        int op = h[0] & 0x0f;
        uint64_t len = h[1] & 0x7f;
        size_t hl = 2;
        if (h[1] & 0x80) {
            fail("a masked frame from the server");
            return n;
        }
        if (len == 126) {
            if (n - used < 4)
                break;
            len = ((uint64_t)h[2] << 8) | h[3];
            hl = 4;
        } else if (len == 127) {
            if (n - used < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = (len << 8) | h[2 + i];
            hl = 10;
        }
        if (len > MAXFRAME) {
            fail("a frame larger than 64 KiB");
            return n;
        }
        if (n - used < hl + len)
            break;
        const char *pl = p + used + hl;
        if (!(h[0] & 0x80)) {
            fail("a fragmented message (not expected from a broadcast)");
        } else if (op == 1 || op == 2) {
            if (is_pub) {
                if (fastim_mode && len > 12 && memcmp(pl, "{\"op\":\"error", 12) == 0) {
                    char m[200];
                    snprintf(m, sizeof m, "publisher got an error: %.*s", (int)(len < 150 ? len : 150), pl);
                    fail(m);
                }
                acks++;
            } else if (!fastim_mode || (len > 11 && memcmp(pl, "{\"op\":\"msg\"", 11) == 0)) {
                delivered(c, parse_seq(pl, len), t, measure);
            } else if (len > 12 && memcmp(pl, "{\"op\":\"error", 12) == 0) {
                char m[200];
                snprintf(m, sizeof m, "subscriber got an error: %.*s", (int)(len < 150 ? len : 150), pl);
                fail(m);
            }
            /* other replies ({"op":"subscribed"}, ...) are not messages */
        } else if (op == 9) {
            pong(c, pl, len);
        } else if (op == 8) {
            char m[160];
            snprintf(m, sizeof m, "the server closed a %s (close frame)", is_pub ? "publisher" : "subscriber");
            fail(m);
        }
        used += hl + len;
    }
    return used;
}

static char rbuf[RBUF + MAXFRAME + 16];

static int on_readable(conn_t *c, int is_pub, int measure) {
    /* the previous read's incomplete frame first, then what the socket has */
    memcpy(rbuf, c->carry, c->ncarry);
    ssize_t r = read(c->fd, rbuf + c->ncarry, RBUF);
    if (r == 0) {
        fail(is_pub ? "the server closed the publisher" : "the server closed a subscriber");
        return -1;
    }
    if (r < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    size_t n = c->ncarry + (size_t)r;
    size_t used = frames(c, rbuf, n, is_pub, now_ns(), measure);
    c->ncarry = n - used;
    if (c->ncarry > MAXFRAME) {
        fail("an incomplete frame larger than 64 KiB");
        c->ncarry = 0;
    }
    memcpy(c->carry, rbuf + used, c->ncarry);
    return 0;
}

static char *pbuf;

/* Publish until W messages are not yet received by every subscriber. */
static void publish(void) {
    size_t off = 0;
    char payload[MAXFRAME];
    char body[MAXFRAME];
    while (sent - minc < (uint64_t)window) {
        sent++;
        uint64_t t = now_ns();
        sendt[sent & rmask] = t;
        at[sent & rmask] = 0; /* nobody has this count yet */
        int h = snprintf(payload, sizeof payload, "{\"t\":%llu,\"s\":%llu,\"p\":\"",
                         (unsigned long long)t, (unsigned long long)sent);
        int fill = size - h - 2;
        if (fill < 0)
            fill = 0;
        memset(payload + h, 'x', (size_t)fill);
        memcpy(payload + h + fill, "\"}", 2);
        size_t plen = (size_t)(h + fill + 2);
        const char *msg = payload;
        size_t mlen = plen;
        if (fastim_mode) {
            int b = snprintf(body, sizeof body, "{\"op\":\"pub\",\"ch\":\"%s\",\"data\":", channel);
            memcpy(body + b, payload, plen);
            body[b + plen] = '}';
            msg = body;
            mlen = (size_t)b + plen + 1;
        }
        off += ws_frame(pbuf + off, msg, mlen);
    }
    if (off)
        write_all(pub.fd, pbuf, off);
}

static void setnb(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static void usage(void) {
    fprintf(stderr,
            "usage: wsgen [--host A] [--port P] [--path /ws] [--subs N] [--duration S]\n"
            "             [--warmup S] [--window W] [--size B] [--mode fastim|raw]\n"
            "             [--channel C] [--spread-ips] [--marks]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--spread-ips")) {
            bind_spread = 1;
            continue;
        }
        if (!strcmp(a, "--marks")) {
            marks = 1;
            continue;
        }
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--subs")) nsubs = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--window")) window = atoi(v);
        else if (!strcmp(a, "--size")) size = atoi(v);
        else if (!strcmp(a, "--channel")) channel = v;
        else if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "fastim")) fastim_mode = 1;
            else if (!strcmp(v, "raw")) fastim_mode = 0;
            else usage();
        } else usage();
    }
    if (nsubs < 1 || window < 1 || size < 32 || size > 16000 || duration <= 0 || port <= 0)
        usage();

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    uint64_t r = 1;
    while (r < (uint64_t)window * 2 + 2)
        r <<= 1;
    rmask = r - 1;
    at = calloc(r, sizeof *at);
    sendt = calloc(r, sizeof *sendt);
    hist_d = calloc(HIST_N, sizeof *hist_d);
    hist_all = calloc(HIST_N, sizeof *hist_all);
    subs = calloc((size_t)nsubs, sizeof *subs);
    pbuf = malloc((size_t)window * (size + 64 + strlen(channel)) + 64);
    if (!at || !sendt || !hist_d || !hist_all || !subs || !pbuf)
        die("calloc");

    ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1");
    char cmd[256];
    char frame[300];
    for (int i = 0; i < nsubs; i++) {
        ws_open(&subs[i], i);
        if (fastim_mode) {
            int n = snprintf(cmd, sizeof cmd, "{\"op\":\"sub\",\"ch\":\"%s\",\"id\":1}", channel);
            size_t len = ws_frame(frame, cmd, (size_t)n);
            write_all(subs[i].fd, frame, len);
        }
    }
    at[0] = (uint32_t)nsubs;
    if (fastim_mode) {
        /* wait until every subscription is confirmed (blocking, one at a time) */
        for (int i = 0; i < nsubs; i++) {
            conn_t *c = &subs[i];
            char *hit;
            for (;;) {
                c->carry[c->ncarry] = 0;
                hit = memmem(c->carry, c->ncarry, "\"op\":\"subscribed\"", 17);
                if (hit)
                    break;
                if (memmem(c->carry, c->ncarry, "\"op\":\"error\"", 12)) {
                    fprintf(stderr, "wsgen: subscribe refused: %.*s\n", (int)c->ncarry, c->carry);
                    return 1;
                }
                ssize_t k = read(c->fd, c->carry + c->ncarry, MAXFRAME - c->ncarry);
                if (k <= 0) {
                    fprintf(stderr, "wsgen: subscriber %d closed while subscribing\n", i);
                    return 1;
                }
                c->ncarry += (size_t)k;
            }
            /* drop everything up to the end of the subscribed frame */
            size_t keep = frames(c, c->carry, c->ncarry, 1, 0, 0);
            memmove(c->carry, c->carry + keep, c->ncarry - keep);
            c->ncarry -= keep;
        }
        acks = 0;
    }
    ws_open(&pub, nsubs);
    for (int i = 0; i < nsubs; i++) {
        setnb(subs[i].fd);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, subs[i].fd, &ev) < 0)
            die("epoll_ctl");
    }
    setnb(pub.fd);
    struct epoll_event pev = {.events = EPOLLIN, .data.u32 = (uint32_t)nsubs};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, pub.fd, &pev) < 0)
        die("epoll_ctl");
    usleep(100000); /* the last subscription settles */

    struct epoll_event evs[512];
    double t0 = now_s();
    double t_measure = t0 + warmup;
    double t_end = t_measure + duration;
    int measuring = 0;
    uint64_t d0 = 0, m0 = 0, reads = 0, reads0 = 0, wakes = 0, wakes0 = 0;
    double cpu0 = 0, tm0 = 0;
    uint64_t total_delivered = 0;
    publish();
    for (;;) {
        double t = now_s();
        if (!measuring && t >= t_measure) {
            measuring = 1;
            tm0 = t;
            cpu0 = cpu_s();
            d0 = total_delivered;
            m0 = minc;
            reads0 = reads;
            wakes0 = wakes;
            if (marks) {
                /* the caller samples the server's CPU time now and at "mark end" */
                printf("mark start\n");
                fflush(stdout);
            }
        }
        if (t >= t_end)
            break;
        int n = epoll_wait(ep, evs, 512, 1000);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        wakes++;
        for (int i = 0; i < n; i++) {
            uint32_t k = evs[i].data.u32;
            if (k == (uint32_t)nsubs) {
                on_readable(&pub, 1, measuring);
            } else {
                conn_t *c = &subs[k];
                uint64_t before = c->count;
                on_readable(c, 0, measuring);
                total_delivered += c->count - before;
                reads++;
            }
        }
        if (errors)
            break;
        publish();
    }
    double t1 = now_s();
    double cpu1 = cpu_s();
    if (marks) {
        printf("mark end\n");
        fflush(stdout);
    }
    uint64_t d1 = total_delivered, m1 = minc;
    /* drain: every subscriber gets every published message */
    double drain_end = t1 + 10.0;
    /* (and, from a fastim node, every puback: they race the last deliveries) */
    while (!errors && (minc < sent || (fastim_mode && acks < sent)) && now_s() < drain_end) {
        int n = epoll_wait(ep, evs, 512, 100);
        for (int i = 0; i < n; i++) {
            uint32_t k = evs[i].data.u32;
            if (k == (uint32_t)nsubs) {
                on_readable(&pub, 1, 0);
            } else {
                conn_t *c = &subs[k];
                uint64_t before = c->count;
                on_readable(c, 0, 0);
                total_delivered += c->count - before;
            }
        }
    }
    if (!errors && minc < sent) {
        char m[160];
        snprintf(m, sizeof m, "lost: %llu published, the slowest subscriber has %llu after 10 s",
                 (unsigned long long)sent, (unsigned long long)minc);
        fail(m);
    }
    if (!errors && fastim_mode && acks < sent) {
        char m[160];
        snprintf(m, sizeof m, "%llu publishes not acknowledged after 10 s",
                 (unsigned long long)(sent - acks));
        fail(m);
    }
    double span = t1 - tm0;
    printf("{\"mode\":\"%s\",\"subscribers\":%d,\"window\":%d,\"size\":%d,"
           "\"seconds\":%.3f,\"deliveries\":%llu,\"deliveries_per_s\":%.0f,"
           "\"messages_per_s\":%.0f,\"published\":%llu,\"received_by_all\":%llu,"
           "\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f},"
           "\"latency_all_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f},"
           "\"generator_cpu\":%.3f,\"reads_per_wake\":%.1f,\"deliveries_per_read\":%.1f,"
           "\"acks\":%llu,\"pings\":%llu,\"errors\":%llu,\"error\":\"%s\"}\n",
           fastim_mode ? "fastim" : "raw", nsubs, window, size, span,
           (unsigned long long)(d1 - d0), (double)(d1 - d0) / span, (double)(m1 - m0) / span,
           (unsigned long long)sent, (unsigned long long)minc, hist_q(hist_d, 0.5),
           hist_q(hist_d, 0.9), hist_q(hist_d, 0.99), hist_q(hist_all, 0.5), hist_q(hist_all, 0.9),
           hist_q(hist_all, 0.99), (cpu1 - cpu0) / span,
           wakes > wakes0 ? (double)(reads - reads0) / (double)(wakes - wakes0) : 0.0,
           reads > reads0 ? (double)(d1 - d0) / (double)(reads - reads0) : 0.0,
           (unsigned long long)acks, (unsigned long long)pings, (unsigned long long)errors, errmsg);
    return errors ? 1 : 0;
}
