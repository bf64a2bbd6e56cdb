// Where a process's host time goes: an LD_PRELOAD shim that counts and
// times the CUDA runtime calls llama.cpp's CUDA backend makes per step
// (kernel launches, graph launches and captures, copies, waits) and the
// llama.cpp / ggml entry points around them (llama_decode, the scheduler,
// each backend's graph compute, graph builds), for a device without nsys
// or perf. Only calls between libraries are seen. Built and used on the NVIDIA machine:
//   gcc -O2 -shared -fPIC -o libcuda-api-trace.so cuda-api-trace.c -ldl
//   CUDA_API_TRACE_OUT=trace.txt LD_PRELOAD=$PWD/libcuda-api-trace.so bench ...
// At exit it writes one line per function: calls, total, mean, median and
// p90 host microseconds (bytes for copies; tokens for llama_decode), and the
// CUDA graphs' node counts. No CUDA headers: the declarations
// below follow the runtime's ABI (handles are pointers, enums ints, dim3
// three unsigned ints by value). Each wrapped name also gets its
// per-thread-default-stream twin (`_ptsz` / `_ptds`), whichever the backend
// was built with.
//
// CUDA_API_TRACE_KERNELS=1 adds device times: an event pair around every
// kernel and CUDA graph launch, read once the events have completed, summed
// per kernel (or graph) and per llama_decode batch size (tokens); the table
// lists, for each batch size with at least 20 decode calls, the device time
// per call. With GGML_CUDA_DISABLE_GRAPHS=1 each kernel is launched one by
// one: its launches per step are exact, but its interval includes the host's
// launch latency (the device waits for the host), so not its device cost.
// With CUDA graphs (llama.cpp's default) the interval should be the step's
// graph, but on an H200 with programmatic dependent launch on (llama.cpp's
// default on Hopper) it was implausible: 0.06 ms for a one-token graph whose
// step waits 1 ms for the device. PDL lets a kernel's successor start early
// and is the likely cause (unchecked): time graphs with GGML_CUDA_PDL=0. Launches made while
// a stream records a CUDA graph are not timed. The events add a few
// microseconds of host time per launch.
#define _GNU_SOURCE
#include <pthread.h>
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { unsigned x, y, z; } dim3_t;
typedef int err_t;

enum {
    F_LAUNCH, F_LAUNCH_EX, F_GRAPH_LAUNCH, F_GRAPH_UPDATE, F_GRAPH_INST, F_BEGIN_CAPTURE,
    F_END_CAPTURE, F_MEMCPY_ASYNC_H2D, F_MEMCPY_ASYNC_D2H, F_MEMCPY_ASYNC_D2D, F_MEMCPY,
    F_MEMSET_ASYNC, F_STREAM_SYNC, F_STREAM_SYNC_PT, F_EVENT_RECORD, F_STREAM_WAIT_EVENT, F_EVENT_SYNC,
    F_DEVICE_SYNC, F_SET_DEVICE, F_GET_DEVICE,
    // llama.cpp and ggml entry points (exported; called across libraries)
    F_LLAMA_DECODE, F_SCHED_COMPUTE, F_SCHED_ALLOC, F_SCHED_RESET, F_COMPUTE_CUDA,
    F_COMPUTE_CPU, F_COMPUTE_OTHER, F_TENSOR_COPY, F_TENSOR_SET, F_MUL_MAT, F_N
};
static const char *names[F_N] = {
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaGraphExecUpdate",
    "cudaGraphInstantiate", "cudaStreamBeginCapture", "cudaStreamEndCapture",
    "cudaMemcpyAsync H2D", "cudaMemcpyAsync D2H", "cudaMemcpyAsync D2D/other", "cudaMemcpy",
    "cudaMemsetAsync", "cudaStreamSynchronize", "cudaStreamSynchronize(per-thread)", "cudaEventRecord", "cudaStreamWaitEvent",
    "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaSetDevice", "cudaGetDevice",
    "llama_decode", "ggml_backend_sched_graph_compute_async", "ggml_backend_sched_alloc_graph",
    "ggml_backend_sched_reset", "ggml_backend_graph_compute_async CUDA",
    "ggml_backend_graph_compute_async CPU", "ggml_backend_graph_compute_async other",
    "ggml_backend_tensor_copy", "ggml_backend_tensor_set", "ggml_mul_mat (graph builds)",
};
static _Atomic unsigned long long calls[F_N], nanos[F_N], bytes[F_N];

