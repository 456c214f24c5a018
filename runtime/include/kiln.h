/* kiln.h: the C ABI of a Kiln artifact (model.so).
 *
 * A Kiln artifact is a self-contained ELF shared object: it imports nothing and exports only
 * the functions below. Inputs and outputs are dense row-major buffers in graph order; dtype
 * codes are ONNX TensorProto.DataType numbers (1 = float32, 7 = int64, 10 = float16, ...).
 * kiln_run is reentrant for distinct workspaces. Everything a kernel needs from the outside
 * (threads, device launches, timing) comes through the kiln_host table passed to kiln_run.
 */
#ifndef KILN_H
#define KILN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KILN_ABI_VERSION 1u

#define KILN_OK 0
#define KILN_ERR_BAD_ARGUMENT 1
#define KILN_ERR_HOST 2

#define KILN_MAX_RANK 8

/* Describes one input or output. The struct holds no pointers (an artifact has no load-time
 * relocations): the dims are inline and the NUL-terminated name follows the struct. Artifacts
 * return pointers to their own read-only copies, valid while the library is loaded. */
typedef struct kiln_tensor_info {
    int32_t dtype;                 /* ONNX TensorProto.DataType code */
    int32_t rank;                  /* 0..KILN_MAX_RANK */
    int64_t dims[KILN_MAX_RANK];   /* the first `rank` entries are used, all static */
    char name[];                   /* ONNX value name, NUL-terminated */
} kiln_tensor_info;

/* Runs fn(ctx, i) for i in [0, n), possibly in parallel; returns when all calls are done. */
typedef void (*kiln_task_fn)(void *ctx, int64_t i);

typedef struct kiln_host {
    uint32_t abi_version; /* KILN_ABI_VERSION */
    int32_t num_threads;
    void *user;
    void (*parallel_for)(void *user, int64_t n, kiln_task_fn fn, void *ctx);
} kiln_host;

uint32_t kiln_abi_version(void);
const char *kiln_target(void);             /* e.g. "aarch64-neon-dotprod" */
const char *kiln_required_features(void);  /* comma separated, e.g. "neon,dotprod" */
int32_t kiln_num_inputs(void);
int32_t kiln_num_outputs(void);
const kiln_tensor_info *kiln_input_info(int32_t i);
const kiln_tensor_info *kiln_output_info(int32_t i);
uint64_t kiln_workspace_size(void);        /* bytes; caller allocates, 64-byte aligned */
int32_t kiln_run(const kiln_host *host,    /* may be NULL: single-threaded CPU */
                 const void *const *inputs, void *const *outputs, void *workspace);
const char *kiln_error_string(int32_t code);

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
