/* kiln_run.c: load a Kiln artifact (model.so), check that it can run on this machine, run it
 * once on raw input files and write raw output files.
 *
 *   kiln_run MODEL.so IN_DIR OUT_DIR [THREADS]
 *
 * IN_DIR holds input_0.bin, input_1.bin, ... (one per model input, in graph order): the
 * tensor's dense row-major bytes, little-endian, exactly the tensor's byte size. The program
 * writes OUT_DIR/output_N.bin the same way and prints one line per output. THREADS defaults
 * to the number of online CPUs.
 *
 * Exit status: 0 on success; 1 on an error (bad arguments, unreadable files, kiln_run
 * failure); 2 when the artifact cannot run on this machine (ABI version, target or a missing
 * CPU feature), instead of crashing on an illegal instruction.
 *
 * This file is also the example of how an app uses the C ABI of include/kiln.h directly:
 * dlopen, the checks, a 64-byte aligned workspace, and a kiln_host whose parallel_for runs on
 * a small persistent pthread pool. C99 + POSIX; needs only libc, libdl and pthreads.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
/* Linux arm64 hwcap bits (asm/hwcap.h), in case the libc headers are older. */
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1UL << 10)
#endif
#ifndef HWCAP_ASIMDRDM
#define HWCAP_ASIMDRDM (1UL << 12)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP_SVE
#define HWCAP_SVE (1UL << 22)
#endif
#ifndef HWCAP2_SVE2
#define HWCAP2_SVE2 (1UL << 1)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#ifndef HWCAP2_BF16
#define HWCAP2_BF16 (1UL << 14)
#endif
#endif

#include "../include/kiln.h"

#define EXIT_ERROR 1
#define EXIT_CANNOT_RUN 2
#define WORKSPACE_ALIGN 64
#define MAX_PATH_LEN 4096

#if defined(__x86_64__)
#define HOST_ARCH "x86_64"
#define HOST_ELF_MACHINE 62
#elif defined(__aarch64__)
#define HOST_ARCH "aarch64"
#define HOST_ELF_MACHINE 183
#else
#define HOST_ARCH "unknown"
#define HOST_ELF_MACHINE 0
#endif

/* ---- messages ---------------------------------------------------------------------------- */

#if defined(__GNUC__)
#define NORETURN __attribute__((noreturn))
#define PRINTF_LIKE __attribute__((format(printf, 2, 3)))
#else
#define NORETURN
#define PRINTF_LIKE
#endif

