// llama-kv-backend.h: the external KV-backend C API (added by the hcattn patch series).
//
// An external KV backend owns the KV storage of every attention layer of a context and computes
// those layers' attention. llama.cpp keeps model loading, the rest of the graph and sampling.
// A backend is a table of function pointers (struct llama_kv_backend_iface) that a plugin returns
// from its exported `llama_kv_backend_init` symbol, or that an app registers itself with
// llama_kv_backend_register() when it links the backend statically.
//
// Rules both sides follow:
//   - plain C, raw pointers and byte strides only: the plugin never sees a ggml_tensor and never
//     links ggml or libllama;
//   - nothing unwinds across this boundary: errors are status codes plus a message;
//   - every pointer handed to the backend is valid only for the duration of the call.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef LLAMA_SHARED
#    if defined(_WIN32) && !defined(__MINGW32__)
#        ifdef LLAMA_BUILD
#            define LLAMA_KV_BACKEND_API __declspec(dllexport)
#        else
#            define LLAMA_KV_BACKEND_API __declspec(dllimport)
#        endif
#    else
#        define LLAMA_KV_BACKEND_API __attribute__ ((visibility ("default")))
#    endif
#else
#    define LLAMA_KV_BACKEND_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Bumped on any incompatible change of the structs or the table below.
#define LLAMA_KV_BACKEND_API_VERSION 2

// Name of the symbol a plugin library exports; its type is llama_kv_backend_init_fn.
#define LLAMA_KV_BACKEND_INIT_SYMBOL "llama_kv_backend_init"

// Sliding-window kinds, same values and semantics as llama.cpp's LLAMA_SWA_TYPE_*.
enum llama_kv_swa_type {
    LLAMA_KV_SWA_NONE      = 0,
    LLAMA_KV_SWA_STANDARD  = 1, // masked when p_query - p_key >= n_swa
    LLAMA_KV_SWA_CHUNKED   = 2, // masked when p_key < floor(p_query / n_swa) * n_swa
    LLAMA_KV_SWA_SYMMETRIC = 3, // masked when |p_query - p_key| > n_swa / 2
};

// One attention layer that the backend serves.
struct llama_kv_layer_desc {
    int32_t  il;            // model layer index (the `il` of attention calls)
    int32_t  n_head;        // query heads; query head h reads KV head h / (n_head / n_head_kv)
    int32_t  n_head_kv;     // KV heads
    int32_t  n_embd_head_k; // key (and query) head dimension
    int32_t  n_embd_head_v; // value head dimension
    int32_t  swa_type;      // enum llama_kv_swa_type; NONE for full-attention layers
    uint32_t n_swa;         // window size when swa_type != NONE
    const char * device;    // ggml device name of the layer ("CPU", "CUDA0", ...)
};

struct llama_kv_backend_config {
    uint32_t struct_size;   // sizeof(struct llama_kv_backend_config) as the caller compiled it
    const char * arch;      // model architecture name, e.g. "llama"
    const char * opts;      // the --kv-backend-opts string verbatim ("" when none)
    const char * model_path;// path of the model file when known, else NULL
    uint32_t n_ctx;         // total cells: n_ctx_seq for a unified cache, n_ctx_seq * n_seq_max otherwise
    uint32_t n_ctx_seq;     // most cells one sequence may hold
    uint32_t n_seq_max;     // sequences the context was sized for; ids are in [0, n_seq_max), or
                            // in [0, 256) (LLAMA_MAX_SEQ) when kv_unified
    uint32_t n_ubatch;      // most tokens in one ubatch
    uint32_t n_layer;       // layers in the model (including layers without attention)
    bool     kv_unified;    // llama.cpp's --kv-unified
    bool     no_alloc;      // allocate nothing; only report projected sizes (the -fit probe)
    int32_t  n_layer_kv;    // entries in `layers`
    const struct llama_kv_layer_desc * layers;
};

