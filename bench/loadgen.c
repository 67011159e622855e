/* loadgen: the benchmark's two non-closed-loop load generators, in C so they are not Python-bound.
 *
 *   loadgen rate  --port P --body FILE --key K --rate 200 --duration 10 --warmup 2 [--connections 64]
 *                 [--expect-done 1]  (latency and time to first body byte, both from the scheduled time)
 *   loadgen burst --port P --body FILE --key K --streams 1000 [--timeout 30]
 *
 * rate:  open loop, wrk2-style. Request i is *scheduled* at t0 + i/rate whatever happened before it, and
 *        its latency is measured from that scheduled time, so a server that falls behind shows its
 *        queueing instead of hiding it (coordinated omission). A fixed pool of keep-alive connections is
 *        opened first; a request with no free connection waits, and that wait counts. The schedule is
 *        kept with an absolute CLOCK_MONOTONIC timerfd (ns resolution), not the millisecond timers of
 *        epoll_wait or an event loop. Also prints how many requests were in flight at most at once.
 * burst: N streams at once. N connections are opened first (at most 64 handshakes in flight, so no
 *        listen backlog overflows), then all N requests are written together at t0. Time to first body
 *        byte and to the end of the response are measured from t0; a stream counts as complete only if
 *        its status is 200 and its body ends with "data: [DONE]".
 *
 * One JSON line on stdout. HTTP/1.1 only: Content-Length, chunked, or read-to-close bodies.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

enum { C_CONNECTING, C_IDLE, C_WRITING, C_READING, C_DEAD };
enum { P_HEAD, P_BODY_CL, P_BODY_EOF, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_END, P_TRAILER };

typedef struct {
    int fd, state, req, ps, chunked, close_after, status, tl, sl, tail_len;
    size_t woff, hlen;
    long long remaining;
    char head[16384], size_line[32], tail[48];
} conn_t;

static const char *host = "127.0.0.1", *path = "/v1/chat/completions", *key = "sk-bench", *body_file;
static int expect_done, port, conns_n = 64, streams = 1000, max_connecting = 64;
static double rate = 200, duration = 10, warmup = 2, timeout_s = 30;
static char *request;
static size_t request_len;
static conn_t *conns;
static int ep, tfd;
static double t_read; /* time of the read being parsed */

/* per request */
static double *sched, *first_byte, *done_at, *timer_lag;
static int *ok;
static long total, next_sched, next_dispatch, finished, failed_n, started_n, peak_in_flight;
static int *idle;
/* The idle connections, a queue (a ring of idle_cap): the one idle longest goes next. */
static int idle_head, idle_cap;
static int idle_n, connected_n, connecting_n, burst_mode, running;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void arm_timer(double at) {
    struct itimerspec its = {0};
    if (at > 0) {
        its.it_value.tv_sec = (time_t)at;
        its.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    }
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
}

static void watch(int i, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = (unsigned)i};
    if (epoll_ctl(ep, op, conns[i].fd, &ev) < 0) die("epoll_ctl");
}

static void open_conn(int i) {
    conn_t *c = &conns[i];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) die("connect");
    c->state = C_CONNECTING;
    c->req = -1;
    connecting_n++;
    watch(i, EPOLLOUT, EPOLL_CTL_ADD);
}

static void finish(int r, int good) {
    if (r < 0 || done_at[r] != 0) return;
    done_at[r] = t_read;
    ok[r] = good;
    finished++;
    if (!good) failed_n++;
}

