// llama-kv-ext.cpp: forwards a context's KV cache to an external KV backend.
// Added by the hcattn patch series; see include/llama-kv-backend.h for the contract.
//
// Note: src/ is built with UNITY_BUILD, so every file-static name here carries a kv_ext_ prefix.

#include "llama-kv-ext.h"

#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"
#include "llama-cparams.h"
#include "llama-arch.h"

#include "ggml-backend.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#if defined(_WIN32)
#    define KV_EXT_HAVE_DL 0
#else
#    include <dlfcn.h>
#    include <unistd.h>
#    include <climits>
#    define KV_EXT_HAVE_DL 1
#endif

//
// registry and plugin loading
//

struct kv_ext_registry {
    std::mutex mutex;
    std::map<std::string, const llama_kv_backend_iface *> by_name;
};

static kv_ext_registry & kv_ext_reg() {
    // never destroyed: plugins stay loaded until the process exits, so no context can outlive
    // the code of its backend
    static kv_ext_registry * reg = new kv_ext_registry();
    return *reg;
}

static bool kv_ext_check_iface(const llama_kv_backend_iface * iface, std::string & err) {
    if (iface == nullptr) {
        err = "the backend returned no function table";
        return false;
    }
    if (iface->api_version != LLAMA_KV_BACKEND_API_VERSION) {
        err = "the backend was built for KV-backend API version " + std::to_string(iface->api_version) +
              ", this llama.cpp has version " + std::to_string(LLAMA_KV_BACKEND_API_VERSION);
        return false;
    }
    if (iface->struct_size != sizeof(llama_kv_backend_iface)) {
        err = "the backend's function table has " + std::to_string(iface->struct_size) +
              " bytes, this llama.cpp expects " + std::to_string(sizeof(llama_kv_backend_iface));
        return false;
    }
    const void * required[] = {
        (const void *) iface->name, (const void *) iface->create, (const void *) iface->destroy,
        (const void *) iface->last_error, (const void *) iface->prepare, (const void *) iface->apply,
        (const void *) iface->store, (const void *) iface->attend, (const void *) iface->clear,
        (const void *) iface->seq_rm, (const void *) iface->seq_cp, (const void *) iface->seq_keep,
        (const void *) iface->seq_add, (const void *) iface->seq_div, (const void *) iface->seq_pos_min,
        (const void *) iface->seq_pos_max, (const void *) iface->can_shift, (const void *) iface->memory_usage,
        (const void *) iface->state_write, (const void *) iface->state_read,
    };
    for (const void * fn : required) {
        if (fn == nullptr) {
            err = "the backend's function table has a missing entry";
            return false;
        }
    }
    if ((iface->dense_cells == nullptr) != (iface->dense_fill == nullptr)) {
        err = "the backend's function table has dense_cells or dense_fill without the other";
        return false;
    }
    return true;
}

static void kv_ext_copy_err(const std::string & msg, char * err, size_t err_len) {
    if (err && err_len > 0) {
        snprintf(err, err_len, "%s", msg.c_str());
    }
}

int32_t llama_kv_backend_register(const llama_kv_backend_iface * iface) {
    std::string err;
    if (!kv_ext_check_iface(iface, err)) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, err.c_str());
        return -1;
    }
    auto & reg = kv_ext_reg();
    std::lock_guard<std::mutex> lock(reg.mutex);
    reg.by_name[iface->name] = iface;
    return 0;
}

#if KV_EXT_HAVE_DL
static std::string kv_ext_exe_dir() {
    char buf[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
    if (n <= 0) {
        return "";
    }
    buf[n] = '\0';
    std::string path(buf);
    const size_t slash = path.rfind('/');
    return slash == std::string::npos ? "" : path.substr(0, slash);
}

// Try one candidate; on failure append "  <where>: <why>" to tried.
static const llama_kv_backend_iface * kv_ext_try_open(const std::string & path, std::string & tried) {
    void * handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char * why = dlerror();
        tried += "\n  " + path + ": " + (why ? why : "not loadable");
        return nullptr;
    }
    auto init = (llama_kv_backend_init_fn) dlsym(handle, LLAMA_KV_BACKEND_INIT_SYMBOL);
    if (!init) {
        tried += "\n  " + path + ": no symbol " LLAMA_KV_BACKEND_INIT_SYMBOL;
        dlclose(handle);
        return nullptr;
    }
    const llama_kv_backend_iface * iface = init();
    std::string err;
    if (!kv_ext_check_iface(iface, err)) {
        tried += "\n  " + path + ": " + err;
        dlclose(handle);
        return nullptr;
    }
    // the handle is kept open for the rest of the process on purpose
    return iface;
}
#endif