// A series of values (the first 1M), for its median, p90 and max.
#define MAX_SAMPLES (1u << 20)
struct series {
    unsigned *v; // allocated on the first value
    _Atomic unsigned n;
};
static void record(struct series *s, unsigned long long x) {
    if (!__atomic_load_n(&s->v, __ATOMIC_ACQUIRE)) {
        unsigned *p = calloc(MAX_SAMPLES, sizeof(unsigned));
        unsigned *expected = NULL;
        if (!__atomic_compare_exchange_n(&s->v, &expected, p, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) free(p);
    }
    unsigned i = atomic_fetch_add(&s->n, 1);
    if (i < MAX_SAMPLES) s->v[i] = x > 0xffffffffull ? 0xffffffffu : (unsigned)x;
}
static int cmp_u(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}
// Sorts the series (at exit); its number of values.
static unsigned sorted(struct series *s) {
    unsigned n = s->n < MAX_SAMPLES ? s->n : MAX_SAMPLES;
    if (!n || !s->v) return 0;
    qsort(s->v, n, sizeof(unsigned), cmp_u);
    return n;
}
// Each call's duration in nanoseconds (capped at ~4 s), for the median and
// p90: a run's totals hold one-time costs (lazy kernel loading, graph
// instantiation, prompt steps) that a steady step does not pay.
static struct series durations[F_N];
// The CUDA graphs' node counts.
static struct series graph_nodes;

static unsigned long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

// The runtime's own function: later in the global scope, or (a backend
// module loaded with dlopen keeps its libcudart local) from libcudart itself.
static void *real(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        static void *lib;
        static const char *sonames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so"};
        for (int i = 0; !lib && i < 3; i++) lib = dlopen(sonames[i], RTLD_NOW | RTLD_NOLOAD);
        for (int i = 0; !lib && i < 3; i++) lib = dlopen(sonames[i], RTLD_NOW);
        if (lib) f = dlsym(lib, name);
    }
    if (!f) {
        fprintf(stderr, "cuda-api-trace: %s not found\n", name);
        abort();
    }
    return f;
}

// One call of function `id` that began at `t0`.
static void account(int id, unsigned long long t0, unsigned long long nbytes) {
    unsigned long long d = now_ns() - t0;
    record(&durations[id], d);
    atomic_fetch_add(&nanos[id], d);
    atomic_fetch_add(&calls[id], 1);
    atomic_fetch_add(&bytes[id], nbytes);
}

#define TIMED(id, nbytes, call)             \
    unsigned long long t0_ = now_ns();      \
    err_t r_ = call;                        \
    account(id, t0_, (unsigned long long)(nbytes)); \
    return r_;