static void start_request(int i, long r) {
    conn_t *c = &conns[i];
    c->req = (int)r;
    if (++started_n - finished > peak_in_flight) peak_in_flight = started_n - finished;
    c->woff = 0;
    c->hlen = 0;
    c->ps = P_HEAD;
    c->tail_len = 0;
    c->status = 0;
    c->state = C_WRITING;
    ssize_t w = write(c->fd, request, request_len);
    if (w > 0) c->woff = (size_t)w;
    if (c->woff == request_len) {
        c->state = C_READING;
        watch(i, EPOLLIN, EPOLL_CTL_MOD);
    } else {
        watch(i, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
    }
}

/* First in, first out: at a low rate every connection of the pool takes its turn and none sits idle past
 * the server's keep-alive timeout. Taken from a stack, the deepest ones did, and one was now and then
 * picked up in the instant the server closed it: a request failed that no proxy had failed. */
static void idle_push(int i) { idle[(idle_head + idle_n++) % idle_cap] = i; }

static int idle_pop(void) {
    int i = idle[idle_head];
    idle_head = (idle_head + 1) % idle_cap;
    idle_n--;
    return i;
}

static void idle_remove(int i) {
    for (int k = 0; k < idle_n; k++) {
        if (idle[(idle_head + k) % idle_cap] == i) {
            for (; k + 1 < idle_n; k++) idle[(idle_head + k) % idle_cap] = idle[(idle_head + k + 1) % idle_cap];
            idle_n--;
            return;
        }
    }
}

static void dispatch(void) {
    while (!burst_mode && next_dispatch < next_sched && idle_n > 0) start_request(idle_pop(), next_dispatch++);
}

static void close_conn(int i, int reopen) {
    conn_t *c = &conns[i];
    /* An idle connection the server closed (its keep-alive timeout) leaves the idle queue. */
    idle_remove(i);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->state == C_CONNECTING) connecting_n--;
    else connected_n--;
    c->state = C_DEAD;
    c->req = -1;
    if (reopen) open_conn(i);
}

static void body_bytes(conn_t *c, const char *p, size_t n) {
    if (c->req >= 0 && first_byte[c->req] == 0 && n) first_byte[c->req] = t_read;
    if (n >= sizeof c->tail) {
        memcpy(c->tail, p + n - (sizeof c->tail - 1), sizeof c->tail - 1);
        c->tail_len = sizeof c->tail - 1;
        return;
    }
    if (c->tail_len + n >= sizeof c->tail) {
        size_t drop = c->tail_len + n - (sizeof c->tail - 1);
        memmove(c->tail, c->tail + drop, c->tail_len - drop);
        c->tail_len -= (int)drop;
    }
    memcpy(c->tail + c->tail_len, p, n);
    c->tail_len += (int)n;
}

static int ends_with_done(conn_t *c) {
    int n = c->tail_len;
    while (n > 0 && (c->tail[n - 1] == '\n' || c->tail[n - 1] == '\r' || c->tail[n - 1] == ' ')) n--;
    return n >= 12 && memcmp(c->tail + n - 12, "data: [DONE]", 12) == 0;
}

/* Returns 1 once the response is complete. */
static int feed_body(conn_t *c, const char *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t k;
        char ch;
        switch (c->ps) {
        case P_BODY_CL:
            k = n - i < (size_t)c->remaining ? n - i : (size_t)c->remaining;
            body_bytes(c, p + i, k);
            i += k;
            c->remaining -= (long long)k;
            if (c->remaining == 0) return 1;
            break;
        case P_BODY_EOF:
            body_bytes(c, p + i, n - i);
            return 0;
        case P_CHUNK_SIZE:
            ch = p[i++];
            if (ch == '\n') {
                c->size_line[c->sl] = 0;
                c->remaining = strtoll(c->size_line, NULL, 16);
                c->sl = 0;
                c->tl = 0;
                c->ps = c->remaining ? P_CHUNK_DATA : P_TRAILER;
            } else if (c->sl < (int)sizeof c->size_line - 1) {
                c->size_line[c->sl++] = ch;
            }
            break;
        case P_CHUNK_DATA:
            k = n - i < (size_t)c->remaining ? n - i : (size_t)c->remaining;
            body_bytes(c, p + i, k);
            i += k;
            c->remaining -= (long long)k;
            if (c->remaining == 0) c->ps = P_CHUNK_END;
            break;
        case P_CHUNK_END:
            if (p[i++] == '\n') c->ps = P_CHUNK_SIZE;
            break;
        case P_TRAILER:
            ch = p[i++];
            if (ch == '\n') {
                if (c->tl == 0) return 1;
                c->tl = 0;
            } else if (ch != '\r') {
                c->tl++;
            }
            break;
        }
    }
    return 0;
}

