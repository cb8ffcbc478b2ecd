/*
 * ipcd-submit: queue one job on ipcd and, with --wait, print its result.
 *
 * An example client in plain C (libc only) for the wire contract in docs/protocol.md:
 * it derives the key with ftok(), writes the JSON envelope by hand, sends it with
 * msgsnd(), waits on the reply queue with msgrcv() under an interval timer, and reads
 * the result record from the result segment under ipcd's lock, checking its CRC-32.
 * Its exit statuses are ipcctl's (docs/exit-status.md).
 *
 * Build:  cc -Wall -Wextra -O2 -o ipcd-submit ipcd-submit.c
 * Usage:  ipcd-submit [options] TYPE [PAYLOAD | -]       (see usage() below)
 */
#define _GNU_SOURCE /* semtimedop() */
#include <errno.h>
#include <math.h> /* isfinite(), a macro: no -lm */
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ipcctl's exit statuses (ipcd.errors.ExitCode). */
enum {
    ST_OK = 0,
    ST_JOB_FAILED = 1,
    ST_USAGE = 64,
    ST_DATA = 65,
    ST_UNAVAILABLE = 69,
    ST_SOFTWARE = 70,
    ST_QUEUE_FULL = 75,
    ST_NO_PERMISSION = 77,
    ST_CONFIG = 78,
    ST_TIMEOUT = 124,
};

#define DEFAULT_KEY_FILE "/var/lib/ipcd/ipcd.key"
#define DEFAULT_PROJ_ID 0x49
#define REPLY_KEY_OFFSET 0x01000000u
#define MAX_DEPTH 32            /* payload nesting the daemon accepts */
#define LOCK_TIMEOUT_S 5        /* how long ipcd itself waits for the result lock */
#define HEADER_SIZE 64u
#define RECORD_SIZE 64u
#define STATE_VALID 2u

static const char *prog = "ipcd-submit";

static void die(int status, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

static void die(int status, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

static void usage(const char *problem)
{
    fprintf(stderr,
            "usage: %s [--key-file PATH | --key K] [--proj-id N] [--json] [--wait]\n"
            "       [--timeout S] [--timeout-job S] [--send-timeout S] TYPE [PAYLOAD | -]\n",
            prog);
    die(ST_USAGE, "%s", problem);
}

/* ---- a growable byte buffer ------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

static void buf_add(struct buf *b, const void *data, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL)
            die(ST_SOFTWARE, "out of memory");
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void buf_fmt(struct buf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp)
        die(ST_SOFTWARE, "internal error: formatted field too long");
    buf_add(b, tmp, (size_t)n);
}

/* ---- CRC-32, UTF-8, JSON, base64 ------------------------------------------------------ */

/* The CRC-32 of zlib, PHP's crc32() and Python's zlib.crc32 (reflected, poly 0xEDB88320). */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
    static uint32_t table[256];
    if (table[1] == 0) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    }
    crc = ~crc;
    while (n--)
        crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* Strict UTF-8 as Python decodes it: no overlong forms, no surrogates, at most U+10FFFF. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        if (n - i < len)
            return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

/* Append text (already checked to be UTF-8) as a JSON string. */
static void buf_json_string(struct buf *b, const unsigned char *s, size_t n)
{
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        switch (c) {
        case '"': buf_str(b, "\\\""); break;
        case '\\': buf_str(b, "\\\\"); break;
        case '\n': buf_str(b, "\\n"); break;
        case '\r': buf_str(b, "\\r"); break;
        case '\t': buf_str(b, "\\t"); break;
        case '\b': buf_str(b, "\\b"); break;
        case '\f': buf_str(b, "\\f"); break;
        default:
            if (c < 0x20)
                buf_fmt(b, "\\u%04x", c);
            else
                buf_add(b, &c, 1);
        }
    }
    buf_add(b, "\"", 1);
}