int32_t llama_kv_backend_load(const char * name_or_path, char * err, size_t err_len) {
    try {
        llama_kv_ext_find_backend(name_or_path ? name_or_path : "");
        return 0;
    } catch (const std::exception & e) {
        kv_ext_copy_err(e.what(), err, err_len);
        return -1;
    }
}

const llama_kv_backend_iface * llama_kv_ext_find_backend(const std::string & name) {
    if (name.empty()) {
        throw std::runtime_error("empty KV backend name");
    }
    auto & reg = kv_ext_reg();
    std::lock_guard<std::mutex> lock(reg.mutex);

    auto it = reg.by_name.find(name);
    if (it != reg.by_name.end()) {
        return it->second;
    }

#if KV_EXT_HAVE_DL
    std::string tried;
    const llama_kv_backend_iface * iface = nullptr;
    if (name.find('/') != std::string::npos) {
        iface = kv_ext_try_open(name, tried);
    } else {
        const std::string file = "lib" + name + "attn.so";
        std::vector<std::string> dirs;
        if (const char * env = getenv("LLAMA_KV_BACKEND_PATH")) {
            std::string list(env);
            size_t start = 0;
            while (start <= list.size()) {
                const size_t colon = list.find(':', start);
                const std::string dir = list.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
                if (!dir.empty()) {
                    dirs.push_back(dir);
                }
                if (colon == std::string::npos) {
                    break;
                }
                start = colon + 1;
            }
        }
        const std::string exe_dir = kv_ext_exe_dir();
        if (!exe_dir.empty()) {
            dirs.push_back(exe_dir);
        }
        dirs.push_back(".");
        for (const auto & dir : dirs) {
            iface = kv_ext_try_open(dir + "/" + file, tried);
            if (iface) {
                break;
            }
        }
        if (!iface) {
            // finally the loader's own search (rpath, LD_LIBRARY_PATH, system folders)
            iface = kv_ext_try_open(file, tried);
        }
    }
    if (!iface) {
        throw std::runtime_error("KV backend '" + name + "' not found; tried (set LLAMA_KV_BACKEND_PATH to the folder of lib" +
                                 name + "attn.so):" + tried);
    }
    reg.by_name[name] = iface;
    reg.by_name[iface->name] = iface;
    return iface;
#else
    throw std::runtime_error("KV backend '" + name + "' is not registered, and plugin loading is not supported on this platform");
#endif
}

//
// the memory object
//

static llama_kv_ubatch_view kv_ext_view(const llama_ubatch & ub) {
    llama_kv_ubatch_view v;
    v.n_tokens = ub.n_tokens;
    v.pos      = ub.pos;
    v.n_seq_id = ub.n_seq_id;
    v.seq_id   = (const int32_t * const *) ub.seq_id;
    return v;
}

// why a model cannot be served, or "" when it can
static std::string kv_ext_unsupported(const llama_model & model) {
    const auto & hp = model.hparams;
    switch (model.arch) {
        case LLM_ARCH_MINIMAX_M3:
        case LLM_ARCH_GLM_DSA:
        case LLM_ARCH_DEEPSEEK32:
        case LLM_ARCH_GLM5_NEXT:
        case LLM_ARCH_HY_V4:
        case LLM_ARCH_DOTS3NOTE:
        case LLM_ARCH_DEEPSEEK4:
        case LLM_ARCH_DFLASH:
            return "it uses a sparse-attention KV cache of its own";
        case LLM_ARCH_GROK:
            return "its attention applies a tanh output multiplier";
        default:
            break;
    }
    if (llm_arch_is_recurrent(model.arch)) {
        return "it is a recurrent model";
    }
    if (llm_arch_is_hybrid(model.arch)) {
        return "it is a hybrid recurrent/attention model";
    }
    if (llama_model_has_encoder(&model)) {
        return "it has an encoder (cross attention)";
    }
    if (hp.is_mla()) {
        return "it uses multi-head latent attention (MLA)";
    }
    if (hp.n_pos_per_embd() > 1) {
        return "it uses multi-dimensional positions (M-RoPE)";
    }
    if (hp.use_alibi) {
        return "it uses ALiBi position biases";
    }
    if (hp.n_layer_kv_from_start >= 0) {
        return "its layers share KV caches";
    }
    return "";
}

