// Glue kernels of the whole-model decode step (`triaxkv bench decode-step`, launched from
// src/gpu/decode_step.rs): random bf16 weights filled on the device, the embedding gather,
// q of the fused QKV row -> (optional per-head RMSNorm) -> rotate-half RoPE -> fp16 for the
// decode-attention kernel, the new token's K/V into its 16-bit block, the attention output ->
// bf16, the SwiGLU of a fused gate/up row, a greedy argmax and
// nucleus sampling (src/gpu/sampling.rs).
// bf16 storage, f32 arithmetic. CPU reference: tests/gpu.rs (decode_step_matches_cpu_reference).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;

__device__ __forceinline__ u32 tkv_hash(unsigned long long i, u32 seed) {
  u32 x = (u32)(i * 2654435761ull) ^ (u32)(i >> 32) * 0x9e3779b9u ^ seed;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// p[i] = offset + scale * u, u uniform in [-1, 1) from a hash of (i, seed).
extern "C" __global__ void tkv_fill_bf16(__nv_bfloat16* p, long long n, u32 seed, float offset,
                                         float scale) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float u = (tkv_hash((unsigned long long)i, seed) >> 8) * (2.f / 16777216.f) - 1.f;
    p[i] = __float2bfloat16_rn(offset + scale * u);
  }
}

// out[b] = table[ids[b]] (rows of `hidden`); one CTA per row.
extern "C" __global__ void tkv_embed_bf16(const __nv_bfloat16* table, const int* ids,
                                          __nv_bfloat16* out, int hidden, int vocab) {
  const int b = blockIdx.x;
  int id = ids[b];
  id = id < 0 ? 0 : (id >= vocab ? vocab - 1 : id);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[(long long)b * hidden + i] = table[(long long)id * hidden + i];
}

// out[b] = f32 of table[ids[b]]: the residual stream stays f32 (as llama.cpp keeps it), so
// rounding does not accumulate over the layers; one CTA per row.
extern "C" __global__ void tkv_embed_f32(const __nv_bfloat16* table, const int* ids, float* out,
                                         int hidden, int vocab) {
  const int b = blockIdx.x;
  int id = ids[b];
  id = id < 0 ? 0 : (id >= vocab ? vocab - 1 : id);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    out[(long long)b * hidden + i] = __bfloat162float(table[(long long)id * hidden + i]);
}

// One CTA of 64 threads per (sequence, query head): q of row b of the fused QKV output
// (`row` values per row, q first, heads of `hd` <= 128 values) -> optional RMSNorm over the head
// (weight qnorm[hd], output rounded to bf16 as a bf16 model stores it) -> rotate-half RoPE at
// positions[b] in f32 -> fp16 into q16 [b][head][128] (the decode-attention kernel's q; dims
// from hd on are zero, so a head dim of 64 runs through the 128 kernel with exact scores).
__device__ __forceinline__ void tkv_head_rope(const __nv_bfloat16* src, int hd,
                                              const __nv_bfloat16* norm, float eps,
                                              float inv_freq_j, int pos, float& y0, float& y1) {
  __shared__ float part[2];
  const int j = threadIdx.x, hh = hd >> 1;
  const bool live = j < hh;
  float x0 = live ? __bfloat162float(src[j]) : 0.f;
  float x1 = live ? __bfloat162float(src[j + hh]) : 0.f;
  if (norm != nullptr) {
    float ss = x0 * x0 + x1 * x1;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((j & 31) == 0) part[j >> 5] = ss;
    __syncthreads();
    const float inv = 1.f / sqrtf((part[0] + part[1]) / (float)hd + eps);
    if (live) {
      x0 = __bfloat162float(__float2bfloat16_rn(x0 * inv * __bfloat162float(norm[j])));
      x1 = __bfloat162float(__float2bfloat16_rn(x1 * inv * __bfloat162float(norm[j + hh])));
    }
  }
  float s = 0.f, c = 1.f;
  if (live) sincosf((float)pos * inv_freq_j, &s, &c);
  y0 = x0 * c - x1 * s;
  y1 = x1 * c + x0 * s;
}

