// Quantize-append: new keys and values (f32, [token][kv_head][head_dim]) -> whole packed blocks
// of their precision class in the block pool, byte for byte what `QuantizedBlock::quantize` +
// `pack` make on the CPU (src/quant/layout.rs, docs/KV_LAYOUT.md). Launched from
// src/gpu/quantize_append.rs; any head dim that is a multiple of 64.
//
// One CTA = one job (a block: pool slot, class, its tokens) x one KV head. The slab is built in
// shared memory (codes of 2 and 4 bits share bytes: shared atomics), then stored with 16-byte
// writes, so unused token slots come out zero as the layout requires. A job with a start token
// (INT4/INT2, at a key-group boundary) appends to a block already holding `start` tokens: the
// slab is read first and the new tokens' codes, whose bits are still zero, ORed in; their key
// groups and value parameters are their own, so the block ends byte for byte what quantizing
// all its tokens at once makes.
// Arithmetic matches the CPU quantizer exactly: zero = fp16(min), scale = (max - zero) /
// (2^b - 1) rounded UP to fp16, q = clamp(round((x - zero) / scale)) with round half away from
// zero; FP8 scale = amax / 448, code = E4M3(x / scale) round-to-nearest-even, saturating, no
// negative zero. Compile with --fmad=false (no contractions).

#include <cuda_fp16.h>

namespace tkq {

enum { CLASS_F16 = 0, CLASS_INT4 = 1, CLASS_INT2 = 2, CLASS_FP8 = 3, NUM_CLASSES = 4 };

// One class's block geometry, offsets as `BlockGeometry` computes them.
struct Geom {
  int tokens, v_group;
  int v_off, ks_off, kz_off, vs_off, vz_off;
  int slab;  // bytes of a block of this class (<= the pool's slab)
  int k_group;  // tokens per K scale group: group j's scales at ks_off + 4 * head_dim * j
};

struct QuantizeParams {
  unsigned char* pool;   // [slot][kv_head][slab_bytes]
  long long slab_bytes;  // pool slab (max over classes), multiple of 16
  int kv_heads, head_dim;
  const float* k;        // [token][kv_head][head_dim]
  const float* v;
  const int* jobs;       // 5 ints a job: slot, class, first source token, tokens, start token
  int* status;           // bit 0: a value was not finite or outside the fp16 range
  Geom geom[NUM_CLASSES];
};
static_assert(sizeof(Geom) == 36, "Geom layout changed: update src/gpu/quantize_append.rs");
static_assert(sizeof(QuantizeParams) == 200,
              "QuantizeParams layout changed: update src/gpu/quantize_append.rs");

__device__ __forceinline__ int lane_word_offset(int lane, int j, int nw) {
  const int r = nw < 4 ? nw : 4;
  return (j / r) * 128 * r + lane * 4 * r + (j % r) * 4;
}
__device__ __forceinline__ int k_words(int cls, int d) {
  return (cls == CLASS_F16 || cls == CLASS_FP8) ? d / 8 : d / 32;
}
__device__ __forceinline__ int v_words(int cls, int d) {
  return cls == CLASS_F16 ? d / 4 : cls == CLASS_FP8 ? d / 8 : cls == CLASS_INT4 ? d / 16 : d / 32;
}

// Byte offset and bit shift of key (tok, dim): port of `BlockGeometry::k_code_pos`.
__device__ __forceinline__ void k_pos(int cls, int D, int tok, int dim, int& off, int& shift) {
  const int c = dim / 16, w = dim % 16, t = (w % 8) / 2, b = w / 8, hi = w % 2;
  const int nw = k_words(cls, D), ktb = 128 * nw;
  shift = 0;
  if (cls == CLASS_F16) {
    off = (tok / 8) * ktb + lane_word_offset(4 * (tok % 8) + t, 2 * c + b, nw) + 2 * hi;
  } else if (cls == CLASS_INT4) {
    const int nib = (c % 2) * 2 + b + 4 * hi;
    off = (tok / 8) * ktb + lane_word_offset(4 * (tok % 8) + t, c / 2, nw) + nib / 2;
    shift = 4 * (nib % 2);
  } else if (cls == CLASS_INT2) {
    const int rr = tok % 16, g = rr % 8, second = rr / 8;
    const int crumb = (c % 4) * 2 + b + 8 * hi;
    off = (tok / 16) * ktb + lane_word_offset(4 * g + t, second * (D / 64) + c / 4, nw) + crumb / 4;
    shift = 2 * (crumb % 4);
  } else {
    const int rr = tok % 16, g = rr % 8, second = rr / 8;
    off = (tok / 16) * ktb + lane_word_offset(4 * g + t, second * (D / 16) + c, nw) + 2 * b + hi;
  }
}

// Port of `BlockGeometry::v_code_pos` (offset includes the V area's start).
__device__ __forceinline__ void v_pos(int cls, int D, int v_off, int tok, int dim, int& off,
                                      int& shift) {
  const int m = dim / 16, w = dim % 16, g = w % 8, row_hi = w / 8;
  const int rr = tok % 16, t = (rr % 8) / 2, hi = rr % 2, tok_hi = rr / 8;
  const int a = row_hi + 2 * tok_hi, lane = 4 * g + t;
  const int nw = v_words(cls, D);
  const int base = v_off + (tok / 16) * 128 * nw;
  shift = 0;
  if (cls == CLASS_F16) {
    off = base + lane_word_offset(lane, 4 * m + a, nw) + 2 * hi;
  } else if (cls == CLASS_FP8) {
    off = base + lane_word_offset(lane, 2 * m + a / 2, nw) + 2 * (a % 2) + hi;
  } else if (cls == CLASS_INT4) {
    const int nib = a + 4 * hi;
    off = base + lane_word_offset(lane, m, nw) + nib / 2;
    shift = 4 * (nib % 2);
  } else {
    const int crumb = (m % 2) * 4 + a + 8 * hi;
    off = base + lane_word_offset(lane, m / 2, nw) + crumb / 4;
    shift = 2 * (crumb % 4);
  }
}

__device__ __forceinline__ bool in_f16_range(float x) { return fabsf(x) <= 65504.f; }  // false for NaN

// Smallest fp16 not below x (x >= 0 finite): the scale rounded up, as `f16_round_up`.
__device__ __forceinline__ unsigned short f16_round_up(float x) {
  const __half h = __float2half_rn(x);
  const unsigned short bits = __half_as_ushort(h);
  return __half2float(h) >= x ? bits : (unsigned short)(bits + 1);
}

// fp16 scale/zero bits of a group with minimum lo and maximum hi (`group_params`).
__device__ __forceinline__ void group_params(float lo, float hi, int max_code, unsigned short& scale,
                                             unsigned short& zero, int* status) {
  const __half z = __float2half_rn(lo);
  zero = __half_as_ushort(z);
  const float range = fmaxf(__fsub_rn(hi, __half2float(z)), 0.f);
  scale = range == 0.f ? (unsigned short)0 : f16_round_up(__fdiv_rn(range, (float)max_code));
  if ((scale & 0x7c00u) == 0x7c00u) atomicOr(status, 1);  // scale overflowed to inf
}

// `quantize_with`: round half away from zero, clamp to the code range.
__device__ __forceinline__ unsigned int quantize(float x, unsigned short scale, unsigned short zero,
                                                 int max_code) {
  const float s = __half2float(__ushort_as_half(scale));
  if (s == 0.f) return 0;
  const float q = roundf(__fdiv_rn(__fsub_rn(x, __half2float(__ushort_as_half(zero))), s));
  return (unsigned int)fminf(fmaxf(q, 0.f), (float)max_code);
}

// E4M3 code of x (round to nearest even, saturating), without negative zero.
__device__ __forceinline__ unsigned int e4m3(float x) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(0.f), "f"(x));
  const unsigned int code = r & 0xffu;
  return (code & 0x7fu) == 0 ? 0u : code;
}