// Each wrapper exists under NAME and NAME_ptsz / NAME_ptds; every copy
// forwards to the runtime's function of its own name.
#define WRAP(ret_id, fname, params, args, nbytes)                            \
    err_t fname params {                                                     \
        static err_t (*f) params;                                           \
        if (!f) f = real(#fname);                                            \
        TIMED(ret_id, nbytes, f args)                                        \
    }

#define WRAP3(id, base, params, args, nbytes) \
    WRAP(id, base, params, args, nbytes)      \
    WRAP(id, base##_ptsz, params, args, nbytes) \
    WRAP(id, base##_ptds, params, args, nbytes)

// Kernel device times (CUDA_API_TRACE_KERNELS=1).
static int kernel_times = -1;
static __thread int decode_tokens; // the batch size of the llama_decode running on this thread
#define MAX_TOKENS 1024
static _Atomic unsigned long long decodes_by_tokens[MAX_TOKENS + 1];
struct kernel_stat {
    const void *fn;
    int tokens;
    unsigned long long launches;
    double gpu_us;
};
#define KSTATS 8192
static struct kernel_stat kstats[KSTATS];
struct pending {
    const void *fn;
    int tokens;
    void *e0, *e1;
};
#define MAX_PENDING 65536
static struct pending pend[MAX_PENDING];
static unsigned n_pend;
static void *event_pool[MAX_PENDING * 2];
static unsigned n_events;
static pthread_mutex_t kmu = PTHREAD_MUTEX_INITIALIZER;
static err_t (*ev_create)(void **), (*ev_record)(void *, void *), (*ev_query)(void *),
    (*ev_elapsed)(float *, void *, void *), (*ev_sync)(void *);

static int kernels_on(void) {
    if (kernel_times < 0) {
        const char *v = getenv("CUDA_API_TRACE_KERNELS");
        kernel_times = v && *v == '1';
        if (kernel_times) {
            ev_create = real("cudaEventCreate");
            ev_record = real("cudaEventRecord");
            ev_query = real("cudaEventQuery");
            ev_elapsed = real("cudaEventElapsedTime");
            ev_sync = real("cudaEventSynchronize");
        }
    }
    return kernel_times;
}
static void *take_event(void) {
    if (n_events) return event_pool[--n_events];
    void *e = NULL;
    ev_create(&e);
    return e;
}
static void add_kernel(const void *fn, int tokens, double us) {
    size_t h = ((size_t)fn >> 4) * 31u + (size_t)tokens;
    for (unsigned i = 0; i < KSTATS; i++) {
        struct kernel_stat *k = &kstats[(h + i) % KSTATS];
        if (!k->fn) {
            k->fn = fn;
            k->tokens = tokens;
        }
        if (k->fn == fn && k->tokens == tokens) {
            k->launches++;
            k->gpu_us += us;
            return;
        }
    }
}
// Reads the pending pairs whose events have completed (all of them when
// `wait`), keeping the rest in order; called with kmu held.
static void drain(int wait) {
    unsigned keep = 0;
    for (unsigned i = 0; i < n_pend; i++) {
        struct pending *p = &pend[i];
        if (wait) ev_sync(p->e1);
        else if (ev_query(p->e1) != 0) {
            pend[keep++] = *p;
            continue;
        }
        float ms = 0;
        ev_elapsed(&ms, p->e0, p->e1);
        add_kernel(p->fn, p->tokens, ms * 1e3);
        event_pool[n_events++] = p->e0;
        event_pool[n_events++] = p->e1;
    }
    n_pend = keep;
}
// Before a launch on stream `s`: its start event (NULL when not timing).
static void *kernel_begin(void *s) {
    if (!kernels_on()) return NULL;
    // Not while the stream records a CUDA graph (no event queries then).
    static err_t (*capturing)(void *, int *);
    if (!capturing) capturing = real("cudaStreamIsCapturing");
    int st = 0;
    if (capturing(s, &st) != 0 || st != 0) return NULL;
    pthread_mutex_lock(&kmu);
    if (n_pend + 1 >= MAX_PENDING) drain(1);
    void *e0 = take_event();
    pthread_mutex_unlock(&kmu);
    ev_record(e0, s);
    return e0;
}
static void kernel_end(void *e0, const void *fn, void *s) {
    if (!e0) return;
    pthread_mutex_lock(&kmu);
    void *e1 = take_event();
    ev_record(e1, s);
    pend[n_pend++] = (struct pending){fn, decode_tokens, e0, e1};
    if (n_pend % 256 == 0) drain(0);
    pthread_mutex_unlock(&kmu);
}

// A launch on stream `s`, timed on the host as `id` and, with
// CUDA_API_TRACE_KERNELS=1, on the device as `fn` (a kernel or GRAPH_FN).
#define TIMED_LAUNCH(id, fn, s, call)   \
    void *e0_ = kernel_begin(s);        \
    unsigned long long t0_ = now_ns();  \
    err_t r_ = call;                    \
    account(id, t0_, 0);                \
    kernel_end(e0_, fn, s);             \
    return r_;

#define WRAP_LAUNCH(fname)                                                              \
    err_t fname(const void *fn, dim3_t g, dim3_t b, void **a, size_t sh, void *s) {     \
        static err_t (*f)(const void *, dim3_t, dim3_t, void **, size_t, void *);      \
        if (!f) f = real(#fname);                                                       \
        TIMED_LAUNCH(F_LAUNCH, fn, s, f(fn, g, b, a, sh, s))                            \
    }
WRAP_LAUNCH(cudaLaunchKernel)
WRAP_LAUNCH(cudaLaunchKernel_ptsz)
// cudaLaunchConfig_t: dim3 grid, dim3 block, size_t shared memory, stream, ...
struct launch_config {
    dim3_t g, b;
    size_t sh;
    void *stream;
};
#define WRAP_LAUNCH_EX(fname)                                                           \
    err_t fname(const void *cfg, const void *fn, void **a) {                           \
        static err_t (*f)(const void *, const void *, void **);                        \
        if (!f) f = real(#fname);                                                       \
        void *s = ((const struct launch_config *)cfg)->stream;                          \
        TIMED_LAUNCH(F_LAUNCH_EX, fn, s, f(cfg, fn, a))                                 \
    }
WRAP_LAUNCH_EX(cudaLaunchKernelExC)
WRAP_LAUNCH_EX(cudaLaunchKernelExC_ptsz)
// A CUDA graph's launch, timed like a kernel (its device time: the whole
// graph, from its stream reaching it to its last node).
#define GRAPH_FN ((const void *)1)
#define WRAP_GRAPH_LAUNCH(fname)                                                        \
    err_t fname(void *exec, void *s) {                                                  \
        static err_t (*f)(void *, void *);                                              \
        if (!f) f = real(#fname);                                                       \
        TIMED_LAUNCH(F_GRAPH_LAUNCH, GRAPH_FN, s, f(exec, s))                           \
    }
WRAP_GRAPH_LAUNCH(cudaGraphLaunch)
WRAP_GRAPH_LAUNCH(cudaGraphLaunch_ptsz)
WRAP(F_GRAPH_UPDATE, cudaGraphExecUpdate, (void *exec, void *g, void *info), (exec, g, info), 0)
WRAP(F_GRAPH_INST, cudaGraphInstantiate, (void **exec, void *g, unsigned long long fl), (exec, g, fl), 0)
WRAP3(F_BEGIN_CAPTURE, cudaStreamBeginCapture, (void *s, int mode), (s, mode), 0)
WRAP3(F_END_CAPTURE, cudaStreamEndCapture, (void *s, void **g), (s, g), 0)
WRAP3(F_MEMSET_ASYNC, cudaMemsetAsync, (void *p, int v, size_t n, void *s), (p, v, n, s), n)
// The per-thread default stream (handle 2): ggml's synchronous tensor copies.
#define WRAP_SYNC(fname)                                                 \
    err_t fname(void *s) {                                               \
        static err_t (*f)(void *);                                       \
        if (!f) f = real(#fname);                                        \
        TIMED(s == (void *)2 ? F_STREAM_SYNC_PT : F_STREAM_SYNC, 0, f(s)) \
    }
WRAP_SYNC(cudaStreamSynchronize)
WRAP_SYNC(cudaStreamSynchronize_ptsz)
WRAP_SYNC(cudaStreamSynchronize_ptds)
WRAP3(F_EVENT_RECORD, cudaEventRecord, (void *e, void *s), (e, s), 0)
WRAP3(F_STREAM_WAIT_EVENT, cudaStreamWaitEvent, (void *s, void *e, unsigned fl), (s, e, fl), 0)
WRAP(F_EVENT_SYNC, cudaEventSynchronize, (void *e), (e), 0)
WRAP(F_DEVICE_SYNC, cudaDeviceSynchronize, (void), (), 0)
WRAP(F_SET_DEVICE, cudaSetDevice, (int d), (d), 0)
WRAP(F_GET_DEVICE, cudaGetDevice, (int *d), (d), 0)
WRAP3(F_MEMCPY, cudaMemcpy, (void *d, const void *s, size_t n, int k), (d, s, n, k), n)

// Copies split by direction (kind: 1 host to device, 2 device to host).
#define WRAP_COPY(fname)                                                                 \
    err_t fname(void *d, const void *src, size_t n, int kind, void *s) {                \
        static err_t (*f)(void *, const void *, size_t, int, void *);                  \
        if (!f) f = real(#fname);                                                        \
        int id = kind == 1 ? F_MEMCPY_ASYNC_H2D : kind == 2 ? F_MEMCPY_ASYNC_D2H : F_MEMCPY_ASYNC_D2D; \
        TIMED(id, n, f(d, src, n, kind, s))                                              \
    }
WRAP_COPY(cudaMemcpyAsync)
WRAP_COPY(cudaMemcpyAsync_ptsz)
WRAP_COPY(cudaMemcpyAsync_ptds)

// llama.cpp / ggml: where a llama_decode's host time goes outside the CUDA
// runtime (batch and KV bookkeeping, graph build, scheduler, CPU split).
typedef struct {
    int n_tokens;
    void *token, *embd, *pos, *n_seq_id, *seq_id, *logits;
} llama_batch_t;

// A decode of `n` tokens: its kernels are counted under its batch size.
#define TIMED_DECODE(n, call)                                                  \
    int t_ = (n) < 0 ? 0 : (n) > MAX_TOKENS ? MAX_TOKENS : (n);                \
    decode_tokens = t_;                                                        \
    atomic_fetch_add(&decodes_by_tokens[t_], 1);                               \
    unsigned long long t0_ = now_ns();                                         \
    err_t r_ = call;                                                           \
    account(F_LLAMA_DECODE, t0_, (unsigned long long)(n));                     \
    decode_tokens = 0;                                                         \
    return r_;

err_t llama_decode(void *ctx, llama_batch_t b) {
    static err_t (*f)(void *, llama_batch_t);
    if (!f) f = real("llama_decode");
    TIMED_DECODE(b.n_tokens, f(ctx, b))
}
// Newer tools (llama-batched-bench) decode through llama_process with an
// opaque llama_batch_ext: its tokens are counted as they are added.
static __thread int batch_ext_tokens;
void llama_batch_ext_clear(void *batch) {
    static void (*f)(void *);
    if (!f) f = real("llama_batch_ext_clear");
    batch_ext_tokens = 0;
    f(batch);
}
int llama_batch_ext_add(void *batch, int seq) {
    static int (*f)(void *, int);
    if (!f) f = real("llama_batch_ext_add");
    batch_ext_tokens++;
    return f(batch, seq);
}
int llama_batch_ext_add_token(void *batch, int seq, int token) {
    static int (*f)(void *, int, int);
    if (!f) f = real("llama_batch_ext_add_token");
    batch_ext_tokens++;
    return f(batch, seq, token);
}
err_t llama_process(void *ctx, int type, void *batch) {
    static err_t (*f)(void *, int, void *);
    if (!f) f = real("llama_process");
    TIMED_DECODE(batch_ext_tokens, f(ctx, type, batch))
}
WRAP(F_SCHED_COMPUTE, ggml_backend_sched_graph_compute_async, (void *sched, void *g), (sched, g), 0)
WRAP(F_TENSOR_COPY, ggml_backend_tensor_copy, (void *src, void *dst), (src, dst), 0)

_Bool ggml_backend_sched_alloc_graph(void *sched, void *g) {
    static _Bool (*f)(void *, void *);
    if (!f) f = real("ggml_backend_sched_alloc_graph");
    TIMED(F_SCHED_ALLOC, 0, f(sched, g))
}

#define TIMED_VOID(id, nbytes, call)   \
    unsigned long long t0_ = now_ns(); \
    call;                              \
    account(id, t0_, (unsigned long long)(nbytes));

void ggml_backend_sched_reset(void *sched) {
    static void (*f)(void *);
    if (!f) f = real("ggml_backend_sched_reset");
    TIMED_VOID(F_SCHED_RESET, 0, f(sched))
}

void ggml_backend_tensor_set(void *t, const void *data, size_t offset, size_t size) {
    static void (*f)(void *, const void *, size_t, size_t);
    if (!f) f = real("ggml_backend_tensor_set");
    TIMED_VOID(F_TENSOR_SET, size, f(t, data, offset, size))
}

void *ggml_mul_mat(void *ctx, void *a, void *b) {
    static void *(*f)(void *, void *, void *);
    if (!f) f = real("ggml_mul_mat");
    atomic_fetch_add(&calls[F_MUL_MAT], 1);
    return f(ctx, a, b);
}

// Split by backend: the CUDA module's graph compute (host side: property
// checks, graph launch) and the CPU backend's (the token embeddings stay on
// the CPU in llama.cpp).
int ggml_backend_graph_compute_async(void *backend, void *g) {
    static int (*f)(void *, void *);
    static const char *(*name)(void *);
    if (!f) f = real("ggml_backend_graph_compute_async");
    if (!name) name = real("ggml_backend_name");
    const char *n = name(backend);
    int id = strncmp(n, "CUDA", 4) == 0 ? F_COMPUTE_CUDA : strncmp(n, "CPU", 3) == 0 ? F_COMPUTE_CPU : F_COMPUTE_OTHER;
    if (id == F_COMPUTE_CUDA) {
        // struct ggml_cgraph begins { int size; int n_nodes; ... }
        record(&graph_nodes, (unsigned)((const int *)g)[1]);
    }
    TIMED(id, 0, f(backend, g))
}

static int cmp_gpu(const void *a, const void *b) {
    double x = (*(struct kernel_stat *const *)a)->gpu_us, y = (*(struct kernel_stat *const *)b)->gpu_us;
    return x < y ? 1 : x > y ? -1 : 0;
}
// Per batch size with >= 20 decode calls: each kernel's device time per call.
static void report_kernels(FILE *o) {
    // The kernel's name from the runtime when it knows it (else its
    // library offset, resolved from the symbol table by device.sh kernels).
    err_t (*get_name)(const char **, const void *) = dlsym(RTLD_DEFAULT, "cudaFuncGetName");
    pthread_mutex_lock(&kmu);
    drain(1);
    pthread_mutex_unlock(&kmu);
    static struct kernel_stat *rows[KSTATS];
    for (int t = 0; t <= MAX_TOKENS; t++) {
        unsigned long long d = decodes_by_tokens[t];
        if (d < 20) continue;
        unsigned n = 0;
        double total = 0;
        unsigned long long launches = 0;
        for (unsigned i = 0; i < KSTATS; i++)
            if (kstats[i].fn && kstats[i].tokens == t) {
                rows[n++] = &kstats[i];
                total += kstats[i].gpu_us;
                launches += kstats[i].launches;
            }
        if (!n) continue;
        qsort(rows, n, sizeof rows[0], cmp_gpu);
        fprintf(o, "\nkernels in llama_decode of %d tokens: %llu calls, %.1f launches and %.1f us of device time per call\n",
                t, d, launches / (double)d, total / d);
        fprintf(o, "%10s %10s %10s  %s\n", "us/call", "launch/call", "us/launch", "kernel");
        for (unsigned i = 0; i < n && i < 25; i++) {
            const char *nm = NULL;
            char buf[512];
            Dl_info info;
            if (rows[i]->fn == GRAPH_FN) {
                nm = "(CUDA graph launch)";
            } else if (get_name && get_name(&nm, rows[i]->fn) == 0 && nm) {
            } else if (dladdr(rows[i]->fn, &info) && info.dli_fname) {
                // Resolved afterwards from the library's symbol table (device.sh kernels).
                const char *base = strrchr(info.dli_fname, '/');
                snprintf(buf, sizeof buf, "%s+0x%lx", base ? base + 1 : info.dli_fname,
                         (unsigned long)((const char *)rows[i]->fn - (const char *)info.dli_fbase));
                nm = info.dli_sname ? info.dli_sname : buf;
            }
            fprintf(o, "%10.2f %10.2f %10.2f  %.160s\n", rows[i]->gpu_us / d, rows[i]->launches / (double)d,
                    rows[i]->gpu_us / rows[i]->launches, nm ? nm : "?");
        }
    }
}

__attribute__((destructor)) static void report(void) {
    // Child processes (probes the program starts) inherit the shim: only a
    // process that made traced calls writes its table.
    unsigned long long any = 0;
    for (int i = 0; i < F_N; i++) any += calls[i];
    if (!any) return;
    const char *path = getenv("CUDA_API_TRACE_OUT");
    FILE *o = path ? fopen(path, "w") : stderr;
    if (!o) o = stderr;
    fprintf(o, "%-40s %9s %12s %9s %9s %9s %12s\n", "function", "calls", "total us", "mean us",
            "median us", "p90 us", "bytes");
    for (int i = 0; i < F_N; i++) {
        unsigned long long c = calls[i];
        if (!c) continue;
        double med = 0, p90 = 0;
        unsigned n = sorted(&durations[i]);
        if (n) {
            med = durations[i].v[n / 2] / 1e3;
            p90 = durations[i].v[(unsigned)(n * 0.9)] / 1e3;
        }
        fprintf(o, "%-40s %9llu %12.1f %9.3f %9.3f %9.3f %12llu\n", names[i], c, nanos[i] / 1e3,
                nanos[i] / 1e3 / (double)c, med, p90, (unsigned long long)bytes[i]);
    }
    unsigned g = sorted(&graph_nodes);
    if (g) {
        fprintf(o, "CUDA graph nodes per compute: median %u, max %u\n", graph_nodes.v[g / 2],
                graph_nodes.v[g - 1]);
    }
    if (kernel_times == 1) report_kernels(o);
    if (o != stderr) fclose(o);
}
