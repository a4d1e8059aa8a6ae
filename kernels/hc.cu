// The GPU fast tier's kernels. CUDA C, compiled when the program runs by NVRTC (src/gpu/cuda.rs),
// so it includes nothing: every type and helper it needs is defined here.
//
// Layout of one layer's key codes in device memory (src/gpu/layout.rs is the host-side twin and
// the reference the tests use): for each KV head a block of `rows` rows of `n_cells` entries,
// row r holding sub-vector position r of every cell ("column-major", so that the threads of a
// warp, one cell each, read consecutive bytes). 4-bit codes put positions 2r and 2r+1 in the low
// and high nibble of row r's byte; 8-bit codes one byte; 16-bit codes two bytes.
//
// Selection follows src/select.rs exactly: the top-p set is the shortest prefix, in order of
// decreasing probability with ties to the lower index, whose mass (in f64) reaches tau; top-k
// takes the first k of that order. Here it is found by a radix search over the probabilities'
// bit patterns (no sort), then compacted in index order.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define HEADS_PER_THREAD 8
#define SELECT_THREADS 1024

__device__ __forceinline__ u32 code_at(const u8 *codes, int bits, u32 n_cells, u32 i, u32 cell) {
    if (bits == 4) {
        u8 b = codes[(size_t)(i >> 1) * n_cells + cell];
        return (i & 1) ? (u32)(b >> 4) : (u32)(b & 15);
    }
    if (bits == 8) {
        return codes[(size_t)i * n_cells + cell];
    }
    return ((const u16 *)codes)[(size_t)i * n_cells + cell];
}

__device__ __forceinline__ u32 code_rows(int bits, u32 per_head) {
    return bits == 4 ? (per_head + 1) / 2 : per_head;
}

__device__ __forceinline__ size_t head_block_bytes(int bits, u32 per_head, u32 n_cells) {
    return (size_t)code_rows(bits, per_head) * n_cells * (bits == 16 ? 2 : 1);
}

// Writes staged codes (m cells, each n_kvh * per_head u16 codes, row-major as the CPU tier
// encodes them) into the layout above at the cells named by `cells`.
// Grid: one thread per (staged cell, KV head, row).
extern "C" __global__ void hc_pack(u8 *codes, int bits, u32 n_cells, u32 n_kvh, u32 per_head,
                                   const u16 *staged, const u32 *cells, u32 m) {
    u32 rows = code_rows(bits, per_head);
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)m * n_kvh * rows) return;
    u32 r = (u32)(t % rows);
    u32 kvh = (u32)((t / rows) % n_kvh);
    u32 j = (u32)(t / ((size_t)rows * n_kvh));
    u32 cell = cells[j];
    if (cell >= n_cells) return;
    const u16 *src = staged + ((size_t)j * n_kvh + kvh) * per_head;
    u8 *block = codes + kvh * head_block_bytes(bits, per_head, n_cells);
    if (bits == 4) {
        u32 lo = src[2 * r] & 15;
        u32 hi = (2 * r + 1 < per_head) ? (src[2 * r + 1] & 15) : 0;
        block[(size_t)r * n_cells + cell] = (u8)(lo | (hi << 4));
    } else if (bits == 8) {
        block[(size_t)r * n_cells + cell] = (u8)src[r];
    } else {
        ((u16 *)block)[(size_t)r * n_cells + cell] = src[r];
    }
}