llama_kv_ext::llama_kv_ext(const llama_model & model, const llama_cparams & cparams,
                           const llama_kv_backend_iface * iface, const std::string & opts) : iface(iface) {
    const auto & hp = model.hparams;
    const char * arch = llm_arch_name(model.arch);

    const std::string why = kv_ext_unsupported(model);
    if (!why.empty()) {
        throw std::runtime_error(std::string("KV backend '") + iface->name + "' cannot serve architecture '" + arch + "': " + why);
    }

    // the layers the graph attends, chosen as llama_model::create_memory filters its cache:
    // an MTP context attends only the next-token-prediction layers after the trunk, any other
    // context only the trunk (unless n_layer_nextn is a router layer the trunk attends)
    uint32_t il0 = 0;
    uint32_t il1 = hp.n_layer_all;
    if (hp.n_layer_nextn > 0 && hp.n_layer() > 0 && hp.router_layer < 0) {
        if (cparams.ctx_type == LLAMA_CONTEXT_TYPE_MTP) {
            il0 = hp.n_layer();
        } else {
            il1 = hp.n_layer();
        }
    }
    for (uint32_t il = il0; il < il1; ++il) {
        if (!hp.has_kv(il) || hp.n_head_kv(il) == 0) {
            continue;
        }
        llama_kv_layer_desc d;
        d.il            = (int32_t) il;
        d.n_head        = (int32_t) hp.n_head(il);
        d.n_head_kv     = (int32_t) hp.n_head_kv(il);
        d.n_embd_head_k = (int32_t) hp.n_embd_head_k(il);
        d.n_embd_head_v = (int32_t) hp.n_embd_head_v(il);
        d.swa_type      = hp.is_swa(il) ? (int32_t) hp.swa_type : LLAMA_KV_SWA_NONE;
        d.n_swa         = hp.is_swa(il) ? hp.n_swa : 0;
        ggml_backend_dev_t dev = cparams.offload_kqv ? model.dev_layer((int) il) : nullptr;
        layer_devices.push_back(dev ? ggml_backend_dev_name(dev) : "CPU");
        layers.push_back(d);
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        layers[i].device = layer_devices[i].c_str();
    }

    llama_kv_backend_config cfg = {};
    cfg.struct_size = sizeof(cfg);
    cfg.arch        = arch;
    cfg.opts        = opts.c_str();
    cfg.model_path  = model.path.empty() ? nullptr : model.path.c_str();
    cfg.n_ctx       = cparams.kv_unified ? cparams.n_ctx_seq : cparams.n_ctx_seq * cparams.n_seq_max;
    cfg.n_ctx_seq   = cparams.n_ctx_seq;
    cfg.n_seq_max   = cparams.n_seq_max;
    cfg.n_ubatch    = cparams.n_ubatch;
    cfg.n_layer     = hp.n_layer();
    cfg.kv_unified  = cparams.kv_unified;
    cfg.no_alloc    = hp.no_alloc;
    cfg.n_layer_kv  = (int32_t) layers.size();
    cfg.layers      = layers.data();

    char err[1024] = {0};
    be = iface->create(&cfg, err, sizeof(err));
    if (!be) {
        throw std::runtime_error(std::string("KV backend '") + iface->name + "': " + (err[0] ? err : "creation failed"));
    }
    n_cells = cfg.n_ctx;
    n_ctx_seq = cfg.n_ctx_seq;
    LLAMA_LOG_INFO("%s: KV backend '%s' serves %d layers, %u cells (%u per sequence, %u sequences%s), options '%s'\n",
            __func__, iface->name, cfg.n_layer_kv, cfg.n_ctx, cfg.n_ctx_seq, cfg.n_seq_max,
            cfg.kv_unified ? ", unified" : "", opts.c_str());
    log_usage("created");
}

llama_kv_ext::~llama_kv_ext() {
    if (be) {
        log_usage("freed");
        iface->destroy(be);
    }
}

const llama_kv_layer_desc * llama_kv_ext::layer(int32_t il) const {
    for (const auto & d : layers) {
        if (d.il == il) {
            return &d;
        }
    }
    return nullptr;
}

void llama_kv_ext::op_failed() const {
    op_error.store(true);
}

std::string llama_kv_ext::last_error() const {
    const char * msg = iface->last_error(be);
    return msg && msg[0] ? msg : "unknown error";
}

void llama_kv_ext::log_usage(const char * when) const {
    llama_kv_memory_usage u = {};
    iface->memory_usage(be, &u);
    // what the stock cache would take for the same context: f16 K and V for every cell
    double stock = 0.0;
    for (const auto & d : layers) {
        stock += (double) n_cells * d.n_head_kv * (d.n_embd_head_k + d.n_embd_head_v) * 2.0;
    }
    const double mib = 1048576.0;
    const double pct = stock > 0 ? 100.0 / stock : 0.0;
    const size_t values = u.host_bytes + u.device_bytes - u.fast_bytes;
    LLAMA_LOG_INFO("%s: KV backend '%s' %s: fast tier (keys) %.2f MiB = %.1f%% of the f16 cache (codebooks %.2f MiB), "
            "values %.2f MiB = %.1f%%, file tier %.2f MiB = %.1f%%; host %.2f MiB, device %.2f MiB\n",
            __func__, iface->name, when, u.fast_bytes / mib, u.fast_bytes * pct, u.codebook_bytes / mib,
            values / mib, values * pct, u.file_bytes / mib, u.file_bytes * pct, u.host_bytes / mib, u.device_bytes / mib);
}

