// llama-kv-ext.h: the memory object and graph inputs that forward a context's KV cache to an
// external KV backend (include/llama-kv-backend.h). Added by the hcattn patch series.
#pragma once

#include "llama-kv-backend.h"
#include "llama-memory.h"
#include "llama-batch.h"
#include "llama-graph.h"

#include <atomic>
#include <memory>
#include <string>
#include <vector>

struct llama_model;
struct llama_cparams;

// Find a registered backend by name, loading its plugin on first use. Throws std::runtime_error
// with a message naming every place that was searched.
const llama_kv_backend_iface * llama_kv_ext_find_backend(const std::string & name);

// The memory object of a context whose KV cache is served by an external backend.
class llama_kv_ext : public llama_memory_i {
public:
    // Throws std::runtime_error when the model cannot be served or the backend refuses the
    // configuration (its message is passed on).
    llama_kv_ext(const llama_model & model, const llama_cparams & cparams,
                 const llama_kv_backend_iface * iface, const std::string & opts);
    ~llama_kv_ext() override;

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override;

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id) override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // used by llama_kv_ext_context::apply()
    bool apply_ubatch(const llama_ubatch & ubatch);

    // the descriptor of model layer il, or null when the backend does not serve it
    const llama_kv_layer_desc * layer(int32_t il) const;

    // called by the graph ops on failure: the next batch fails with this message
    void op_failed() const;

    // cells of layer il's dense view for the applied ubatch, padded as stock pads its view
    // (llama_kv_cache::get_n_kv), or 0 when the backend attends itself
    uint32_t dense_n_kv(int32_t il) const;

    const llama_kv_backend_iface * iface;
    void * be = nullptr;

private:
    std::vector<llama_kv_layer_desc> layers;
    std::vector<std::string> layer_devices;
    uint32_t n_cells = 0;
    uint32_t n_ctx_seq = 0; // cells of one stock stream, the cap of its view
    mutable std::atomic<bool> op_error{false};

    std::string last_error() const;
    void log_usage(const char * when) const;
};

class llama_kv_ext_context : public llama_memory_context_i {
public:
    // a context with a status only (failed prepare, no update)
    explicit llama_kv_ext_context(llama_memory_status status, llama_kv_ext * ext = nullptr);
    // the ubatches of one batch, already checked to fit
    llama_kv_ext_context(llama_kv_ext * ext, std::vector<llama_ubatch> ubatches);

    bool next() override;
    bool apply() override;
    const llama_ubatch & get_ubatch() const override;
    llama_memory_status get_status() const override;

    llama_kv_ext * ext;

private:
    llama_memory_status status;
    std::vector<llama_ubatch> ubatches;
    size_t i_next = 0;
};

// What one layer's attention op needs at compute time. Owned by the graph input, so that it
// lives exactly as long as the graph that points at it (graphs are reused across ubatches).
struct llama_kv_ext_op_params {
    llama_kv_ext * ext;
    int32_t il;
    float kq_scale;
    float softcap;
    bool causal;
    // dense view (see dense_cells): its cells and the ubatch's tokens; 0 when not used
    uint32_t n_kv = 0;
    uint32_t n_tokens = 0;
};

// Graph-side state shared by the plain and the iSWA input.
struct llama_kv_ext_graph {
    llama_kv_ext * ext = nullptr;
    bool causal = true;
    bool training = false;
    std::vector<std::unique_ptr<llama_kv_ext_op_params>> ops;
    // (layer, n_kv of its dense view, 0 for none) as the graph was built: a graph is reused only
    // while they stay the same
    std::vector<std::pair<int32_t, uint32_t>> dense_views;

    // Store this ubatch's K/V, then attend: two custom ops chained so that ggml's barrier
    // between nodes separates the writes of the store from the reads of the attention. With a
    // dense view, the second op fills it and ggml's flash attention attends, as in stock's graph.
    // Returns [n_embd_head_v * n_head, n_tokens] F32.
    ggml_tensor * build(ggml_context * ctx, ggml_backend_sched_t sched, ggml_backend_t backend_cpu,
                        const llama_hparams & hparams,
                        ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                        ggml_tensor * kq_b, ggml_tensor * sinks, ggml_tensor * v_mla,
                        float kq_scale, int il);

    bool can_reuse(const llm_graph_params & params) const;
};

// Returned by build_attn_inp_kv() when the memory is external (its mctx stays null).
class llm_graph_input_attn_ext : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_ext(const llama_hparams & hparams, const llama_cparams & cparams, llama_kv_ext * ext);
    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;
    llama_kv_ext_graph graph;
};

// Returned by build_attn_inp_kv_iswa() when the memory is external: the backend serves the
// sliding-window layers too, with the window rules of each layer.
class llm_graph_input_attn_ext_iswa : public llm_graph_input_attn_kv_iswa {
public:
    llm_graph_input_attn_ext_iswa(const llama_hparams & hparams, const llama_cparams & cparams, llama_kv_ext * ext);
    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;
    llama_kv_ext_graph graph;
};

// The external memory behind a memory context, or null when it is another kind of memory.
llama_kv_ext * llama_kv_ext_of(const llama_memory_context_i * mctx);

// Graph builders that cannot use an external memory call this first: it throws a clear error
// instead of letting a static_cast reinterpret the external context.
void llama_kv_ext_refuse(const llama_memory_context_i * mctx, const char * what);

// Create the external memory for a context, or return null when no backend was asked for
// (params first, then the LLAMA_KV_BACKEND / LLAMA_KV_BACKEND_OPTS environment) or the model
// keeps no KV cache at all. Throws on error.
llama_memory_i * llama_kv_ext_create(const llama_model & model, const llama_cparams & cparams,
                                     const char * backend, const char * opts,
                                     ggml_type type_k, ggml_type type_v);