/* Returns 1 once the response is complete. */
static int feed(conn_t *c, const char *p, size_t n) {
    if (c->ps != P_HEAD) return feed_body(c, p, n);
    size_t room = sizeof c->head - 1 - c->hlen, k = n < room ? n : room;
    memcpy(c->head + c->hlen, p, k);
    c->hlen += k;
    c->head[c->hlen] = 0;
    char *end = strstr(c->head, "\r\n\r\n");
    if (!end) return 0;
    size_t head_len = (size_t)(end - c->head) + 4;
    size_t rest_off = head_len - (c->hlen - k); /* where the body starts in p */
    c->status = atoi(c->head + 9);
    c->chunked = 0;
    c->close_after = strncmp(c->head, "HTTP/1.0", 8) == 0;
    long long cl = -1;
    for (char *line = strstr(c->head, "\r\n") + 2; line < end; line = strstr(line, "\r\n") + 2) {
        if (strncasecmp(line, "content-length:", 15) == 0) cl = atoll(line + 15);
        else if (strncasecmp(line, "transfer-encoding:", 18) == 0) {
            char *found = strcasestr(line, "chunked");
            c->chunked = found != NULL && found < strstr(line, "\r\n");
        }
        else if (strncasecmp(line, "connection:", 11) == 0 && strncasecmp(line + 11, " close", 6) == 0)
            c->close_after = 1;
    }
    if (c->chunked) {
        c->ps = P_CHUNK_SIZE;
        c->sl = 0;
    } else if (cl >= 0) {
        c->ps = P_BODY_CL;
        c->remaining = cl;
        if (cl == 0) return 1;
    } else {
        c->ps = P_BODY_EOF;
        c->close_after = 1;
    }
    return feed_body(c, p + rest_off, n - rest_off);
}

static void on_complete(int i) {
    conn_t *c = &conns[i];
    int good = c->status == 200 && (!(burst_mode || expect_done) || ends_with_done(c));
    finish(c->req, good);
    c->req = -1;
    if (c->close_after || burst_mode) {
        close_conn(i, !burst_mode);
    } else {
        c->state = C_IDLE;
        watch(i, EPOLLIN, EPOLL_CTL_MOD);
        idle_push(i);
    }
}