static void buf_base64(struct buf *b, const unsigned char *s, size_t n)
{
    static const char digits[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)s[i + 1] << 8;
        if (i + 2 < n)
            v |= s[i + 2];
        char out[4] = {digits[v >> 18 & 63], digits[v >> 12 & 63],
                       i + 1 < n ? digits[v >> 6 & 63] : '=', i + 2 < n ? digits[v & 63] : '='};
        buf_add(b, out, 4);
    }
}

/*
 * A strict JSON (RFC 8259) checker for --json payloads, so that a typo is refused here
 * (status 65, like ipcctl) instead of making the daemon reject the whole envelope.
 * Depth counts as ipcd counts it: an empty array or object adds no level.
 */
enum { JSON_OK = 0, JSON_BAD = -1, JSON_DEEP = -2 };

struct jp {
    const unsigned char *s;
    size_t n, i;
};

static void jp_ws(struct jp *p)
{
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\r' ||
                           p->s[p->i] == '\n'))
        p->i++;
}

static int jp_lit(struct jp *p, const char *word)
{
    size_t len = strlen(word);
    if (p->n - p->i < len || memcmp(p->s + p->i, word, len) != 0)
        return JSON_BAD;
    p->i += len;
    return JSON_OK;
}

static int jp_digits(struct jp *p)
{
    size_t start = p->i;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
        p->i++;
    return p->i > start ? JSON_OK : JSON_BAD;
}

static int jp_number(struct jp *p)
{
    if (p->s[p->i] == '-')
        p->i++;
    if (p->i < p->n && p->s[p->i] == '0')
        p->i++;
    else if (jp_digits(p) != JSON_OK)
        return JSON_BAD;
    if (p->i < p->n && p->s[p->i] == '.') {
        p->i++;
        if (jp_digits(p) != JSON_OK)
            return JSON_BAD;
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        p->i++;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-'))
            p->i++;
        if (jp_digits(p) != JSON_OK)
            return JSON_BAD;
    }
    return JSON_OK;
}

static int jp_string(struct jp *p)
{
    p->i++; /* the opening quote */
    while (p->i < p->n) {
        unsigned char c = p->s[p->i++];
        if (c == '"')
            return JSON_OK;
        if (c < 0x20)
            return JSON_BAD;
        if (c != '\\')
            continue;
        if (p->i >= p->n)
            return JSON_BAD;
        c = p->s[p->i++];
        if (c == 'u') {
            for (int k = 0; k < 4; k++, p->i++) {
                if (p->i >= p->n || strchr("0123456789abcdefABCDEF", p->s[p->i]) == NULL ||
                    p->s[p->i] == '\0')
                    return JSON_BAD;
            }
        } else if (strchr("\"\\/bfnrt", c) == NULL || c == '\0') {
            return JSON_BAD;
        }
    }
    return JSON_BAD;
}

/* One value; *depth gets its nesting depth. `open` is how many containers enclose it. */
static int jp_value(struct jp *p, int open, int *depth)
{
    *depth = 0;
    jp_ws(p);
    if (p->i >= p->n)
        return JSON_BAD;
    unsigned char c = p->s[p->i];
    if (c == '"')
        return jp_string(p);
    if (c == 't')
        return jp_lit(p, "true");
    if (c == 'f')
        return jp_lit(p, "false");
    if (c == 'n')
        return jp_lit(p, "null");
    if (c == '-' || (c >= '0' && c <= '9'))
        return jp_number(p);
    if (c != '[' && c != '{')
        return JSON_BAD;
    if (open > MAX_DEPTH + 1) /* a 34th level: depth 33 at least, whatever it holds */
        return JSON_DEEP;
    unsigned char close = c == '[' ? ']' : '}';
    p->i++;
    jp_ws(p);
    if (p->i < p->n && p->s[p->i] == close) {
        p->i++;
        return JSON_OK; /* empty: no level */
    }
    int deepest = 0;
    for (;;) {
        if (close == '}') {
            jp_ws(p);
            if (p->i >= p->n || p->s[p->i] != '"' || jp_string(p) != JSON_OK)
                return JSON_BAD;
            jp_ws(p);
            if (p->i >= p->n || p->s[p->i++] != ':')
                return JSON_BAD;
        }
        int d, rc = jp_value(p, open + 1, &d);
        if (rc != JSON_OK)
            return rc;
        if (d > deepest)
            deepest = d;
        jp_ws(p);
        if (p->i >= p->n)
            return JSON_BAD;
        c = p->s[p->i++];
        if (c == close)
            break;
        if (c != ',')
            return JSON_BAD;
    }
    *depth = deepest + 1;
    return *depth > MAX_DEPTH ? JSON_DEEP : JSON_OK;
}