// The ubatch being prepared or applied. seq_id[i] lists the sequences token i belongs to;
// attention masks use its first one (seq_id[i][0]).
struct llama_kv_ubatch_view {
    uint32_t n_tokens;
    const int32_t * pos;            // [n_tokens]
    const int32_t * n_seq_id;       // [n_tokens]
    const int32_t * const * seq_id; // [n_tokens][n_seq_id[i]]
};

// One attention call: a layer and the ubatch committed by the last `apply`. All tensors are F32
// with contiguous rows; nb1 is the byte stride between heads, nb2 between tokens.
struct llama_kv_attn_call {
    int32_t  il;            // model layer index
    uint32_t n_tokens;
    bool     causal;        // false when the app turned causal attention off
    float    kq_scale;      // logit = kq_scale * <q, k>
    float    softcap;       // 0: off; else logit = softcap * tanh(logit / softcap)
    const float * q; size_t q_nb1, q_nb2; // [n_embd_head_k, n_head,    n_tokens]
    const float * k; size_t k_nb1, k_nb2; // [n_embd_head_k, n_head_kv, n_tokens] (post-RoPE)
    const float * v; size_t v_nb1, v_nb2; // [n_embd_head_v, n_head_kv, n_tokens]
    const float * sinks;    // [n_head] attention-sink logits, or NULL
    float * out;            // [n_embd_head_v * n_head, n_tokens], rows contiguous, heads concatenated
};

// State I/O callbacks. write never fails (llama.cpp sizes its buffer with a counting pass first);
// read returns false when fewer than n bytes are left.
typedef void (*llama_kv_write_fn)(void * io, const void * src, size_t n);
typedef bool (*llama_kv_read_fn) (void * io, void * dst, size_t n);

// Memory held by the backend. host/device/file say where the bytes are; fast and codebook say
// what part of them is the fast (key) tier, wherever it lives.
struct llama_kv_memory_usage {
    size_t host_bytes;      // host memory in all (keys and values on a CPU-only build)
    size_t device_bytes;    // accelerator memory in all (the fast tier on a GPU)
    size_t file_bytes;      // memory-mapped file tier
    size_t fast_bytes;      // the fast tier: keys (codes, exact rows) and codebooks
    size_t codebook_bytes;  // of which codebooks
};

// Status codes returned by the table's functions.
enum llama_kv_status {
    LLAMA_KV_OK       =  0,
    LLAMA_KV_NO_SPACE =  1, // prepare: the ubatches do not fit
    LLAMA_KV_ERROR    = -1, // see last_error
};

// The backend's function table. Entries marked (optional) may be NULL and say what NULL means.
struct llama_kv_backend_iface {
    uint32_t api_version;   // LLAMA_KV_BACKEND_API_VERSION the plugin was built against
    uint32_t struct_size;   // sizeof(struct llama_kv_backend_iface) as the plugin compiled it
    const char * name;      // short name, e.g. "hc"

    // Create a backend for one context. On failure return NULL and write a message into err.
    void * (*create)(const struct llama_kv_backend_config * cfg, char * err, size_t err_len);
    void   (*destroy)(void * be);
    // Last error message of this backend (empty when none); valid until the next call.
    const char * (*last_error)(void * be);

    // Dry run: would these ubatches, applied in order, fit? Changes nothing.
    int32_t (*prepare)(void * be, const struct llama_kv_ubatch_view * ubatches, int32_t n_ubatches);
    // Commit positions and sequence sets of the next ubatch; attention calls that follow use it.
    int32_t (*apply)(void * be, const struct llama_kv_ubatch_view * ubatch);

    // Store this ubatch's K and V of one layer. Called on every graph thread (ith in [0, nth));
    // each thread stores its own share. Runs before `attend` of the same layer and ubatch.
    // A graph op cannot fail: on an error return, llama.cpp fails the next batch with last_error.
    int32_t (*store)(void * be, const struct llama_kv_attn_call * call, int32_t ith, int32_t nth);
    // Attention of this ubatch's queries over every visible stored token of one layer. Called on
    // every graph thread; each thread writes its own share of `out`. Errors as for store.
    int32_t (*attend)(void * be, const struct llama_kv_attn_call * call, int32_t ith, int32_t nth);

