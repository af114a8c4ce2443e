// Per-layer elementwise kernels of the Llama/Qwen forward pass (launched from
// src/gpu/layer_ops.rs): RMSNorm, rotate-half RoPE, SwiGLU and the residual add, for f32 and
// bf16 tensors (bf16 storage, f32 arithmetic). CPU references: tests/gpu.rs (f64), matching
// src/model/llama.rs.

#include <cuda_bf16.h>

namespace tko {

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, long long i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, long long i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, long long i, float x) {
  p[i] = __float2bfloat16_rn(x);
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, one CTA per row of d. Rows of Qwen3's per-head
// q/k norm are heads (d = head_dim). The input may be wider than the weight and output (the
// decode step's f32 residual into the bf16 input of the next GEMM).
template <typename TX, typename T>
__device__ void rmsnorm(const TX* x, const T* w, T* out, int d, float eps) {
  __shared__ float part[32];
  const long long row = (long long)blockIdx.x * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = load(x, row + i);
    ss += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < (int)((blockDim.x + 31) >> 5); i++) total += part[i];
  const float inv = 1.f / sqrtf(total / (float)d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) store(out, row + i, load(x, row + i) * inv * load(w, i));
}

// Rotate-half RoPE in place on x [tokens][heads][head_dim]: dim j < half pairs with j + half,
// angle = position * inv_freq[j] in f32 (inv_freq carries any Llama-3 scaling).
template <typename T>
__device__ void rope(T* x, const float* inv_freq, const int* positions, int heads, int head_dim) {
  const int tok = blockIdx.x, half = head_dim / 2;
  const float pos = (float)positions[tok];
  for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
    const int h = i / half, j = i % half;
    float s, c;
    sincosf(pos * inv_freq[j], &s, &c);
    const long long at = ((long long)tok * heads + h) * head_dim;
    const float x0 = load(x, at + j), x1 = load(x, at + j + half);
    store(x, at + j, x0 * c - x1 * s);
    store(x, at + j + half, x1 * c + x0 * s);
  }
}

// out = silu(gate) * up.
template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float g = load(gate, i);
    store(out, i, g / (1.f + expf(-g)) * load(up, i));
  }
}

// x += y.
template <typename T>
__device__ void add(T* x, const T* y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    store(x, i, load(x, i) + load(y, i));
}

}  // namespace tko

#define TKO_ENTRIES(SUFFIX, T)                                                                    \
  extern "C" __global__ void tkv_rmsnorm_##SUFFIX(const T* x, const T* w, T* out, int d,        \
                                                  float eps) {                                   \
    tko::rmsnorm(x, w, out, d, eps);                                                             \
  }                                                                                              \
  extern "C" __global__ void tkv_rope_##SUFFIX(T* x, const float* inv_freq, const int* positions, \
                                               int heads, int head_dim) {                        \
    tko::rope(x, inv_freq, positions, heads, head_dim);                                          \
  }                                                                                              \
  extern "C" __global__ void tkv_swiglu_##SUFFIX(const T* gate, const T* up, T* out,            \
                                                 long long n) {                                  \
    tko::swiglu(gate, up, out, n);                                                               \
  }                                                                                              \
  extern "C" __global__ void tkv_add_##SUFFIX(T* x, const T* y, long long n) { tko::add(x, y, n); }

TKO_ENTRIES(f32, float)
TKO_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void tkv_rmsnorm_f32_bf16(const float* x, const __nv_bfloat16* w,
                                                __nv_bfloat16* out, int d, float eps) {
  tko::rmsnorm(x, w, out, d, eps);
}