static void on_event(int i, unsigned events) {
    conn_t *c = &conns[i];
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fprintf(stderr, "loadgen: connect: %s\n", strerror(err));
            close_conn(i, 0);
            return;
        }
        connecting_n--;
        connected_n++;
        c->state = C_IDLE;
        watch(i, EPOLLIN, EPOLL_CTL_MOD);
        idle_push(i);
        return;
    }
    if (c->state == C_WRITING && (events & EPOLLOUT)) {
        ssize_t w = write(c->fd, request + c->woff, request_len - c->woff);
        if (w > 0) c->woff += (size_t)w;
        if (c->woff == request_len) {
            c->state = C_READING;
            watch(i, EPOLLIN, EPOLL_CTL_MOD);
        }
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    char buf[65536];
    for (;;) {
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r > 0) {
            if (c->req < 0) continue; /* stray bytes on an idle connection */
            if (feed(c, buf, (size_t)r)) {
                on_complete(i);
                return;
            }
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        /* EOF or error */
        if (c->req >= 0) {
            if (c->ps == P_BODY_EOF) on_complete(i);
            else finish(c->req, 0);
        }
        if (c->state != C_DEAD) close_conn(i, !burst_mode);
        return;
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *sorted, long n, double p) {
    if (n == 0) return NAN;
    long idx = (long)ceil(p / 100.0 * (double)n) - 1;
    if (idx < 0) idx = 0;
    if (idx >= n) idx = n - 1;
    return sorted[idx];
}

static void print_ms(const char *name, double v, int last) {
    if (isinf(v) || isnan(v)) printf("\"%s\":null%s", name, last ? "" : ",");
    else printf("\"%s\":%.3f%s", name, v * 1000, last ? "" : ",");
}

static void load_request(void) {
    FILE *f = fopen(body_file, "rb");
    if (!f) die(body_file);
    char body[65536];
    size_t n = fread(body, 1, sizeof body, f);
    fclose(f);
    request = malloc(n + 1024);
    int h = snprintf(request, 1024,
                     "POST %s HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     path, host, port, key, n);
    memcpy(request + h, body, n);
    request_len = (size_t)h + n;
}

static void loop_until(double deadline, int (*done)(void)) {
    struct epoll_event evs[256];
    while (!done()) {
        double t = now_s();
        if (deadline > 0 && t >= deadline) return;
        int n = epoll_wait(ep, evs, 256, 50);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        t_read = now_s();
        for (int k = 0; k < n; k++) {
            unsigned i = evs[k].data.u32;
            if (i == (unsigned)-1) {
                unsigned long long x;
                if (read(tfd, &x, sizeof x) < 0 && errno != EAGAIN) die("timerfd read");
                continue;
            }
            on_event((int)i, evs[k].events);
        }
        if (running) {
            double lag_now = now_s();
            while (next_sched < total && sched[next_sched] <= lag_now) {
                timer_lag[next_sched] = lag_now - sched[next_sched];
                next_sched++;
            }
            dispatch();
            if (next_sched < total) arm_timer(sched[next_sched]);
        }
    }
}

static int all_connected(void) { return connecting_n == 0; }
static int all_finished(void) { return finished >= total; }

static void open_pool(int n) {
    conns = calloc((size_t)n, sizeof *conns);
    idle = calloc((size_t)n, sizeof *idle);
    idle_cap = n;
    for (int i = 0; i < n; i++) {
        open_conn(i);
        if (connecting_n >= max_connecting) loop_until(now_s() + 10, all_connected);
    }
    loop_until(now_s() + 10, all_connected);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen rate|burst --port P --body FILE [options]\n");
        return 2;
    }
    burst_mode = strcmp(argv[1], "burst") == 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) host = v;
        else if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--path")) path = v;
        else if (!strcmp(k, "--key")) key = v;
        else if (!strcmp(k, "--body")) body_file = v;
        else if (!strcmp(k, "--rate")) rate = atof(v);
        else if (!strcmp(k, "--duration")) duration = atof(v);
        else if (!strcmp(k, "--warmup")) warmup = atof(v);
        else if (!strcmp(k, "--connections")) conns_n = atoi(v);
        else if (!strcmp(k, "--streams")) streams = atoi(v);
        else if (!strcmp(k, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(k, "--expect-done")) expect_done = atoi(v);
        else {
            fprintf(stderr, "loadgen: unknown option %s\n", k);
            return 2;
        }
    }
    if (!port || !body_file) {
        fprintf(stderr, "loadgen: --port and --body are required\n");
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    load_request();
    ep = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = (unsigned)-1};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    total = burst_mode ? streams : (long)((warmup + duration) * rate);
    sched = calloc((size_t)total, sizeof *sched);
    first_byte = calloc((size_t)total, sizeof *first_byte);
    done_at = calloc((size_t)total, sizeof *done_at);
    timer_lag = calloc((size_t)total, sizeof *timer_lag);
    ok = calloc((size_t)total, sizeof *ok);
    open_pool(burst_mode ? streams : conns_n);
    int pool = connected_n;

    if (burst_mode) {
        double t0 = now_s();
        for (long r = 0; r < total && idle_n > 0; r++) {
            sched[r] = t0;
            start_request(idle_pop(), r);
        }
        loop_until(t0 + timeout_s, all_finished);
        double wall = now_s() - t0;
        double *ttfb = malloc(sizeof(double) * (size_t)total), *tot = malloc(sizeof(double) * (size_t)total);
        long complete = 0;
        for (long r = 0; r < total; r++) {
            ttfb[r] = first_byte[r] ? first_byte[r] - t0 : INFINITY;
            tot[r] = ok[r] ? done_at[r] - t0 : INFINITY;
            complete += ok[r];
        }
        qsort(ttfb, (size_t)total, sizeof *ttfb, cmp_double);
        qsort(tot, (size_t)total, sizeof *tot, cmp_double);
        printf("{\"mode\":\"burst\",\"streams\":%ld,\"connected\":%d,\"complete\":%ld,\"failed\":%ld,"
               "\"unfinished\":%ld,\"peak_in_flight\":%ld,",
               total, pool, complete, failed_n, total - finished, peak_in_flight);
        print_ms("ttfb_p50_ms", pct(ttfb, total, 50), 0);
        print_ms("ttfb_p99_ms", pct(ttfb, total, 99), 0);
        print_ms("ttfb_max_ms", pct(ttfb, total, 100), 0);
        print_ms("total_p50_ms", pct(tot, total, 50), 0);
        print_ms("total_p99_ms", pct(tot, total, 99), 0);
        print_ms("total_max_ms", pct(tot, total, 100), 0);
        print_ms("wall_ms", wall, 1);
        printf("}\n");
        return 0;
    }

    double t0 = now_s() + 0.01;
    for (long r = 0; r < total; r++) sched[r] = t0 + (double)r / rate;
    arm_timer(sched[0]);
    running = 1;
    loop_until(sched[total - 1] + timeout_s, all_finished);
    long first = (long)(warmup * rate), n = total - first, good = 0;
    double *lat = malloc(sizeof(double) * (size_t)n), *lag = malloc(sizeof(double) * (size_t)n), sum = 0;
    double *ttfb = malloc(sizeof(double) * (size_t)n);
    double last_done = t0;
    for (long r = first; r < total; r++) {
        lat[r - first] = ok[r] ? done_at[r] - sched[r] : INFINITY;
        lag[r - first] = timer_lag[r];
        ttfb[r - first] = ok[r] && first_byte[r] ? first_byte[r] - sched[r] : INFINITY;
        if (ok[r]) {
            good++;
            sum += done_at[r] - sched[r];
            if (done_at[r] > last_done) last_done = done_at[r];
        }
    }
    qsort(lat, (size_t)n, sizeof *lat, cmp_double);
    qsort(lag, (size_t)n, sizeof *lag, cmp_double);
    qsort(ttfb, (size_t)n, sizeof *ttfb, cmp_double);
    double span = last_done - sched[first];
    printf("{\"mode\":\"rate\",\"rate\":%.1f,\"connections\":%d,\"measured\":%ld,\"ok\":%ld,\"failed\":%ld,"
           "\"unfinished\":%ld,\"started\":%ld,\"peak_in_flight\":%ld,\"achieved_rps\":%.1f,",
           rate, pool, n, good, failed_n, total - finished, started_n, peak_in_flight,
           span > 0 ? (double)good / span : 0.0);
    print_ms("mean_ms", good ? sum / (double)good : NAN, 0);
    print_ms("p50_ms", pct(lat, n, 50), 0);
    print_ms("p90_ms", pct(lat, n, 90), 0);
    print_ms("p99_ms", pct(lat, n, 99), 0);
    print_ms("p999_ms", pct(lat, n, 99.9), 0);
    print_ms("max_ms", pct(lat, n, 100), 0);
    print_ms("ttfb_p50_ms", pct(ttfb, n, 50), 0);
    print_ms("ttfb_p99_ms", pct(ttfb, n, 99), 0);
    print_ms("timer_lag_p99_ms", pct(lag, n, 99), 0);
    print_ms("timer_lag_max_ms", pct(lag, n, 100), 1);
    printf("}\n");
    return 0;
}
