// What kernels/hc.cu takes from the CUDA toolkit, declared for clang's CUDA front end so that a
// machine without CUDA can compile the kernels to PTX (tests/gpu_kernels.rs). Only the types and
// names matter here: NVRTC compiles the real thing when the program runs.
#define __device__ __attribute__((device))
#define __global__ __attribute__((global))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
#include <__clang_cuda_builtin_vars.h>

typedef unsigned long size_t;

__device__ float expf(float);
__device__ float tanhf(float);
__device__ float fmaxf(float, float);

__device__ static inline unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
__device__ static inline float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
__device__ static inline int __popc(unsigned x) { return __builtin_popcount(x); }
__device__ static inline unsigned __ballot_sync(unsigned mask, bool p) { return __nvvm_vote_ballot_sync(mask, p); }
__device__ static inline float __shfl_down_sync(unsigned mask, float v, int off) {
    return __nvvm_shfl_sync_down_f32(mask, v, off, 0x1f);
}
__device__ static inline unsigned __shfl_down_sync(unsigned mask, unsigned v, int off) {
    return (unsigned)__nvvm_shfl_sync_down_i32(mask, (int)v, off, 0x1f);
}
__device__ static inline float __shfl_xor_sync(unsigned mask, float v, int off) {
    return __nvvm_shfl_sync_bfly_f32(mask, v, off, 0x1f);
}
__device__ static inline double __shfl_xor_sync(unsigned mask, double v, int off) {
    long long b = __builtin_bit_cast(long long, v);
    int lo = __nvvm_shfl_sync_bfly_i32(mask, (int)b, off, 0x1f);
    int hi = __nvvm_shfl_sync_bfly_i32(mask, (int)(b >> 32), off, 0x1f);
    return __builtin_bit_cast(double, ((long long)hi << 32) | (unsigned)lo);
}
__device__ static inline unsigned atomicAdd(unsigned *p, unsigned v) {
    return (unsigned)__nvvm_atom_add_gen_i((int *)p, (int)v);
}
__device__ static inline double atomicAdd(double *p, double v) { return __nvvm_atom_add_gen_d(p, v); }