    // clear(data): drop every cell; data = also zero the stored bytes.
    void    (*clear)(void * be, bool data);
    // Sequence operations with llama_memory_seq_* semantics: seq < 0 = every sequence,
    // p0 < 0 = 0, p1 < 0 = infinity, ranges are [p0, p1).
    bool    (*seq_rm)  (void * be, int32_t seq, int32_t p0, int32_t p1);
    void    (*seq_cp)  (void * be, int32_t seq_src, int32_t seq_dst, int32_t p0, int32_t p1);
    void    (*seq_keep)(void * be, int32_t seq);
    // Position shifts. Only called when can_shift returns true; return false to refuse.
    bool    (*seq_add) (void * be, int32_t seq, int32_t p0, int32_t p1, int32_t delta);
    bool    (*seq_div) (void * be, int32_t seq, int32_t p0, int32_t p1, int32_t d);
    int32_t (*seq_pos_min)(void * be, int32_t seq); // -1 when the sequence is empty
    int32_t (*seq_pos_max)(void * be, int32_t seq); // -1 when the sequence is empty
    bool    (*can_shift)(void * be);

    void    (*memory_usage)(void * be, struct llama_kv_memory_usage * usage);

    // Serialise the whole cache (seq = -1) or one sequence. Must write the same bytes when called
    // twice without a change in between (llama.cpp counts first, then writes). Requests for
    // partial (sliding-window-only) state never reach the backend: it keeps every token, so it
    // has none of its own.
    bool    (*state_write)(void * be, int32_t seq, uint32_t flags, llama_kv_write_fn write, void * io);
    // Restore what state_write wrote; with seq >= 0 the sequence's cells go to `seq`, whatever
    // sequence they were saved from. On failure the cache is left empty for that sequence.
    bool    (*state_read) (void * be, int32_t seq, uint32_t flags, llama_kv_read_fn read, void * io);

    // (optional; NULL: never) Exact attention computed by llama.cpp's own flash-attention op, for
    // answers identical to the stock cache's: the number of cells the backend lays out densely for
    // layer il and the applied ubatch (its sequence's cells in position order, as a stock stream
    // holds them), or 0 when the backend computes the layer's attention itself with `attend`.
    // llama.cpp pads the count as stock pads its view and calls dense_fill instead of attend.
    uint32_t (*dense_cells)(void * be, int32_t il);
    // Fill layer il's dense view for the applied ubatch of n_tokens tokens (f16 bits): K rows
    // [n_kv][n_head_kv][n_embd_head_k], V rows [n_kv][n_head_kv][n_embd_head_v] (rows from dense_cells on
    // are zero) and the mask [n_tokens][n_kv] (0 where the token sees the cell, causal or not, -inf
    // elsewhere). Runs after `store` of the same layer and ubatch, on every graph thread; each thread
    // fills its own share. Errors as for store.
    int32_t (*dense_fill)(void * be, int32_t il, bool causal, uint32_t n_tokens, uint32_t n_kv,
                          uint16_t * k, uint16_t * v, uint16_t * mask, int32_t ith, int32_t nth);
};

typedef const struct llama_kv_backend_iface * (*llama_kv_backend_init_fn)(void);

// Register a backend table (for apps that link a backend statically). Returns 0 on success,
// -1 when the table's api_version or struct_size does not match this llama.cpp.
LLAMA_KV_BACKEND_API int32_t llama_kv_backend_register(const struct llama_kv_backend_iface * iface);

// Load a backend plugin. A name containing '/' is a path; otherwise `lib<name>attn.so` is searched
// in $LLAMA_KV_BACKEND_PATH, the executable's folder, the working folder and the loader path.
// Returns 0 on success (or when a backend of that name is already registered), -1 on failure
// with a message in err naming every place that was tried.
LLAMA_KV_BACKEND_API int32_t llama_kv_backend_load(const char * name_or_path, char * err, size_t err_len);

#ifdef __cplusplus
}
#endif