llama_memory_context_ptr llama_kv_ext::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    if (op_error.exchange(false)) {
        // a store or attend op of the previous batch failed; its outputs were not trustworthy
        LLAMA_LOG_ERROR("%s: KV backend '%s' failed during the last batch: %s\n", __func__, iface->name, last_error().c_str());
        return nullptr;
    }

    balloc.split_reset();
    std::vector<llama_ubatch> ubatches;
    while (true) {
        auto ubatch = balloc.split_simple(n_ubatch);
        if (ubatch.n_tokens == 0) {
            break;
        }
        ubatches.push_back(std::move(ubatch)); // NOLINT
    }
    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        return std::make_unique<llama_kv_ext_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    std::vector<llama_kv_ubatch_view> views;
    views.reserve(ubatches.size());
    for (const auto & ub : ubatches) {
        views.push_back(kv_ext_view(ub));
    }
    const int32_t rc = iface->prepare(be, views.data(), (int32_t) views.size());
    if (rc < 0) {
        // a hard error (bad sequence id, ...): decode returns -2 instead of retrying smaller batches
        LLAMA_LOG_ERROR("%s: KV backend '%s': %s\n", __func__, iface->name, last_error().c_str());
        return nullptr;
    }
    if (rc != LLAMA_KV_OK) {
        return std::make_unique<llama_kv_ext_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    return std::make_unique<llama_kv_ext_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_kv_ext::init_full() {
    return std::make_unique<llama_kv_ext_context>(LLAMA_MEMORY_STATUS_SUCCESS, this);
}

llama_memory_context_ptr llama_kv_ext::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    // no pending shifts or copies: positions never move while can_shift is false
    return std::make_unique<llama_kv_ext_context>(LLAMA_MEMORY_STATUS_NO_UPDATE, this);
}

bool llama_kv_ext::apply_ubatch(const llama_ubatch & ubatch) {
    if (op_error.exchange(false)) {
        LLAMA_LOG_ERROR("%s: KV backend '%s' failed during the last ubatch: %s\n", __func__, iface->name, last_error().c_str());
        return false;
    }
    const llama_kv_ubatch_view view = kv_ext_view(ubatch);
    if (iface->apply(be, &view) != LLAMA_KV_OK) {
        LLAMA_LOG_ERROR("%s: KV backend '%s': %s\n", __func__, iface->name, last_error().c_str());
        return false;
    }
    return true;
}

bool llama_kv_ext::get_can_shift() const {
    return iface->can_shift(be);
}

void llama_kv_ext::clear(bool data) {
    iface->clear(be, data);
}

bool llama_kv_ext::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    return iface->seq_rm(be, seq_id, p0, p1);
}

void llama_kv_ext::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    iface->seq_cp(be, seq_id_src, seq_id_dst, p0, p1);
}

void llama_kv_ext::seq_keep(llama_seq_id seq_id) {
    iface->seq_keep(be, seq_id);
}

void llama_kv_ext::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    if (shift == 0) {
        return;
    }
    if (!iface->seq_add(be, seq_id, p0, p1, shift)) {
        LLAMA_LOG_ERROR("%s: KV backend '%s' refused to shift positions (seq %d, [%d, %d), %+d): %s\n", __func__,
                iface->name, seq_id, p0, p1, shift, last_error().c_str());
    }
}

void llama_kv_ext::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    if (d == 1) {
        return;
    }
    if (!iface->seq_div(be, seq_id, p0, p1, d)) {
        LLAMA_LOG_ERROR("%s: KV backend '%s' refused to divide positions (seq %d, [%d, %d), /%d): %s\n", __func__,
                iface->name, seq_id, p0, p1, d, last_error().c_str());
    }
}

llama_pos llama_kv_ext::seq_pos_min(llama_seq_id seq_id) const {
    return iface->seq_pos_min(be, seq_id);
}