extern "C" __global__ void tkv_q_rope_f16(const __nv_bfloat16* qkv, int row, int hd,
                                          const __nv_bfloat16* qnorm, float eps,
                                          const float* inv_freq, const int* positions,
                                          unsigned short* q16) {
  const int b = blockIdx.x, h = blockIdx.y, heads = gridDim.y, j = threadIdx.x, hh = hd >> 1;
  float y0, y1;
  tkv_head_rope(qkv + (long long)b * row + (long long)h * hd, hd, qnorm, eps,
                j < hh ? inv_freq[j] : 0.f, positions[b], y0, y1);
  const long long o = ((long long)b * heads + h) * 128;
  if (j < hh) {
    q16[o + j] = __half_as_ushort(__float2half_rn(y0));
    q16[o + j + hh] = __half_as_ushort(__float2half_rn(y1));
  }
  for (int d = hd + j; d < 128; d += 64) q16[o + d] = 0;
}

// Byte offsets of key / value (tok, dim) in a 16-bit block of head dim 128 (docs/KV_LAYOUT.md;
// `BlockGeometry::k_code_pos` / `v_code_pos` for the F16 class).
__device__ __forceinline__ int tkv_lane_word(int lane, int j, int nw) {
  const int r = nw < 4 ? nw : 4;
  return (j / r) * 128 * r + lane * 4 * r + (j % r) * 4;
}
__device__ __forceinline__ int tkv_f16_k_off(int tok, int dim) {
  const int c = dim / 16, w = dim % 16, t = (w % 8) / 2, b = w / 8, hi = w % 2;
  return (tok / 8) * 2048 + tkv_lane_word(4 * (tok % 8) + t, 2 * c + b, 16) + 2 * hi;
}
__device__ __forceinline__ int tkv_f16_v_off(int tok, int dim) {
  const int m = dim / 16, w = dim % 16, g = w % 8, row_hi = w / 8;
  const int rr = tok % 16, t = (rr % 8) / 2, hi = rr % 2, tok_hi = rr / 8;
  return (tok / 16) * 4096 + tkv_lane_word(4 * g + t, 4 * m + row_hi + 2 * tok_hi, 32) + 2 * hi;
}

// Byte offsets of key / value (tok, dim) in an FP8 block of head dim 128 (`k_pos` / `v_pos` of
// prefill_attention.cu for the FP8 class; the value offset is from the V area's start).
__device__ __forceinline__ int tkv_fp8_k_off(int tok, int dim) {
  const int c = dim / 16, w = dim % 16, t = (w % 8) / 2, b = w / 8, hi = w % 2;
  const int rr = tok % 16, g = rr % 8, second = rr / 8;
  return (tok / 16) * 2048 + tkv_lane_word(4 * g + t, second * 8 + c, 16) + 2 * b + hi;
}
__device__ __forceinline__ int tkv_fp8_v_off(int tok, int dim) {
  const int m = dim / 16, w = dim % 16, g = w % 8, row_hi = w / 8;
  const int rr = tok % 16, t = (rr % 8) / 2, hi = rr % 2, tok_hi = rr / 8;
  const int a = row_hi + 2 * tok_hi;
  return (tok / 16) * 2048 + tkv_lane_word(4 * g + t, 2 * m + a / 2, 16) + 2 * (a % 2) + hi;
}

// E4M3 of x, round to nearest even, saturating (the token moves' encoder).
__device__ __forceinline__ unsigned char tkv_e4m3(float x) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(0.f), "f"(x));
  return (unsigned char)(r & 0xffu);
}