/* Prints "kiln_run: MESSAGE" on stderr and exits with `status`. */
static NORETURN PRINTF_LIKE void die(int status, const char *fmt, ...);
static void die(int status, const char *fmt, ...) {
    va_list ap;
    fputs("kiln_run: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

/* ---- CPU features ------------------------------------------------------------------------ */

/* The feature names an artifact may list in kiln_required_features(); same tables as the Rust
 * runtime (runtime/src/cpu.rs). Features of the other architecture are known but absent. */
static const char *const x86_64_features[] = {
    "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx",
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni", NULL};
static const char *const aarch64_features[] = {
    "neon", "asimd", "fp16", "rdm", "dotprod", "i8mm", "bf16", "sve", "sve2", NULL};

static int in_list(const char *const *list, const char *name) {
    for (; *list; list++)
        if (strcmp(*list, name) == 0) return 1;
    return 0;
}

/* 1: this CPU has the feature; 0: it lacks it; -1: unknown feature name. */
static int cpu_has(const char *f) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!strcmp(f, "sse2")) return __builtin_cpu_supports("sse2") != 0;
    if (!strcmp(f, "sse3")) return __builtin_cpu_supports("sse3") != 0;
    if (!strcmp(f, "ssse3")) return __builtin_cpu_supports("ssse3") != 0;
    if (!strcmp(f, "sse4.1")) return __builtin_cpu_supports("sse4.1") != 0;
    if (!strcmp(f, "sse4.2")) return __builtin_cpu_supports("sse4.2") != 0;
    if (!strcmp(f, "popcnt")) return __builtin_cpu_supports("popcnt") != 0;
    if (!strcmp(f, "avx")) return __builtin_cpu_supports("avx") != 0;
    if (!strcmp(f, "avx2")) return __builtin_cpu_supports("avx2") != 0;
    if (!strcmp(f, "fma")) return __builtin_cpu_supports("fma") != 0;
    if (!strcmp(f, "f16c")) return __builtin_cpu_supports("f16c") != 0;
    if (!strcmp(f, "avx512f")) return __builtin_cpu_supports("avx512f") != 0;
    if (!strcmp(f, "avx512bw")) return __builtin_cpu_supports("avx512bw") != 0;
    if (!strcmp(f, "avx512vl")) return __builtin_cpu_supports("avx512vl") != 0;
    if (!strcmp(f, "avx512vnni")) return __builtin_cpu_supports("avx512vnni") != 0;
    if (!strcmp(f, "avxvnni")) return __builtin_cpu_supports("avxvnni") != 0;
#elif defined(__aarch64__) && defined(__linux__)
    unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (!strcmp(f, "neon") || !strcmp(f, "asimd")) return (hw & HWCAP_ASIMD) != 0;
    if (!strcmp(f, "fp16")) return (hw & HWCAP_ASIMDHP) != 0;
    if (!strcmp(f, "rdm")) return (hw & HWCAP_ASIMDRDM) != 0;
    if (!strcmp(f, "dotprod")) return (hw & HWCAP_ASIMDDP) != 0;
    if (!strcmp(f, "sve")) return (hw & HWCAP_SVE) != 0;
    if (!strcmp(f, "sve2")) return (hw2 & HWCAP2_SVE2) != 0;
    if (!strcmp(f, "i8mm")) return (hw2 & HWCAP2_I8MM) != 0;
    if (!strcmp(f, "bf16")) return (hw2 & HWCAP2_BF16) != 0;
#endif
    if (in_list(x86_64_features, f) || in_list(aarch64_features, f)) return 0;
    return -1;
}

static void require_feature(const char *path, const char *f) {
    int has = cpu_has(f);
    if (has == 0)
        die(EXIT_CANNOT_RUN,
            "%s: artifact needs CPU feature %s, which this CPU lacks (running it would crash "
            "with an illegal instruction)",
            path, f);
    if (has < 0)
        die(EXIT_CANNOT_RUN,
            "%s: artifact needs unknown CPU feature '%s'; refusing to run it (a missing "
            "feature would crash with an illegal instruction)",
            path, f);
}

/* The CPU targets: architecture and the features the name implies (as runtime/src/cpu.rs). */
static const struct {
    const char *name, *arch, *implied;
} cpu_targets[] = {
    {"x86_64", "x86_64", ""},
    {"x86_64-v3", "x86_64", "avx,avx2,fma"},
    {"x86_64-v3-vnni", "x86_64", "avx,avx2,fma,avxvnni"},
    {"aarch64-neon", "aarch64", "neon"},
    {"aarch64-neon-dotprod", "aarch64", "neon,dotprod"},
    {"aarch64-sve", "aarch64", "sve"},
};

/* Checks the target name and every feature it implies or lists (comma separated). */
static void check_target_and_features(const char *path, const char *target,
                                      const char *features) {
    const char *arch = NULL, *implied = "";
    char buf[1024], *item, *save = NULL;
    size_t t;

    for (t = 0; t < sizeof cpu_targets / sizeof cpu_targets[0]; t++) {
        if (!strcmp(target, cpu_targets[t].name)) {
            arch = cpu_targets[t].arch;
            implied = cpu_targets[t].implied;
        }
    }
    if (!arch && !strncmp(target, "cuda-", 5))
        die(EXIT_CANNOT_RUN, "%s: artifact targets %s, a CUDA GPU; this CPU harness cannot run it",
            path, target);
    if (!arch)
        die(EXIT_CANNOT_RUN, "%s: unknown target '%s'", path, target);

    if (strcmp(arch, HOST_ARCH) != 0)
        die(EXIT_CANNOT_RUN, "%s: artifact was built for target %s, but this host is %s", path,
            target, HOST_ARCH);

    if (snprintf(buf, sizeof buf, "%s,%s", features, implied) >= (int)sizeof buf)
        die(EXIT_ERROR, "%s: kiln_required_features() is too long", path);
    for (item = strtok_r(buf, ", ", &save); item; item = strtok_r(NULL, ", ", &save))
        require_feature(path, item);
}

/* dlopen's message for an artifact of another architecture is obscure; say it plainly. */
static void check_elf_machine(const char *file, const char *path) {
    unsigned char h[20];
    FILE *f = fopen(file, "rb");
    size_t got;
    if (!f) die(EXIT_ERROR, "cannot open %s: %s", path, strerror(errno));
    got = fread(h, 1, sizeof h, f);
    fclose(f);
    if (got == sizeof h && !memcmp(h, "\177ELF", 4) && h[5] == 1) {
        unsigned machine = h[18] | (unsigned)h[19] << 8;
        if (HOST_ELF_MACHINE && machine != HOST_ELF_MACHINE)
            die(EXIT_CANNOT_RUN, "%s: artifact is an ELF file for %s, but this host is %s", path,
                machine == 62 ? "x86_64" : machine == 183 ? "aarch64" : "another machine",
                HOST_ARCH);
    }
}

/* ---- the artifact's functions ------------------------------------------------------------ */

typedef struct artifact {
    uint32_t (*abi_version)(void);
    const char *(*target)(void);
    const char *(*required_features)(void);
    int32_t (*num_inputs)(void);
    int32_t (*num_outputs)(void);
    const kiln_tensor_info *(*input_info)(int32_t);
    const kiln_tensor_info *(*output_info)(int32_t);
    uint64_t (*workspace_size)(void);
    int32_t (*run)(const kiln_host *, const void *const *, void *const *, void *);
    const char *(*error_string)(int32_t);
} artifact;

/* POSIX guarantees that a dlsym result converts to a function pointer; copying the bytes
 * keeps ISO C compilers quiet about it. */
#define LOAD(field, name)                                                                       \
    do {                                                                                        \
        void *sym_ = dlsym(lib, name);                                                          \
        if (!sym_) die(EXIT_ERROR, "%s is not a Kiln artifact: it does not export %s", path,    \
                       name);                                                                   \
        memcpy(&a->field, &sym_, sizeof sym_);                                                  \
    } while (0)

static void load_symbols(void *lib, const char *path, artifact *a) {
    LOAD(abi_version, "kiln_abi_version");
    LOAD(target, "kiln_target");
    LOAD(required_features, "kiln_required_features");
    LOAD(num_inputs, "kiln_num_inputs");
    LOAD(num_outputs, "kiln_num_outputs");
    LOAD(input_info, "kiln_input_info");
    LOAD(output_info, "kiln_output_info");
    LOAD(workspace_size, "kiln_workspace_size");
    LOAD(run, "kiln_run");
    LOAD(error_string, "kiln_error_string");
}

/* ---- tensors ----------------------------------------------------------------------------- */

static const char *dtype_name(int32_t dtype) {
    switch (dtype) {
    case 1: return "float32";
    case 2: return "uint8";
    case 3: return "int8";
    case 4: return "uint16";
    case 5: return "int16";
    case 6: return "int32";
    case 7: return "int64";
    case 9: return "bool";
    case 10: return "float16";
    case 11: return "float64";
    case 12: return "uint32";
    case 13: return "uint64";
    case 16: return "bfloat16";
    case 21: return "uint4";
    case 22: return "int4";
    default: return NULL;
    }
}

static int dtype_bits(int32_t dtype) {
    switch (dtype) {
    case 21: case 22: return 4;
    case 2: case 3: case 9: return 8;
    case 4: case 5: case 10: case 16: return 16;
    case 1: case 6: case 12: return 32;
    case 7: case 11: case 13: return 64;
    default: return 0;
    }
}

/* Bytes of the tensor's dense buffer (int4/uint4: two per byte, rounded up). */
static size_t tensor_bytes(const char *path, const char *kind, int i, const kiln_tensor_info *t) {
    uint64_t elems = 1;
    int d, bits = t ? dtype_bits(t->dtype) : 0;
    if (!t || t->rank < 0 || t->rank > KILN_MAX_RANK)
        die(EXIT_ERROR, "%s: malformed info for %s %d", path, kind, i);
    if (!bits) die(EXIT_ERROR, "%s: %s %d (%s) has unsupported dtype %d", path, kind, i, t->name,
                   (int)t->dtype);
    for (d = 0; d < t->rank; d++) {
        if (t->dims[d] < 0 || (t->dims[d] > 0 && elems > UINT64_MAX / 64 / (uint64_t)t->dims[d]))
            die(EXIT_ERROR, "%s: %s %d (%s) has a bad shape", path, kind, i, t->name);
        elems *= (uint64_t)t->dims[d];
    }
    if ((elems * bits + 7) / 8 > SIZE_MAX) die(EXIT_ERROR, "%s: %s %d is too large", path, kind, i);
    return (size_t)((elems * bits + 7) / 8);
}

static void print_info(FILE *f, const kiln_tensor_info *t) {
    int d;
    const char *name = dtype_name(t->dtype);
    if (name) fprintf(f, "%s: %s [", t->name, name);
    else fprintf(f, "%s: dtype %d [", t->name, (int)t->dtype);
    for (d = 0; d < t->rank; d++) fprintf(f, d ? ", %lld" : "%lld", (long long)t->dims[d]);
    fputc(']', f);
}

static void *aligned_buffer(size_t size) {
    void *p = NULL;
    /* Never zero bytes, so that the pointer is always valid. */
    if (posix_memalign(&p, WORKSPACE_ALIGN, size < WORKSPACE_ALIGN ? WORKSPACE_ALIGN : size))
        die(EXIT_ERROR, "out of memory allocating %zu bytes", size);
    memset(p, 0, size);
    return p;
}

static void read_file(const char *file, void *buf, size_t size, const kiln_tensor_info *t) {
    struct stat st;
    FILE *f;
    if (stat(file, &st) != 0) die(EXIT_ERROR, "cannot read %s: %s", file, strerror(errno));
    if ((uint64_t)st.st_size != (uint64_t)size) {
        fprintf(stderr, "kiln_run: %s has %lld bytes, but input ", file, (long long)st.st_size);
        print_info(stderr, t);
        fprintf(stderr, " needs %zu\n", size);
        exit(EXIT_ERROR);
    }
    f = fopen(file, "rb");
    if (!f || fread(buf, 1, size, f) != size) die(EXIT_ERROR, "cannot read %s", file);
    fclose(f);
}

static void write_file(const char *file, const void *buf, size_t size) {
    FILE *f = fopen(file, "wb");
    if (!f) die(EXIT_ERROR, "cannot create %s: %s", file, strerror(errno));
    if (fwrite(buf, 1, size, f) != size || fclose(f) != 0)
        die(EXIT_ERROR, "cannot write %s", file);
}

/* ---- parallel_for on a persistent pthread pool --------------------------------------------
 * One job at a time. The caller publishes (fn, ctx, n), wakes the workers and claims task
 * indices like them; it returns once every index has run and no worker is still inside the
 * job. A call made while a job is running (a task calling parallel_for) runs inline. */

typedef struct pool {
    pthread_mutex_t mu;
    pthread_cond_t work; /* workers wait for a job */
    pthread_cond_t done; /* the caller waits for the last worker */
    pthread_t *workers;
    int nworkers;
    kiln_task_fn fn; /* the published job; NULL when none */
    void *ctx;
    int64_t n, next;
    unsigned long generation;
    int active, busy, shutdown;
} pool;

/* Runs task indices until none are left; called and returns with the mutex held. */
static void run_tasks_locked(pool *p, kiln_task_fn fn, void *ctx, int64_t n) {
    while (p->next < n) {
        int64_t i = p->next++;
        pthread_mutex_unlock(&p->mu);
        fn(ctx, i);
        pthread_mutex_lock(&p->mu);
    }
}

static void *worker_main(void *arg) {
    pool *p = arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    while (!p->shutdown) {
        if (p->fn && p->generation != seen) {
            seen = p->generation;
            p->active++;
            run_tasks_locked(p, p->fn, p->ctx, p->n);
            if (--p->active == 0) pthread_cond_signal(&p->done);
        } else {
            pthread_cond_wait(&p->work, &p->mu);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void pool_parallel_for(void *user, int64_t n, kiln_task_fn fn, void *ctx) {
    pool *p = user;
    int64_t i;
    if (n <= 0 || !fn) return;
    pthread_mutex_lock(&p->mu);
    if (p->nworkers == 0 || n == 1 || p->busy) {
        pthread_mutex_unlock(&p->mu);
        for (i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    p->busy = 1;
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->next = 0;
    p->generation++;
    pthread_cond_broadcast(&p->work);
    run_tasks_locked(p, fn, ctx, n);
    p->fn = NULL; /* workers that wake up late must not join a finished job */
    while (p->active > 0) pthread_cond_wait(&p->done, &p->mu);
    p->busy = 0;
    pthread_mutex_unlock(&p->mu);
}

static void pool_start(pool *p, int threads) {
    int i;
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    p->workers = calloc((size_t)threads, sizeof *p->workers);
    if (!p->workers) die(EXIT_ERROR, "out of memory");
    for (i = 0; i < threads - 1; i++) {
        if (pthread_create(&p->workers[i], NULL, worker_main, p) != 0)
            die(EXIT_ERROR, "cannot start worker thread %d", i + 1);
        p->nworkers++;
    }
}

static void pool_stop(pool *p) {
    int i;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->nworkers; i++) pthread_join(p->workers[i], NULL);
    free(p->workers);
}

/* ---- main -------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    const char *model, *in_dir, *out_dir;
    char path[MAX_PATH_LEN], file[MAX_PATH_LEN];
    long threads;
    void *lib, *workspace;
    const void **inputs;
    void **outputs;
    size_t *out_sizes;
    artifact a;
    uint32_t abi;
    int32_t n_in, n_out, i, status;
    uint64_t ws_size;
    pool p;
    kiln_host host;

    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: kiln_run MODEL.so IN_DIR OUT_DIR [THREADS]\n");
        return EXIT_ERROR;
    }
    model = argv[1];
    in_dir = argv[2];
    out_dir = argv[3];
    threads = sysconf(_SC_NPROCESSORS_ONLN);
    if (argc == 5) {
        char *end;
        threads = strtol(argv[4], &end, 10);
        if (*end || threads < 1 || threads > 1024)
            die(EXIT_ERROR, "THREADS must be a number from 1 to 1024, got '%s'", argv[4]);
    }
    if (threads < 1) threads = 1;

    /* dlopen searches the library path for a name without '/': make it a path. */
    if (snprintf(path, sizeof path, "%s%s", strchr(model, '/') ? "" : "./", model) >=
        (int)sizeof path)
        die(EXIT_ERROR, "path too long: %s", model);
    check_elf_machine(path, model);
    lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) die(EXIT_ERROR, "cannot load %s: %s", model, dlerror());
    load_symbols(lib, model, &a);

    /* The checks, before any kernel runs. */
    abi = a.abi_version();
    if (abi != KILN_ABI_VERSION)
        die(EXIT_CANNOT_RUN, "%s: artifact has ABI version %u, but this harness expects %u", model,
            (unsigned)abi, (unsigned)KILN_ABI_VERSION);
    if (!a.target() || !a.required_features())
        die(EXIT_ERROR, "%s: kiln_target() or kiln_required_features() returned NULL", model);
    check_target_and_features(model, a.target(), a.required_features());

    n_in = a.num_inputs();
    n_out = a.num_outputs();
    if (n_in < 0 || n_out < 0) die(EXIT_ERROR, "%s: negative tensor count", model);
    inputs = calloc((size_t)n_in + 1, sizeof *inputs);
    outputs = calloc((size_t)n_out + 1, sizeof *outputs);
    out_sizes = calloc((size_t)n_out + 1, sizeof *out_sizes);
    if (!inputs || !outputs || !out_sizes) die(EXIT_ERROR, "out of memory");

    for (i = 0; i < n_in; i++) {
        const kiln_tensor_info *t = a.input_info(i);
        size_t size = tensor_bytes(model, "input", i, t);
        void *buf = aligned_buffer(size);
        if (snprintf(file, sizeof file, "%s/input_%d.bin", in_dir, (int)i) >= (int)sizeof file)
            die(EXIT_ERROR, "path too long: %s", in_dir);
        read_file(file, buf, size, t);
        inputs[i] = buf;
    }
    for (i = 0; i < n_out; i++) {
        out_sizes[i] = tensor_bytes(model, "output", i, a.output_info(i));
        outputs[i] = aligned_buffer(out_sizes[i]);
    }
    ws_size = a.workspace_size();
    if (ws_size > SIZE_MAX) die(EXIT_ERROR, "%s: workspace of %llu bytes is too large", model,
                                (unsigned long long)ws_size);
    workspace = aligned_buffer((size_t)ws_size);

    pool_start(&p, (int)threads);
    host.abi_version = KILN_ABI_VERSION;
    host.num_threads = (int32_t)threads;
    host.user = &p;
    host.parallel_for = pool_parallel_for;
    status = a.run(&host, inputs, outputs, workspace);
    pool_stop(&p);
    if (status != KILN_OK) {
        const char *msg = a.error_string(status);
        die(EXIT_ERROR, "%s: kiln_run failed with status %d: %s", model, (int)status,
            msg ? msg : "(no message)");
    }

    if (mkdir(out_dir, 0777) != 0 && errno != EEXIST)
        die(EXIT_ERROR, "cannot create %s: %s", out_dir, strerror(errno));
    for (i = 0; i < n_out; i++) {
        if (snprintf(file, sizeof file, "%s/output_%d.bin", out_dir, (int)i) >= (int)sizeof file)
            die(EXIT_ERROR, "path too long: %s", out_dir);
        write_file(file, outputs[i], out_sizes[i]);
        print_info(stdout, a.output_info(i));
        printf(" -> %s\n", file);
    }

    for (i = 0; i < n_in; i++) free((void *)inputs[i]);
    for (i = 0; i < n_out; i++) free(outputs[i]);
    free(inputs);
    free(outputs);
    free(out_sizes);
    free(workspace);
    dlclose(lib);
    return 0;
}