llama_pos llama_kv_ext::seq_pos_max(llama_seq_id seq_id) const {
    return iface->seq_pos_max(be, seq_id);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_ext::memory_breakdown() const {
    llama_kv_memory_usage u = {};
    iface->memory_usage(be, &u);
    std::map<ggml_backend_buffer_type_t, size_t> res;
    // the file tier is counted with host memory: it is resident whenever it is in use
    res[ggml_backend_cpu_buffer_type()] += u.host_bytes + u.file_bytes;
    if (u.device_bytes > 0) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (dev) {
            res[ggml_backend_dev_buffer_type(dev)] += u.device_bytes;
        } else {
            res[ggml_backend_cpu_buffer_type()] += u.device_bytes;
        }
    }
    return res;
}

// State I/O adapters: llama_io_* may throw, and nothing may unwind through the backend, so the
// exception is caught here, remembered, and thrown again once the backend has returned.
struct kv_ext_writer {
    llama_io_write_i * io;
    bool failed = false;
    std::string err;
};

static void kv_ext_write_cb(void * ctx, const void * src, size_t n) {
    auto * w = (kv_ext_writer *) ctx;
    if (w->failed) {
        return;
    }
    try {
        w->io->write(src, n);
    } catch (const std::exception & e) {
        w->failed = true;
        w->err = e.what();
    } catch (...) {
        w->failed = true;
        w->err = "unknown error while writing state";
    }
}

struct kv_ext_reader {
    llama_io_read_i * io;
    std::string err;
};

static bool kv_ext_read_cb(void * ctx, void * dst, size_t n) {
    auto * r = (kv_ext_reader *) ctx;
    try {
        r->io->read(dst, n);
        return true;
    } catch (const std::exception & e) {
        r->err = e.what();
    } catch (...) {
        r->err = "unknown error while reading state";
    }
    return false;
}

void llama_kv_ext::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    if (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) {
        // partial state is the sliding-window part a stock cache may have evicted; this
        // memory keeps every token, so it has none (the server's checkpoints stay empty)
        return;
    }
    kv_ext_writer w{&io};
    const bool ok = iface->state_write(be, seq_id, flags, kv_ext_write_cb, &w);
    if (w.failed) {
        throw std::runtime_error("failed to write the KV backend state: " + w.err);
    }
    if (!ok) {
        throw std::runtime_error(std::string("KV backend '") + iface->name + "' failed to save its state: " + last_error());
    }
}

void llama_kv_ext::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    if (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) {
        return; // see state_write
    }
    kv_ext_reader r{&io};
    if (!iface->state_read(be, seq_id, flags, kv_ext_read_cb, &r)) {
        std::string msg = std::string("KV backend '") + iface->name + "' failed to restore its state: " + last_error();
        if (!r.err.empty()) {
            msg += " (" + r.err + ")";
        }
        throw std::runtime_error(msg);
    }
}

//
// the memory context
//

llama_kv_ext_context::llama_kv_ext_context(llama_memory_status status, llama_kv_ext * ext) : ext(ext), status(status) {}

llama_kv_ext_context::llama_kv_ext_context(llama_kv_ext * ext, std::vector<llama_ubatch> ubatches) :
    ext(ext), status(LLAMA_MEMORY_STATUS_SUCCESS), ubatches(std::move(ubatches)) {}

bool llama_kv_ext_context::next() {
    return ++i_next < ubatches.size();
}

bool llama_kv_ext_context::apply() {
    if (ubatches.empty()) {
        // full (reserve) and update contexts have nothing to commit
        return true;
    }
    return ext->apply_ubatch(ubatches[i_next]);
}

const llama_ubatch & llama_kv_ext_context::get_ubatch() const {
    GGML_ASSERT(i_next < ubatches.size());
    return ubatches[i_next];
}

llama_memory_status llama_kv_ext_context::get_status() const {
    return status;
}

llama_kv_ext * llama_kv_ext_of(const llama_memory_context_i * mctx) {
    const auto * c = dynamic_cast<const llama_kv_ext_context *>(mctx);
    return c ? c->ext : nullptr;
}

uint32_t llama_kv_ext::dense_n_kv(int32_t il) const {
    const uint32_t n = iface->dense_cells ? iface->dense_cells(be, il) : 0;
    if (n == 0) {
        return 0;
    }
    // stock's view: every cell of the stream up to the last used one, padded to 256 and capped
    // at the stream's size; the same n_kv puts every cell in the same chunk and tile of the
    // flash-attention kernel as stock's cache does
    const uint32_t n_pad = 256;
    return std::min(n_ctx_seq, std::max(n_pad, GGML_PAD(n, n_pad)));
}

void llama_kv_ext_refuse(const llama_memory_context_i * mctx, const char * what) {
    if (llama_kv_ext_of(mctx)) {
        throw std::runtime_error(std::string("this model's attention (") + what + ") cannot be served by an external KV backend");
    }
}

//
// graph: the two custom ops
//