static int json_check(const unsigned char *s, size_t n)
{
    struct jp p = {s, n, 0};
    int depth, rc = jp_value(&p, 1, &depth);
    if (rc != JSON_OK)
        return rc;
    jp_ws(&p);
    return p.i == n ? JSON_OK : JSON_BAD;
}

/* ---- bounded waits -------------------------------------------------------------------- */

static volatile sig_atomic_t expired;

static void on_alarm(int sig)
{
    (void)sig;
    expired = 1;
}

/*
 * Start a timer that sets `expired` after `seconds`, then keeps firing every 50 ms.
 * msgsnd(), msgrcv() and semop() fail with EINTR when a handler runs: Linux never
 * restarts them (signal(7)), and SA_RESTART is left off so no other system does either.
 * The repeats cover a SIGALRM that lands after the caller checked `expired` but before
 * it entered the blocking call: the next one interrupts that call.
 */
static void arm(double seconds)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    if (sigaction(SIGALRM, &sa, NULL) != 0)
        die(ST_SOFTWARE, "sigaction: %s", strerror(errno));
    expired = 0;
    time_t whole = (time_t)seconds;
    struct itimerval it = {{0, 50000}, {whole, (suseconds_t)((seconds - (double)whole) * 1e6)}};
    if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0)
        it.it_value.tv_usec = 1; /* all zero would disarm */
    if (setitimer(ITIMER_REAL, &it, NULL) != 0)
        die(ST_SOFTWARE, "setitimer: %s", strerror(errno));
}