__device__ __forceinline__ void or_bits(unsigned int* smem_words, int byte, unsigned int bits) {
  atomicOr(&smem_words[byte >> 2], bits << (8 * (byte & 3)));
}

__device__ float block_max(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // red may still be read from a previous call
  if ((threadIdx.x & 31) == 0) red[warp] = x;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < nwarps; i++) r = fmaxf(r, red[i]);
  return r;
}

__device__ void quantize_block(const QuantizeParams& p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[32];
  const int* job = p.jobs + 5 * blockIdx.x;
  const int slot = job[0], cls = job[1], first = job[2], ntok = job[3], start = job[4];
  const int h = blockIdx.y, D = p.head_dim;
  const Geom g = p.geom[cls];
  unsigned int* words = reinterpret_cast<unsigned int*>(smem);
  uint4* dst = reinterpret_cast<uint4*>(p.pool + ((long long)slot * p.kv_heads + h) * p.slab_bytes);
  const int nwords = (int)(p.slab_bytes / 4);
  if (start == 0) {
    for (int i = threadIdx.x; i < nwords; i += blockDim.x) words[i] = 0;
  } else {
    uint4* s4 = reinterpret_cast<uint4*>(smem);
    for (int i = threadIdx.x; i < nwords / 4; i += blockDim.x) s4[i] = dst[i];
  }
  __syncthreads();
  const long long stride = (long long)p.kv_heads * D;  // elements between tokens
  const float* K = p.k + (long long)first * stride + (long long)h * D;
  const float* V = p.v + (long long)first * stride + (long long)h * D;
  const int n = ntok * D;

  if (cls == CLASS_F16) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int r = i / D, d = i % D;
      const __half kh = __float2half_rn(K[r * stride + d]), vh = __float2half_rn(V[r * stride + d]);
      // As `to_f16`: what must be finite is the rounded value.
      if (!isfinite(__half2float(kh)) || !isfinite(__half2float(vh))) atomicOr(p.status, 1);
      int off, shift;
      k_pos(cls, D, r, d, off, shift);
      *reinterpret_cast<unsigned short*>(smem + off) = __half_as_ushort(kh);
      v_pos(cls, D, g.v_off, r, d, off, shift);
      *reinterpret_cast<unsigned short*>(smem + off) = __half_as_ushort(vh);
    }
  } else if (cls == CLASS_FP8) {
    float ka = 0.f, va = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float kx = K[(i / D) * stride + i % D], vx = V[(i / D) * stride + i % D];
      if (!isfinite(kx) || !isfinite(vx)) atomicOr(p.status, 1);
      ka = fmaxf(ka, fabsf(kx));
      va = fmaxf(va, fabsf(vx));
    }
    const float ks = __fdiv_rn(block_max(ka, red), 448.f);
    const float vs = __fdiv_rn(block_max(va, red), 448.f);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int r = i / D, d = i % D;
      int off, shift;
      if (ks > 0.f) {
        k_pos(cls, D, r, d, off, shift);
        smem[off] = (unsigned char)e4m3(__fdiv_rn(K[r * stride + d], ks));
      }
      if (vs > 0.f) {
        v_pos(cls, D, g.v_off, r, d, off, shift);
        smem[off] = (unsigned char)e4m3(__fdiv_rn(V[r * stride + d], vs));
      }
    }
    if (threadIdx.x == 0) {
      *reinterpret_cast<float*>(smem + g.ks_off) = ks;
      *reinterpret_cast<float*>(smem + g.ks_off + 4) = vs;
    }
  } else {
    const int max_code = cls == CLASS_INT4 ? 15 : 3;
    // Keys: one (channel, K scale group) per thread; a group is k_group tokens of the block.
    // Source rows r are block tokens start + r; start is a multiple of k_group.
    const int kgs = (ntok + g.k_group - 1) / g.k_group, j0 = start / g.k_group;
    for (int i = threadIdx.x; i < D * kgs; i += blockDim.x) {
      const int d = i % D, j = j0 + i / D;
      const int r0 = (i / D) * g.k_group, r1 = min(ntok, r0 + g.k_group);
      float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
      for (int r = r0; r < r1; r++) {
        const float x = K[r * stride + d];
        if (!in_f16_range(x)) atomicOr(p.status, 1);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
      }
      unsigned short sc = 0, ze = 0;
      group_params(lo, hi, max_code, sc, ze, p.status);
      const int at = 4 * D * j + 2 * d;
      *reinterpret_cast<unsigned short*>(smem + g.ks_off + at) = sc;
      *reinterpret_cast<unsigned short*>(smem + g.kz_off + at) = ze;
      for (int r = r0; r < r1; r++) {
        int off, shift;
        k_pos(cls, D, start + r, d, off, shift);
        or_bits(words, off, quantize(K[r * stride + d], sc, ze, max_code) << shift);
      }
    }
    // Values: one (token, group) per thread.
    const int G = D / g.v_group;
    for (int i = threadIdx.x; i < ntok * G; i += blockDim.x) {
      const int r = i / G, gi = i % G;
      const float* x = V + r * stride + gi * g.v_group;
      float lo = __int_as_float(0x7f800000), hi = -__int_as_float(0x7f800000);
      for (int e = 0; e < g.v_group; e++) {
        if (!in_f16_range(x[e])) atomicOr(p.status, 1);
        lo = fminf(lo, x[e]);
        hi = fmaxf(hi, x[e]);
      }
      unsigned short sc, ze;
      group_params(lo, hi, max_code, sc, ze, p.status);
      const int t = start + r;
      const int ps = (t / 2) * 2 * G + 2 * gi + t % 2;  // `v_param_slot`
      *reinterpret_cast<unsigned short*>(smem + g.vs_off + 2 * ps) = sc;
      *reinterpret_cast<unsigned short*>(smem + g.vz_off + 2 * ps) = ze;
      for (int e = 0; e < g.v_group; e++) {
        int off, shift;
        v_pos(cls, D, g.v_off, t, gi * g.v_group + e, off, shift);
        or_bits(words, off, quantize(x[e], sc, ze, max_code) << shift);
      }
    }
  }
  __syncthreads();
  const uint4* src = reinterpret_cast<const uint4*>(smem);
  for (int i = threadIdx.x; i < (int)(p.slab_bytes / 16); i += blockDim.x) dst[i] = src[i];
}

}  // namespace tkq

// grid (jobs, kv_heads), block 128 threads, dynamic shared memory = the pool's slab bytes.
extern "C" __global__ void __launch_bounds__(128) tkv_quantize_append(const tkq::QuantizeParams p) {
  tkq::quantize_block(p);
}