static void kv_ext_fill_call(llama_kv_attn_call & c, const llama_kv_ext_op_params * p,
                             const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * v,
                             const ggml_tensor * sinks, ggml_tensor * out) {
    c.il       = p->il;
    c.n_tokens = (uint32_t) k->ne[2];
    c.causal   = p->causal;
    c.kq_scale = p->kq_scale;
    c.softcap  = p->softcap;
    c.q = q ? (const float *) q->data : nullptr; c.q_nb1 = q ? q->nb[1] : 0; c.q_nb2 = q ? q->nb[2] : 0;
    c.k = (const float *) k->data; c.k_nb1 = k->nb[1]; c.k_nb2 = k->nb[2];
    c.v = (const float *) v->data; c.v_nb1 = v->nb[1]; c.v_nb2 = v->nb[2];
    c.sinks = sinks ? (const float *) sinks->data : nullptr;
    c.out = out ? (float *) out->data : nullptr;
}

// src: k, v
static void kv_ext_store_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_kv_ext_op_params *) userdata;
    llama_kv_attn_call c;
    kv_ext_fill_call(c, p, nullptr, dst->src[0], dst->src[1], nullptr, nullptr);
    if (p->ext->iface->store(p->ext->be, &c, ith, nth) != LLAMA_KV_OK) {
        p->ext->op_failed();
    }
}

// src: q, k, v, the store op's output (ordering only), sinks (optional)
static void kv_ext_attend_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_kv_ext_op_params *) userdata;
    llama_kv_attn_call c;
    kv_ext_fill_call(c, p, dst->src[0], dst->src[1], dst->src[2], dst->src[4], dst);
    if (p->ext->iface->attend(p->ext->be, &c, ith, nth) != LLAMA_KV_OK) {
        // never hand garbage to the rest of the graph
        float * out = (float *) dst->data;
        const int64_t n = ggml_nelements(dst);
        for (int64_t i = n * ith / nth; i < n * (ith + 1) / nth; ++i) {
            out[i] = NAN;
        }
        p->ext->op_failed();
    }
}

// src: the store op's output (ordering only). dst: the dense view, F16: K rows, V rows, mask.
static void kv_ext_dense_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * p = (const llama_kv_ext_op_params *) userdata;
    const llama_kv_layer_desc * d = p->ext->layer(p->il);
    uint16_t * k = (uint16_t *) dst->data;
    uint16_t * v = k + (size_t) p->n_kv * d->n_head_kv * d->n_embd_head_k;
    uint16_t * mask = v + (size_t) p->n_kv * d->n_head_kv * d->n_embd_head_v;
    if (p->ext->iface->dense_fill(p->ext->be, p->il, p->causal, p->n_tokens, p->n_kv, k, v, mask, ith, nth) != LLAMA_KV_OK) {
        // never hand garbage to the rest of the graph: every cell hidden
        const size_t n = (size_t) p->n_kv * p->n_tokens;
        const uint16_t neg_inf = 0xFC00;
        for (size_t i = n * ith / nth; i < n * (ith + 1) / nth; ++i) {
            mask[i] = neg_inf;
        }
        p->ext->op_failed();
    }
}

static ggml_tensor * kv_ext_f32_rows(ggml_context * ctx, ggml_tensor * t) {
    if (t->type != GGML_TYPE_F32) {
        t = ggml_cast(ctx, t, GGML_TYPE_F32);
    }
    if (t->nb[0] != sizeof(float)) {
        t = ggml_cont(ctx, t);
    }
    return t;
}