static void disarm(void)
{
    struct itimerval off;
    memset(&off, 0, sizeof off);
    setitimer(ITIMER_REAL, &off, NULL);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- the kernel objects --------------------------------------------------------------- */

/* A missing object means no daemon ever ran with this key; EACCES is a permission problem. */
static void ipc_failed(const char *what, uint32_t key)
{
    if (errno == ENOENT || errno == EIDRM || errno == EINVAL)
        die(ST_UNAVAILABLE, "no %s at key 0x%08x: is ipcd running with this key file?", what, key);
    if (errno == EACCES || errno == EPERM)
        die(ST_NO_PERMISSION, "permission denied on the %s at key 0x%08x "
            "(are you in the daemon's group?)", what, key);
    die(ST_SOFTWARE, "%s at key 0x%08x: %s", what, key, strerror(errno));
}

static int open_queue(uint32_t key, const char *what)
{
    int id = msgget((key_t)key, 0); /* flags 0: never create */
    if (id < 0)
        ipc_failed(what, key);
    return id;
}

static size_t msgmax(void)
{
    long value = 8192;
    FILE *fh = fopen("/proc/sys/kernel/msgmax", "r");
    if (fh != NULL) {
        if (fscanf(fh, "%ld", &value) != 1)
            value = 8192;
        fclose(fh);
    }
    return (size_t)value;
}

struct message {
    long mtype;
    char mtext[];
};

/* msgsnd(), waiting at most `timeout` seconds while the queue is full. */
static void send_job(int qid, uint32_t key, long type, const struct buf *body, double timeout)
{
    struct message *m = malloc(sizeof *m + body->len);
    if (m == NULL)
        die(ST_SOFTWARE, "out of memory");
    m->mtype = type;
    memcpy(m->mtext, body->p, body->len);
    int rc = msgsnd(qid, m, body->len, IPC_NOWAIT); /* the common case costs no timer */
    if (rc != 0 && errno == EAGAIN && timeout > 0) {
        arm(timeout);
        while ((rc = msgsnd(qid, m, body->len, 0)) != 0 && errno == EINTR && !expired)
            ;
        int saved = errno;
        disarm();
        errno = saved;
    }
    free(m);
    if (rc == 0)
        return;
    if (errno == EAGAIN || errno == EINTR)
        die(ST_QUEUE_FULL, "queue 0x%08x stayed full for %gs; the job was not accepted", key,
            timeout);
    ipc_failed("job queue", key);
}

/*
 * Wait up to `timeout` seconds for the daemon's notice: a message of type getpid() on
 * the reply queue whose body is the job id.  Another body is a stale notice for an
 * earlier process that had our PID, so it is skipped.  Returns 1 when notified.
 */
static int wait_notice(int rqid, uint32_t key, const char *job_id, double timeout)
{
    struct {
        long mtype;
        char mtext[64];
    } m;
    size_t id_len = strlen(job_id);
    int flags = MSG_NOERROR | (timeout > 0 ? 0 : IPC_NOWAIT);
    int notified = 0;
    if (timeout > 0)
        arm(timeout);
    for (;;) {
        ssize_t n = msgrcv(rqid, &m, sizeof m.mtext, (long)getpid(), flags);
        if (n >= 0) {
            if ((size_t)n == id_len && memcmp(m.mtext, job_id, id_len) == 0) {
                notified = 1;
                break;
            }
            continue;
        }
        if (errno == EINTR && !expired)
            continue;
        if (errno == EINTR || errno == ENOMSG)
            break;
        int saved = errno;
        disarm();
        errno = saved;
        ipc_failed("reply queue", key);
    }
    if (timeout > 0)
        disarm();
    return notified;
}

static uint32_t u32le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t u64le(const unsigned char *p) { return u32le(p) | (uint64_t)u32le(p + 4) << 32; }

struct result {
    int found;
    unsigned status, kind;
    unsigned char *data; /* the slot's copy: the 64-byte record header, then the data */
    uint32_t length;
    uint32_t daemon_pid; /* from the segment header, for the timeout message */
};

/* Take ipcd's lock: semop(-1, SEM_UNDO) with ipcd's own 5 s bound. */
static void lock(int semid, uint32_t key, int delta)
{
    struct sembuf op = {0, (short)delta, SEM_UNDO};
    struct timespec limit = {LOCK_TIMEOUT_S, 0};
    while (semtimedop(semid, &op, 1, delta < 0 ? &limit : NULL) != 0) {
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            die(ST_TIMEOUT, "the result semaphore at key 0x%08x stayed taken for %ds", key,
                LOCK_TIMEOUT_S);
        ipc_failed("result semaphore", key);
    }
}

/*
 * Find the newest valid record of `job_id` (docs/protocol.md, "Finding a job"): read the
 * header, walk the sequence numbers from next_seq - 1 down, compare the 16-byte id, and
 * accept only state 2, a length that fits the slot and a matching CRC.  The bytes are
 * copied out while holding the lock, as ipcd's own readers do.
 */
static struct result find_result(uint32_t key, const char *job_id)
{
    struct result r;
    memset(&r, 0, sizeof r);
    int shmid = shmget((key_t)key, 0, 0);
    if (shmid < 0)
        ipc_failed("result segment", key);
    struct shmid_ds ds;
    if (shmctl(shmid, IPC_STAT, &ds) != 0)
        ipc_failed("result segment", key);
    const unsigned char *seg = shmat(shmid, NULL, SHM_RDONLY);
    if (seg == (void *)-1)
        ipc_failed("result segment", key);
    int semid = semget((key_t)key, 0, 0);
    if (semid < 0)
        ipc_failed("result semaphore", key);

    unsigned char want[16] = {0};
    memcpy(want, job_id, strlen(job_id));
    lock(semid, key, -1);
    const unsigned char *h = seg;
    uint32_t count = u32le(h + 16), slot = u32le(h + 20);
    uint64_t next = u64le(h + 24);
    int sane = ds.shm_segsz >= HEADER_SIZE && memcmp(h, "IPCDRES\0", 8) == 0 &&
               u32le(h + 8) == 1 && u32le(h + 12) == HEADER_SIZE && count >= 1 &&
               slot >= RECORD_SIZE &&
               HEADER_SIZE + (uint64_t)count * slot <= (uint64_t)ds.shm_segsz;
    if (sane) {
        r.daemon_pid = u32le(h + 32);
        uint64_t oldest = next > count ? next - count : 0;
        for (uint64_t seq = next; seq > oldest && !r.found;) {
            seq--;
            const unsigned char *rec = seg + HEADER_SIZE + (seq % count) * (uint64_t)slot;
            if (memcmp(rec + 16, want, 16) != 0)
                continue;
            uint32_t length = u32le(rec + 44);
            if (u32le(rec) != STATE_VALID || length > slot - RECORD_SIZE || rec[40] > 1 ||
                rec[41] > 2)
                continue;
            if (crc32_update(0, rec + 8, RECORD_SIZE - 8 + length) != u32le(rec + 4))
                continue; /* torn by a writer that died */
            r.data = malloc(RECORD_SIZE + (size_t)length + 1);
            if (r.data == NULL)
                die(ST_SOFTWARE, "out of memory");
            memcpy(r.data, rec, RECORD_SIZE + (size_t)length);
            r.found = 1;
            r.status = rec[40];
            r.kind = rec[41];
            r.length = length;
        }
    }
    lock(semid, key, +1);
    shmdt(seg);
    if (!sane)
        die(ST_UNAVAILABLE, "the segment at key 0x%08x is not an ipcd result segment (version 1)",
            key);
    return r;
}

/* Print a result the way `ipcctl submit --wait` does; returns the exit status. */
static int print_result(const struct result *r, const char *job_id)
{
    const char *data = (const char *)r->data + RECORD_SIZE;
    if (r->status != 0)
        die(ST_JOB_FAILED, "job %s failed: %.*s", job_id, (int)r->length, data);
    fwrite(data, 1, r->length, stdout);
    /* text gets a newline if it has none; JSON is printed as stored, plus a newline */
    if ((r->kind == 1 && (r->length == 0 || data[r->length - 1] != '\n')) || r->kind == 2)
        fputc('\n', stdout);
    if (fflush(stdout) != 0)
        die(ST_SOFTWARE, "writing the output: %s", strerror(errno));
    return ST_OK;
}

/* ---- the command line ----------------------------------------------------------------- */

struct options {
    const char *key_file;
    uint32_t key; /* 0: derive it with ftok */
    int proj_id;
    int json, wait;
    double timeout, job_timeout, send_timeout;
    long type;
    const char *payload; /* NULL: none; "-": stdin */
};

static double seconds_arg(const char *name, const char *text, int positive)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (*text == '\0' || *end != '\0' || errno != 0 || !isfinite(v) || v < 0 || (positive && v == 0)) {
        char problem[200];
        snprintf(problem, sizeof problem, "%s: not a %s number of seconds: '%.100s'", name,
                 positive ? "positive" : "non-negative", text);
        usage(problem);
    }
    return v;
}