// One CTA of 64 threads per (sequence, KV head): the new token's k (optional per-head RMSNorm,
// RoPE) and v from its fused QKV row (k at q_dim, v at q_dim + kv_heads * hd) -> fp16 into
// token slot tok[b] of the 16-bit block in pool slot slot[b] (`slab_bytes` per (slot, KV head)
// slab, V codes at `v_off`); dims from hd to 128 are written zero. Where fp8[b] is set, the
// block is an FP8 waiting block instead: E4M3 of x / fp8_scale (V codes at `fp8_v_off`), and
// the block's K and V scales at `fp8_ks_off` written as every token moved there writes them.
extern "C" __global__ void tkv_kv_append_f16(const __nv_bfloat16* qkv, int row, int q_dim, int hd,
                                             const __nv_bfloat16* knorm, float eps,
                                             const float* inv_freq, const int* positions,
                                             unsigned char* pool, long long slab_bytes, int v_off,
                                             const int* slot, const int* tok, const int* fp8,
                                             int fp8_v_off, int fp8_ks_off, float fp8_scale) {
  const int b = blockIdx.x, h = blockIdx.y, kv_heads = gridDim.y, j = threadIdx.x;
  const int hh = hd >> 1, t = tok[b];
  const __nv_bfloat16* krow = qkv + (long long)b * row + q_dim + (long long)h * hd;
  const __nv_bfloat16* vrow = krow + (long long)kv_heads * hd;
  float y0, y1;
  tkv_head_rope(krow, hd, knorm, eps, j < hh ? inv_freq[j] : 0.f, positions[b], y0, y1);
  unsigned char* slab = pool + ((long long)slot[b] * kv_heads + h) * slab_bytes;
  if (fp8[b]) {
    const float inv = 1.f / fp8_scale;
    if (j < hh) {
      slab[tkv_fp8_k_off(t, j)] = tkv_e4m3(y0 * inv);
      slab[tkv_fp8_k_off(t, j + hh)] = tkv_e4m3(y1 * inv);
    }
    for (int d = hd + j; d < 128; d += 64) slab[tkv_fp8_k_off(t, d)] = 0;
    for (int d = j; d < 128; d += 64)
      slab[fp8_v_off + tkv_fp8_v_off(t, d)] =
          d < hd ? tkv_e4m3(__bfloat162float(vrow[d]) * inv) : (unsigned char)0;
    if (j < 2) reinterpret_cast<float*>(slab + fp8_ks_off)[j] = fp8_scale;
    return;
  }
  auto put = [&](int off, float x) {
    *reinterpret_cast<__half*>(slab + off) = __float2half_rn(x);
  };
  if (j < hh) {
    put(tkv_f16_k_off(t, j), y0);
    put(tkv_f16_k_off(t, j + hh), y1);
  }
  for (int d = hd + j; d < 128; d += 64) put(tkv_f16_k_off(t, d), 0.f);
  for (int d = j; d < 128; d += 64)
    put(v_off + tkv_f16_v_off(t, d), d < hd ? __bfloat162float(vrow[d]) : 0.f);
}

// out [rows][128] f32 (the decode-attention output) -> attn [rows][hd] bf16.
extern "C" __global__ void tkv_attn_out_bf16(const float* out, __nv_bfloat16* attn, int hd,
                                             long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    attn[i] = __float2bfloat16_rn(out[(i / hd) * 128 + i % hd]);
}


// gu [rows][2 * inter] = [gate | up] per row -> out [rows][inter] = silu(gate) * up.
extern "C" __global__ void tkv_swiglu_fused_bf16(const __nv_bfloat16* gu, __nv_bfloat16* out,
                                                 int inter, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / inter, c = i % inter;
    const float g = __bfloat162float(gu[r * 2 * inter + c]);
    const float u = __bfloat162float(gu[r * 2 * inter + inter + c]);
    out[i] = __float2bfloat16_rn(g / (1.f + expf(-g)) * u);
  }
}

// ids[b] = argmax of logits row b (f32, `vocab` values; ties to the lower index, NaN never
// wins); one CTA of 1024 threads per row.
extern "C" __global__ void tkv_argmax_f32(const float* logits, int vocab, int* ids) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const float* row = logits + (long long)blockIdx.x * vocab;
  float best = __int_as_float(0xff800000);  // -inf (NVRTC has no math.h)
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = row[i];
    if (v > best) {
      best = v;
      idx = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int k = __shfl_xor_sync(0xffffffffu, idx, o);
    if (v > best || (v == best && k < idx)) {
      best = v;
      idx = k;
    }
  }
  const int w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if ((threadIdx.x & 31) == 0) {
    sv[w] = best;
    si[w] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < nw; i++)
      if (sv[i] > best || (sv[i] == best && si[i] < idx)) {
        best = sv[i];
        idx = si[i];
      }
    ids[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
  }
}