// Nearest centroid (L2, ties to the lower index) of each `dim`-dim sub-vector of m keys
// (row-major, n_sub sub-vectors a key). Sub-vector i uses book (n_books == 1 ? 0 : i % per_head).
// Like the CPU tier it ranks by ||c||^2 - 2<x,c>. Grid: one warp per sub-vector.
extern "C" __global__ void hc_encode(const float *keys, u32 m, u32 n_sub, u32 per_head, u32 dim,
                                     const float *books, u32 n_books, u32 centroids, u16 *out) {
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    u32 lane = threadIdx.x & 31;
    if (warp >= (size_t)m * n_sub) return;
    u32 i = (u32)(warp % n_sub);
    const float *x = keys + warp * dim;
    const float *book = books + (size_t)(n_books == 1 ? 0 : i % per_head) * centroids * dim;
    float best = 3.402823466e38f;
    u32 arg = 0xffffffffu;
    for (u32 c = lane; c < centroids; c += 32) {
        float norm = 0.0f, dot = 0.0f;
        for (u32 d = 0; d < dim; d++) {
            float v = book[(size_t)c * dim + d];
            norm += v * v;
            dot += x[d] * v;
        }
        float s = norm - 2.0f * dot;
        if (s < best) {  // c grows along a lane: the first minimum wins the lane's ties
            best = s;
            arg = c;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float ob = __shfl_down_sync(0xffffffffu, best, off);
        u32 oa = __shfl_down_sync(0xffffffffu, arg, off);
        if (ob < best || (ob == best && oa < arg)) {
            best = ob;
            arg = oa;
        }
    }
    if (lane == 0) out[warp] = (u16)(arg == 0xffffffffu ? 0 : arg);
}

// Query tables: tables[h][i][c] = <q_h[i*dim .. (i+1)*dim], centroid c of book(i)>, for the
// n_head query heads (f32 queries, already rounded to f16 by the host as the CPU tier does).
// Grid: x over centroids, y = sub-vector position i, z = head.
extern "C" __global__ void hc_tables(const float *q, u32 dk, u32 dim, const float *books, u32 n_books,
                                     u32 centroids, float *tables) {
    u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    u32 i = blockIdx.y, h = blockIdx.z;
    u32 per_head = dk / dim;
    if (c >= centroids) return;
    const float *book = books + (size_t)(n_books == 1 ? 0 : i) * centroids * dim;
    const float *qi = q + (size_t)h * dk + i * dim;
    float s = 0.0f;
    for (u32 d = 0; d < dim; d++) s += qi[d] * book[(size_t)c * dim + d];
    tables[((size_t)h * per_head + i) * centroids + c] = s;
}

// Logits of every query head against the visible cells: for visible index j (cell cells[j], or
// base + j when `cells` is null: one sequence's cells in order), sum over positions i of tables[h][i][code(i, cell)], then the
// model's scale and soft cap. One pass over a KV head's codes serves its g query heads (GQA).
// Grid: x over j, y = KV head, z over groups of HEADS_PER_THREAD query heads.
extern "C" __global__ void hc_score(const u8 *codes, int bits, u32 n_cells, u32 per_head, u32 centroids,
                                    u32 g, const float *tables, const u32 *cells, u32 base, u32 n,
                                    float kq_scale, float softcap, float *logits) {
    u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    u32 kvh = blockIdx.y;
    u32 h0 = blockIdx.z * HEADS_PER_THREAD;
    if (j >= n) return;
    u32 hn = g - h0 < HEADS_PER_THREAD ? g - h0 : HEADS_PER_THREAD;
    u32 cell = cells ? cells[j] : base + j;
    const u8 *block = codes + kvh * head_block_bytes(bits, per_head, n_cells);
    const float *t = tables + (size_t)(kvh * g + h0) * per_head * centroids;
    float acc[HEADS_PER_THREAD];
    for (u32 k = 0; k < HEADS_PER_THREAD; k++) acc[k] = 0.0f;
    for (u32 i = 0; i < per_head; i++) {
        u32 code = code_at(block, bits, n_cells, i, cell);
        for (u32 k = 0; k < hn; k++) acc[k] += t[((size_t)k * per_head + i) * centroids + code];
    }
    for (u32 k = 0; k < hn; k++) {
        float z = acc[k] * kq_scale;
        if (softcap != 0.0f) z = softcap * tanhf(z / softcap);
        logits[(size_t)(kvh * g + h0 + k) * n + j] = z;
    }
}

// Logits the host computed exactly (cells whose keys the store keeps exact: sink, recent, not
// yet encoded), written over the coded ones: logits[at[k]] = val[k].
extern "C" __global__ void hc_override(float *logits, const u32 *at, const float *val, u32 m) {
    u32 k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < m) logits[at[k]] = val[k];
}

// Block-wide reductions for SELECT_THREADS threads (32 warps).
__device__ float block_max(float v, float *sh) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : -3.402823466e38f;
    if (threadIdx.x < 32)
        for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