static long long int_arg(const char *name, const char *text, long long lo, long long hi, int base)
{
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, base);
    if (*text == '\0' || *end != '\0' || errno != 0 || v < lo || v > hi) {
        char problem[200];
        snprintf(problem, sizeof problem, "%s must be a number from %lld to %lld, not '%.60s'",
                 name, lo, hi, text);
        usage(problem);
    }
    return v;
}

static struct options parse_args(int argc, char **argv)
{
    struct options o = {DEFAULT_KEY_FILE, 0, DEFAULT_PROJ_ID, 0, 0, 30.0, 0, 5.0, 0, NULL};
    const char *positional[2];
    int npos = 0, options_done = 0;
    for (int i = 1; i < argc; i++) {
        char *arg = argv[i];
        if (options_done || arg[0] != '-' || strcmp(arg, "-") == 0) {
            if (npos == 2)
                usage("too many arguments");
            positional[npos++] = arg;
            continue;
        }
        if (strcmp(arg, "--") == 0) {
            options_done = 1;
            continue;
        }
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            printf("usage: %s [--key-file PATH | --key K] [--proj-id N] [--json] [--wait]\n"
                   "       [--timeout S] [--timeout-job S] [--send-timeout S] TYPE [PAYLOAD | -]\n"
                   "Queue a job of message type TYPE on ipcd; print its id, or with --wait its "
                   "output.\n"
                   "exit status: 0 ok, 1 job failed, 64 usage, 65 bad payload, 69 no daemon or "
                   "queue,\n  75 queue full, 77 permission denied, 124 timed out waiting\n",
                   prog);
            exit(ST_OK);
        }
        if (strcmp(arg, "--json") == 0) {
            o.json = 1;
            continue;
        }
        if (strcmp(arg, "--wait") == 0) {
            o.wait = 1;
            continue;
        }
        /* the rest take a value: --name VALUE or --name=VALUE */
        char *value = strchr(arg, '=');
        if (value != NULL)
            *value++ = '\0';
        else if (i + 1 < argc)
            value = argv[++i];
        static const char *const with_value[] = {"--key-file", "--key", "--proj-id", "--timeout",
                                                 "--timeout-job", "--send-timeout"};
        int known = 0;
        for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
            known |= strcmp(arg, with_value[k]) == 0;
        char problem[160];
        if (!known) {
            snprintf(problem, sizeof problem, "unknown option %.100s", arg);
            usage(problem);
        }
        if (value == NULL) {
            snprintf(problem, sizeof problem, "%.100s needs a value", arg);
            usage(problem);
        }
        if (strcmp(arg, "--key-file") == 0)
            o.key_file = value;
        else if (strcmp(arg, "--key") == 0)
            o.key = (uint32_t)int_arg("--key", value, 1, 0xFFFFFFFFLL, 0);
        else if (strcmp(arg, "--proj-id") == 0)
            o.proj_id = (int)int_arg("--proj-id", value, 1, 255, 0);
        else if (strcmp(arg, "--timeout") == 0)
            o.timeout = seconds_arg(arg, value, 0);
        else if (strcmp(arg, "--timeout-job") == 0)
            o.job_timeout = seconds_arg(arg, value, 1);
        else
            o.send_timeout = seconds_arg(arg, value, 0);
    }
    if (npos == 0)
        usage("the message TYPE is required");
    /* No configuration is read here, so handlers are named by number only. */
    o.type = (long)int_arg("TYPE", positional[0], 1, 2147483647LL, 10);
    o.payload = npos > 1 ? positional[1] : NULL;
    return o;
}