ggml_tensor * llama_kv_ext_graph::build(ggml_context * ctx, ggml_backend_sched_t sched, ggml_backend_t backend_cpu,
                                        const llama_hparams & hparams,
                                        ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                        ggml_tensor * kq_b, ggml_tensor * sinks, ggml_tensor * v_mla,
                                        float kq_scale, int il) {
    if (kq_b || v_mla) {
        throw std::runtime_error("an external KV backend cannot serve attention with a KQ bias or MLA");
    }
    if (!k_cur || !v_cur) {
        throw std::runtime_error("an external KV backend cannot serve layers that reuse another layer's KV");
    }
    if (training) {
        throw std::runtime_error("an external KV backend cannot be used for training");
    }
    // the backend trusts these shapes: check them once, here, against what it was told
    const llama_kv_layer_desc * d = ext->layer(il);
    if (!d) {
        throw std::runtime_error("layer " + std::to_string(il) + " attends, but the external KV backend was not given it");
    }
    if (q_cur->ne[0] != d->n_embd_head_k || q_cur->ne[1] != d->n_head || k_cur->ne[0] != d->n_embd_head_k ||
        k_cur->ne[1] != d->n_head_kv || v_cur->ne[0] != d->n_embd_head_v || v_cur->ne[1] != d->n_head_kv ||
        q_cur->ne[2] != k_cur->ne[2] || v_cur->ne[2] != k_cur->ne[2] || q_cur->ne[3] != 1 ||
        (sinks && ggml_nelements(sinks) != d->n_head)) {
        throw std::runtime_error("layer " + std::to_string(il) + ": attention shapes differ from the layer's description");
    }
    ggml_tensor * q = kv_ext_f32_rows(ctx, q_cur);
    ggml_tensor * k = kv_ext_f32_rows(ctx, k_cur);
    ggml_tensor * v = kv_ext_f32_rows(ctx, v_cur);
    ggml_tensor * sinks_in = sinks;
    if (sinks) {
        sinks = kv_ext_f32_rows(ctx, sinks);
        if (!ggml_is_contiguous(sinks)) {
            sinks = ggml_cont(ctx, sinks);
        }
    }

    auto p = std::make_unique<llama_kv_ext_op_params>();
    p->ext      = ext;
    p->il       = il;
    p->kq_scale = kq_scale;
    p->softcap  = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f;
    p->causal   = causal;

    ggml_tensor * store_args[2] = { k, v };
    ggml_tensor * stored = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, store_args, 2,
                                          kv_ext_store_op, GGML_N_TASKS_MAX, p.get());
    ggml_format_name(stored, "kv_ext_store-%d", il);

    // exact attention by stock's own op over a dense view the backend fills: the same kernel,
    // the same cells in the same order, the same mask, so the same rounding as stock's cache
    // (ALiBi needs a mask of distances, which the backend does not write)
    const uint32_t n_kv = hparams.f_max_alibi_bias > 0.0f ? 0 : ext->dense_n_kv(il);
    dense_views.emplace_back(il, n_kv);
    if (n_kv > 0) {
        const int64_t n_tokens = q_cur->ne[2];
        const int64_t dk = d->n_embd_head_k, dv = d->n_embd_head_v, nh = d->n_head_kv;
        p->n_kv = n_kv;
        p->n_tokens = (uint32_t) n_tokens;
        const int64_t nk = dk * nh * n_kv, nv = dv * nh * n_kv;
        ggml_tensor * dense_args[1] = { stored };
        ggml_tensor * dense = ggml_custom_4d(ctx, GGML_TYPE_F16, nk + nv + n_kv * n_tokens, 1, 1, 1, dense_args, 1,
                                             kv_ext_dense_op, GGML_N_TASKS_MAX, p.get());
        ggml_format_name(dense, "kv_ext_dense-%d", il);
        const size_t h = ggml_type_size(GGML_TYPE_F16);
        ggml_tensor * kd = ggml_view_3d(ctx, dense, dk, nh, n_kv, dk * h, dk * nh * h, 0);
        ggml_tensor * vd = ggml_view_3d(ctx, dense, dv, nh, n_kv, dv * h, dv * nh * h, nk * h);
        ggml_tensor * mask = ggml_view_4d(ctx, dense, n_kv, n_tokens, 1, 1, n_kv * h, n_kv * n_tokens * h,
                                          n_kv * n_tokens * h, (nk + nv) * h);
        // as build_attn_mha with flash attention, for one stream
        ggml_tensor * qp = ggml_permute(ctx, q_cur, 0, 2, 1, 3);
        kd = ggml_permute(ctx, kd, 0, 2, 1, 3);
        vd = ggml_permute(ctx, vd, 0, 2, 1, 3);
        ggml_tensor * cur = ggml_flash_attn_ext(ctx, qp, kd, vd, mask, kq_scale, hparams.f_max_alibi_bias,
                                                hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f);
        ggml_flash_attn_ext_add_sinks(cur, sinks_in);
        ggml_flash_attn_ext_set_n_kv_max(cur, 0);
        ggml_prec_set_acc(cur, GGML_PREC_F32);
        cur = ggml_reshape_2d(ctx, cur, cur->ne[0] * cur->ne[1], cur->ne[2] * cur->ne[3]);
        if (backend_cpu) {
            ggml_backend_sched_set_tensor_backend(sched, stored, backend_cpu);
            ggml_backend_sched_set_tensor_backend(sched, dense, backend_cpu);
        }
        ops.push_back(std::move(p));
        return cur;
    }

    ggml_tensor * attend_args[5] = { q, k, v, stored, sinks };
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0] * q->ne[1], q->ne[2], 1, 1,
                                       attend_args, sinks ? 5 : 4, kv_ext_attend_op, GGML_N_TASKS_MAX, p.get());
    ggml_format_name(out, "kv_ext_attend-%d", il);

    // custom ops run on the CPU backend only; say so, as build_attn_mha does for !offload_kqv
    if (backend_cpu) {
        ggml_backend_sched_set_tensor_backend(sched, stored, backend_cpu);
        ggml_backend_sched_set_tensor_backend(sched, out, backend_cpu);
    }
    ops.push_back(std::move(p));
    return out;
}