// ---- Nucleus (top-p) sampling: the CPU Sampler's rule (src/model/sampling.rs) without a sort.
// p_i = softmax(logits / T). The nucleus is {i : p_i >= tau} for the largest tau whose mass
// reaches top_p; the draw is the token at which the mass, taken in decreasing probability,
// first exceeds coin * (nucleus mass). Both thresholds are found by bisection on the bit
// pattern of a probability (monotone for non-negative floats), each step one block-wide sum;
// ties at the chosen probability go to the lowest index (the CPU's order among ties is
// unspecified). One CTA of 1024 threads per row.

__device__ __forceinline__ float tkv_block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may still be read by the previous reduction
  if ((threadIdx.x & 31) == 0) red[w] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < nw; i++) s += red[i];  // same order in every thread: same result
  return s;
}

__device__ __forceinline__ float tkv_block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[w] = v;
  __syncthreads();
  float m = red[0];
  for (int i = 1; i < nw; i++) m = fmaxf(m, red[i]);
  return m;
}

// Mass of the tokens whose probability bits are >= `bits`.
__device__ __forceinline__ float tkv_mass_at_least(const float* row, int vocab, float m,
                                                   float inv_t, float inv_z, u32 bits,
                                                   float* red) {
  float s = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float p = expf((row[i] - m) * inv_t) * inv_z;
    if (__float_as_uint(p) >= bits) s += p;
  }
  return tkv_block_sum(s, red);
}

extern "C" __global__ void tkv_sample_top_p_f32(const float* logits, int vocab, float inv_t,
                                                float top_p, const float* coins, int* ids) {
  __shared__ float red[32];
  __shared__ int s_idx[32];
  const float* row = logits + (long long)blockIdx.x * vocab;
  float m = __int_as_float(0xff800000);
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row[i]);
  m = tkv_block_max(m, red);
  float z = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += expf((row[i] - m) * inv_t);
  const float inv_z = 1.f / tkv_block_sum(z, red);

  // Largest tau with mass(>= tau) >= top_p. Invariant: mass(lo) >= top_p (mass(0) is all of
  // it, rounding aside: top_p >= 1 keeps everything), mass(hi) < top_p (hi is above 1.0).
  const u32 one_up = 0x3f800001u;
  u32 lo = 0, hi = one_up;
  if (top_p < 1.f) {
    while (hi - lo > 1) {
      const u32 mid = lo + (hi - lo) / 2;
      if (tkv_mass_at_least(row, vocab, m, inv_t, inv_z, mid, red) >= top_p) lo = mid;
      else hi = mid;
    }
  }
  const float kept = tkv_mass_at_least(row, vocab, m, inv_t, inv_z, lo, red);
  const float target = coins[blockIdx.x] * kept;
  // Largest v with mass(>= v) > target: the probability of the drawn token.
  u32 vlo = lo, vhi = one_up;
  while (vhi - vlo > 1) {
    const u32 mid = vlo + (vhi - vlo) / 2;
    if (tkv_mass_at_least(row, vocab, m, inv_t, inv_z, mid, red) > target) vlo = mid;
    else vhi = mid;
  }
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab && idx == 0x7fffffff; i += blockDim.x) {
    const float p = expf((row[i] - m) * inv_t) * inv_z;
    if (__float_as_uint(p) == vlo) idx = i;
  }
  for (int o = 16; o > 0; o >>= 1) idx = min(idx, __shfl_xor_sync(0xffffffffu, idx, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s_idx[threadIdx.x >> 5] = idx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < (int)((blockDim.x + 31) >> 5); i++) idx = min(idx, s_idx[i]);
    ids[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
  }
}