static struct buf read_payload(const char *arg)
{
    struct buf b = {0};
    if (strcmp(arg, "-") != 0) {
        buf_str(&b, arg);
        return b;
    }
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, stdin)) > 0)
        buf_add(&b, chunk, n);
    if (ferror(stdin))
        die(ST_DATA, "reading the payload from stdin: %s", strerror(errno));
    buf_add(&b, "", 0);
    return b;
}

/* A number as JSON: the shortest of %.15g and %.17g that reads back exactly. */
static void buf_number(struct buf *b, double v)
{
    char tmp[40];
    snprintf(tmp, sizeof tmp, "%.15g", v);
    if (strtod(tmp, NULL) != v)
        snprintf(tmp, sizeof tmp, "%.17g", v);
    buf_str(b, tmp);
}

int main(int argc, char **argv)
{
    struct options o = parse_args(argc, argv);

    /* 1. the payload member of the envelope */
    struct buf payload = {0};
    if (o.payload != NULL) {
        struct buf raw = read_payload(o.payload);
        const unsigned char *s = (const unsigned char *)raw.p;
        int utf8 = utf8_valid(s, raw.len);
        if (o.json) {
            if (!utf8)
                die(ST_DATA, "the payload is not UTF-8, so it cannot be JSON");
            int rc = json_check(s, raw.len);
            if (rc == JSON_DEEP)
                die(ST_DATA, "payload nested deeper than %d levels", MAX_DEPTH);
            if (rc != JSON_OK)
                die(ST_DATA, "payload is not valid JSON");
            buf_str(&payload, ",\"payload\":");
            buf_add(&payload, s, raw.len);
        } else if (utf8) {
            buf_str(&payload, ",\"payload\":");
            buf_json_string(&payload, s, raw.len);
        } else { /* bytes: the handler gets them back as bytes */
            buf_str(&payload, ",\"payload_b64\":\"");
            buf_base64(&payload, s, raw.len);
            buf_str(&payload, "\"");
        }
        free(raw.p);
    }

    /* 2. the keys: K = ftok(key_file, proj_id), the reply queue at K + 0x01000000 */
    uint32_t key = o.key;
    if (key == 0) {
        key_t k = ftok(o.key_file, o.proj_id);
        if (k == -1 && errno == ENOENT)
            die(ST_UNAVAILABLE, "key file %s does not exist (the daemon creates it at its first "
                "start): is ipcd installed and started?", o.key_file);
        if (k == -1)
            die(errno == EACCES ? ST_CONFIG : ST_SOFTWARE, "key file %s: %s", o.key_file,
                strerror(errno));
        key = (uint32_t)k;
    }
    uint32_t reply_key = key + REPLY_KEY_OFFSET; /* unsigned: wraps modulo 2^32 */
    int qid = open_queue(key, "job queue");
    int rqid = o.wait ? open_queue(reply_key, "reply queue") : -1; /* before sending */

    /* 3. the envelope, "{\"ipcd\"" first */
    unsigned char rnd[8];
    char job_id[17];
    if (getentropy(rnd, sizeof rnd) != 0)
        die(ST_SOFTWARE, "getentropy: %s", strerror(errno));
    for (int i = 0; i < 8; i++)
        snprintf(job_id + 2 * i, 3, "%02x", rnd[i]);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    long pid = (long)getpid();
    struct buf body = {0};
    buf_fmt(&body, "{\"ipcd\":1,\"id\":\"%s\",\"submitted\":%lld.%06ld,\"pid\":%ld", job_id,
            (long long)wall.tv_sec, wall.tv_nsec / 1000, pid);
    if (o.wait)
        buf_fmt(&body, ",\"reply\":%ld", pid);
    if (o.job_timeout > 0) {
        buf_str(&body, ",\"timeout\":");
        buf_number(&body, o.job_timeout);
    }
    if (payload.len)
        buf_add(&body, payload.p, payload.len);
    buf_str(&body, "}");
    free(payload.p);
    size_t limit = msgmax();
    if (body.len > limit)
        die(ST_DATA, "message of %zu bytes exceeds the kernel's msgmax of %zu bytes", body.len,
            limit);

    /* 4. send; without --wait, print the id and stop */
    send_job(qid, key, o.type, &body, o.send_timeout);
    free(body.p);
    if (!o.wait) {
        printf("%s\n", job_id);
        return ST_OK;
    }

    /* 5. wait for the notice, then read the result; at the deadline, look once more */
    double deadline = now() + o.timeout;
    for (;;) {
        double left = deadline - now();
        int notified = wait_notice(rqid, reply_key, job_id, left > 0 ? left : 0);
        struct result r = find_result(key, job_id);
        if (r.found)
            return print_result(&r, job_id);
        if (!notified)
            die(ST_TIMEOUT, "no result for job %s within %gs%s", job_id, o.timeout,
                r.daemon_pid == 0
                    ? " (no daemon is serving the queue: the job waits for the next start)"
                    : "");
        /* notified, but the record is gone (evicted) or torn: wait for another */
    }
}