bool llama_kv_ext_graph::can_reuse(const llm_graph_params & params) const {
    if (llama_kv_ext_of(params.mctx) != ext || params.cparams.causal_attn != causal) {
        return false;
    }
    // called after apply(): each layer's dense view (or none) must be what the graph was built
    // with, so that a graph with hc's attend op does not serve a ubatch that gets a view
    for (const auto & [il, n_kv] : dense_views) {
        if (ext->dense_n_kv(il) != n_kv) {
            return false;
        }
    }
    return true;
}

llm_graph_input_attn_ext::llm_graph_input_attn_ext(const llama_hparams & hparams, const llama_cparams & cparams, llama_kv_ext * ext) :
    llm_graph_input_attn_kv(hparams, cparams, nullptr) {
    graph.ext = ext;
    graph.causal = cparams.causal_attn;
    graph.training = cparams.training;
}

void llm_graph_input_attn_ext::set_input(const llama_ubatch * ubatch) {
    // positions and sequences reach the backend through apply(), not through graph inputs
    GGML_UNUSED(ubatch);
}

bool llm_graph_input_attn_ext::can_reuse(const llm_graph_params & params) {
    return graph.can_reuse(params);
}

llm_graph_input_attn_ext_iswa::llm_graph_input_attn_ext_iswa(const llama_hparams & hparams, const llama_cparams & cparams, llama_kv_ext * ext) :
    llm_graph_input_attn_kv_iswa(hparams, cparams, nullptr) {
    graph.ext = ext;
    graph.causal = cparams.causal_attn;
    graph.training = cparams.training;
}

void llm_graph_input_attn_ext_iswa::set_input(const llama_ubatch * ubatch) {
    GGML_UNUSED(ubatch);
}

bool llm_graph_input_attn_ext_iswa::can_reuse(const llm_graph_params & params) {
    return graph.can_reuse(params);
}

//
// creation
//

// architectures whose graphs keep no KV cache (llama_model::create_memory returns none)
static bool kv_ext_no_cache(llm_arch arch) {
    switch (arch) {
        case LLM_ARCH_BERT:
        case LLM_ARCH_JINA_BERT_V2:
        case LLM_ARCH_JINA_BERT_V3:
        case LLM_ARCH_NOMIC_BERT:
        case LLM_ARCH_NOMIC_BERT_MOE:
        case LLM_ARCH_NEO_BERT:
        case LLM_ARCH_EUROBERT:
        case LLM_ARCH_WAVTOKENIZER_DEC:
        case LLM_ARCH_MODERN_BERT:
        case LLM_ARCH_GEMMA_EMBEDDING:
        case LLM_ARCH_DREAM:
        case LLM_ARCH_LLADA:
        case LLM_ARCH_LLADA_MOE:
        case LLM_ARCH_RND1:
            return true;
        default:
            return false;
    }
}

llama_memory_i * llama_kv_ext_create(const llama_model & model, const llama_cparams & cparams,
                                     const char * backend, const char * opts,
                                     ggml_type type_k, ggml_type type_v) {
    if (backend == nullptr) {
        // for apps that cannot be recompiled
        backend = getenv("LLAMA_KV_BACKEND");
        if (backend && opts == nullptr) {
            opts = getenv("LLAMA_KV_BACKEND_OPTS");
        }
    }
    if (backend == nullptr || backend[0] == '\0' || strcmp(backend, "none") == 0) {
        return nullptr;
    }
    if (kv_ext_no_cache(model.arch)) {
        LLAMA_LOG_WARN("%s: architecture '%s' keeps no KV cache; KV backend '%s' is not used\n", __func__,
                llm_arch_name(model.arch), backend);
        return nullptr;
    }
    const llama_kv_backend_iface * iface = llama_kv_ext_find_backend(backend);
    if (type_k != GGML_TYPE_F16 || type_v != GGML_TYPE_F16) {
        LLAMA_LOG_WARN("%s: the cache types (-ctk %s, -ctv %s) apply to the stock cache only; KV backend '%s' stores keys and values as its options say\n",
                __func__, ggml_type_name(type_k), ggml_type_name(type_v), backend);
    }
    return new llama_kv_ext(model, cparams, iface, opts ? opts : "");
}