__device__ double block_sum(double v, double *sh) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0.0;
    if (threadIdx.x < 32)
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

// Softmax of each head's n logits in place; sinks (nullable) holds one more logit per head that
// takes mass but has no value. Nothing finite: all zero. Grid: one block of SELECT_THREADS per head.
extern "C" __global__ void hc_softmax(float *logits, u32 n, const float *sinks) {
    __shared__ double shd[32];
    __shared__ float shf[32];
    float *l = logits + (size_t)blockIdx.x * n;
    float m = -3.402823466e38f;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, l[j]);
    m = block_max(m, shf);
    float sk = sinks ? sinks[blockIdx.x] : -3.402823466e38f;
    m = fmaxf(m, sk);
    if (!(m > -3.402823466e38f) || m > 3.402823466e38f) {  // nothing finite (or +inf)
        for (u32 j = threadIdx.x; j < n; j += blockDim.x) l[j] = 0.0f;
        return;
    }
    double s = 0.0;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        float e = expf(l[j] - m);
        l[j] = e;
        s += e;
    }
    s = block_sum(s, shd);
    if (sinks) s += expf(sk - m);
    float inv = s > 0.0 ? (float)(1.0 / s) : 0.0f;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) l[j] *= inv;
}

// The cut of one head: every probability whose bits exceed `bits`, plus the first `ties` (in
// index order) equal to it. cut[h] = {bits, above, ties, k}; mass[h] = the selected mass.
// Rule: k_in == null: top-p with tau (tau >= 1: everything); else top-k with k = *k_in.
// Four passes of 8 bits each narrow the bucket that holds the boundary; thread 0 walks the
// buckets from the top. Grid: one block of SELECT_THREADS per head.
extern "C" __global__ void hc_cut(const float *probs, u32 n, float tau, const u32 *k_in, u32 *cut, double *mass) {
    __shared__ u32 cnt[256];
    __shared__ double ms[256];
    __shared__ u32 st[4];  // prefix, chosen bucket count, above, done-all flag
    __shared__ double above_mass;
    const float *p = probs + (size_t)blockIdx.x * n;
    u32 k = k_in ? (*k_in < n ? *k_in : n) : 0;
    bool all = k_in ? (k >= n) : (tau >= 1.0f);
    if (k_in && k == 0) {
        // nothing: no probability's bits exceed all ones, and no ties are taken
        if (threadIdx.x == 0) {
            u32 *c = cut + 4 * blockIdx.x;
            c[0] = 0xffffffffu;
            c[1] = 0;
            c[2] = 0;
            c[3] = 0;
            mass[blockIdx.x] = 0.0;
        }
        return;
    }
    if (threadIdx.x == 0) {
        st[0] = 0;
        st[1] = 0;
        st[2] = 0;
        st[3] = all ? 1 : 0;
        above_mass = 0.0;
    }
    __syncthreads();
    u32 mask = 0;
    for (int pass = 0; pass < 4 && !st[3]; pass++) {
        int shift = 24 - 8 * pass;
        for (u32 b = threadIdx.x; b < 256; b += blockDim.x) {
            cnt[b] = 0;
            ms[b] = 0.0;
        }
        __syncthreads();
        u32 prefix = st[0];
        for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
            u32 b = __float_as_uint(p[j]);
            if ((b & mask) == prefix) {
                u32 d = (b >> shift) & 255;
                atomicAdd(&cnt[d], 1u);
                if (!k_in) atomicAdd(&ms[d], (double)p[j]);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int chosen = -1, lowest = -1;
            for (int d = 255; d >= 0; d--) {
                if (cnt[d] == 0) continue;
                bool reach = k_in ? (st[2] + cnt[d] >= k) : (above_mass + ms[d] >= (double)tau);
                if (reach) {
                    chosen = d;
                    break;
                }
                st[2] += cnt[d];
                above_mass += ms[d];
                lowest = d;
            }
            if (chosen < 0 && pass > 0) {
                // the bucket chosen in the pass before reached tau, its parts summed in another
                // order do not: its lowest part completes it
                chosen = lowest;
                st[2] -= cnt[lowest];
                above_mass -= ms[lowest];
            }
            if (chosen < 0) {
                st[3] = 1;  // the whole mass falls short of tau: everything
            } else {
                st[0] = prefix | ((u32)chosen << shift);
                st[1] = cnt[chosen];
            }
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    u32 *c = cut + 4 * blockIdx.x;
    if (st[3]) {
        // everything: bits 0 with unlimited ties selects every probability (all are >= +0)
        double total = 0.0;
        for (u32 j = 0; j < n; j++) total += (double)p[j];
        c[0] = 0;
        c[1] = 0;
        c[2] = 0xffffffffu;
        c[3] = n;
        mass[blockIdx.x] = total;
        return;
    }
    float t = __uint_as_float(st[0]);
    u32 ties;
    double m = above_mass;
    if (k_in) {
        ties = k - st[2];
        m += (double)ties * (double)t;
    } else {
        // add tied values one at a time, as the sequential reference does
        ties = 0;
        while (ties < st[1]) {
            m += (double)t;
            ties++;
            if (m >= (double)tau) break;
        }
    }
    if (k_in) {
        // top-k: the reference sums the selected probabilities; recompute the above part
        // exactly rather than from bucket sums, which were not kept in this mode
        double s = 0.0;
        for (u32 j = 0; j < n; j++)
            if (__float_as_uint(p[j]) > st[0]) s += (double)p[j];
        m = s + (double)ties * (double)t;
    }
    c[0] = st[0];
    c[1] = st[2];
    c[2] = ties;
    c[3] = st[2] + ties;
    mass[blockIdx.x] = m;
}

// The layer's k (select=layer): the largest head k on a 1% grid of n, as select::layer_k.
extern "C" __global__ void hc_layer_k(const u32 *cut, u32 n_head, u32 n, u32 *k_out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    u32 kmax = 0;
    for (u32 h = 0; h < n_head; h++) kmax = cut[4 * h + 3] > kmax ? cut[4 * h + 3] : kmax;
    u32 k;
    if (kmax == 0 || n == 0) {
        k = kmax < n ? kmax : n;
    } else {
        u32 s = n / 100 > 1 ? n / 100 : 1;
        k = 1 + ((kmax - 1 + s - 1) / s) * s;
        if (k > n) k = n;
    }
    *k_out = k;
}

// Exclusive prefix of a flag over the block, in thread order; returns the block total in *total.
__device__ u32 block_rank(bool flag, u32 *sh, u32 *total) {
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 ballot = __ballot_sync(0xffffffffu, flag);
    u32 before = __popc(ballot & ((1u << lane) - 1));
    if (lane == 0) sh[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 acc = 0;
        for (u32 w = 0; w < (blockDim.x >> 5); w++) {
            u32 v = sh[w];
            sh[w] = acc;
            acc += v;
        }
        sh[32] = acc;
    }
    __syncthreads();
    u32 r = sh[warp] + before;
    *total = sh[32];
    __syncthreads();
    return r;
}

// Every head's selected indices (into the visible list) and probabilities, in index order,
// packed head after head: head h starts at the sum of the k of the heads before it.
// Grid: one block of SELECT_THREADS per head.
extern "C" __global__ void hc_compact(const float *probs, u32 n, const u32 *cut, u32 *sel, float *sel_p) {
    __shared__ u32 sh[33];
    u32 h = blockIdx.x;
    size_t base = 0;
    for (u32 k = 0; k < h; k++) base += cut[4 * k + 3];
    u32 t = cut[4 * h], ties = cut[4 * h + 2];
    const float *p = probs + (size_t)h * n;
    u32 done = 0, tied = 0;
    for (u32 start = 0; start < n; start += blockDim.x) {
        u32 j = start + threadIdx.x;
        bool valid = j < n;
        u32 b = valid ? __float_as_uint(p[j]) : 0;
        bool gt = valid && b > t;
        bool tie = valid && b == t;
        u32 tie_total, sel_total;
        u32 tie_rank = tied + block_rank(tie, sh, &tie_total);
        bool take = gt || (tie && tie_rank < ties);
        u32 pos = done + block_rank(take, sh, &sel_total);
        if (take) {
            sel[base + pos] = j;
            sel_p[base + pos] = p[j];
        }
        done += sel_total;
        tied += tie_total;
    }
}
