// Prefill attention: a chunk of consecutive query tokens of one sequence attends to that
// sequence's paged cache, every precision class (docs/KV_LAYOUT.md) decoded once per call into
// an fp16 scratch (docs/ARCHITECTURE.md says why not in place). The chunk's own K/V are already
// in the sequence's 16-bit blocks (appended in order before the launch), so causality is one
// rule: query row r (of the chunk) sees every quantized token and the first `f16_base + r + 1`
// tokens of the 16-bit class in table order. Launched from src/gpu/prefill_attention.rs; CPU
// reference: tests/gpu.rs (prefill_attention_matches_cpu_reference).
//
// Two launches per layer for all the step's sequences: tkv_gather_tokens_f16 decodes every
// token of each sequence once (any class, to fp16: quantized classes first, then the 16-bit
// tokens in table order), then tkv_prefill_attention runs every call's CTAs; one CTA =
// (128 / GQA query tokens, one KV head): 128 rows = the tokens x the GQA group's query heads,
// 16 per warp (8 warps share each tile load: half the history reads of 64-row CTAs), reading
// the decoded tokens only up to its last query token. A tile of 64 decoded tokens goes to shared
// memory as fp16 (keys and values both [token][dim], stored with 16-byte writes; the next tile's
// global loads are issued into registers before the current tile's math) and is read by every
// warp through ldmatrix (.trans for the values): S = Q K^T and O += P V on tensor cores
// (mma.m16n8k16, fp32 accumulate), Q, S/P and O in registers (FlashAttention-2 style online
// softmax). Decoding once per call, not once per CTA, keeps the packed classes as cheap as
// 16-bit (the CTAs of a chunk would otherwise each decode the whole history). Head dim 128
// (smaller heads arrive zero-padded).

#include <cuda_fp16.h>

#define TKP_INF __int_as_float(0x7f800000)

namespace tkp {

enum { D = 128, KT = 64, NWARPS = 8, ROWS = NWARPS * 16, MAX_GQA = 8 };
enum { CLASS_F16 = 0, CLASS_INT4 = 1, CLASS_INT2 = 2, CLASS_FP8 = 3, NUM_CLASSES = 4 };

struct ClassTable {
  const int* slot;  // pool slot of each entry of the class's table
  const int* ntok;  // valid tokens of each entry
  int begin, end;   // this sequence's entries
  int tokens;       // block capacity
  int v_off, ks_off, kz_off, vs_off, vz_off;
  int k_group;  // tokens per K scale group: group j's scales at ks_off + 4 * D * j
};

struct PrefillParams {
  const __half* k;  // fp16 [n][kv_heads][128]: the sequence's tokens decoded by
  const __half* v;  // tkv_gather_tokens_f16, every quantized token first, then the 16-bit
                    // tokens in table order
  int n, n_quant;
  int kv_heads, q_heads, gqa, rows;  // rows: query tokens of the chunk
  int f16_base;                      // 16-bit tokens in the table before the chunk's first
  int _pad0;
  const unsigned short* q;           // fp16 [rows][q_heads][128]
  float* out;                        // f32 [rows][q_heads][128]
  float scale_log2;                  // softmax scale * log2(e)
  int _pad;
};
static_assert(sizeof(ClassTable) == 56, "ClassTable layout: update src/gpu/prefill_attention.rs");
static_assert(sizeof(PrefillParams) == 72, "PrefillParams layout: update src/gpu/prefill_attention.rs");

__device__ __forceinline__ int lane_word(int lane, int j, int nw) {
  const int r = nw < 4 ? nw : 4;
  return (j / r) * 128 * r + lane * 4 * r + (j % r) * 4;
}

// Byte offset and bit shift of key (tok, dim), `BlockGeometry::k_code_pos` at D = 128.
__device__ __forceinline__ void k_pos(int cls, int tok, int dim, int& off, int& shift) {
  const int c = dim / 16, w = dim % 16, t = (w % 8) / 2, b = w / 8, hi = w % 2;
  shift = 0;
  if (cls == CLASS_F16) {
    off = (tok / 8) * 2048 + lane_word(4 * (tok % 8) + t, 2 * c + b, 16) + 2 * hi;
  } else if (cls == CLASS_INT4) {
    const int nib = (c % 2) * 2 + b + 4 * hi;
    off = (tok / 8) * 512 + lane_word(4 * (tok % 8) + t, c / 2, 4) + nib / 2;
    shift = 4 * (nib % 2);
  } else if (cls == CLASS_INT2) {
    const int rr = tok % 16, g = rr % 8, second = rr / 8;
    const int crumb = (c % 4) * 2 + b + 8 * hi;
    off = (tok / 16) * 512 + lane_word(4 * g + t, second * 2 + c / 4, 4) + crumb / 4;
    shift = 2 * (crumb % 4);
  } else {
    const int rr = tok % 16, g = rr % 8, second = rr / 8;
    off = (tok / 16) * 2048 + lane_word(4 * g + t, second * 8 + c, 16) + 2 * b + hi;
  }
}

// `BlockGeometry::v_code_pos` at D = 128 (the offset includes the V area's start).
__device__ __forceinline__ void v_pos(int cls, int v_off, int tok, int dim, int& off, int& shift) {
  const int m = dim / 16, w = dim % 16, g = w % 8, row_hi = w / 8;
  const int rr = tok % 16, t = (rr % 8) / 2, hi = rr % 2, tok_hi = rr / 8;
  const int a = row_hi + 2 * tok_hi, lane = 4 * g + t;
  shift = 0;
  if (cls == CLASS_F16) {
    off = v_off + (tok / 16) * 4096 + lane_word(lane, 4 * m + a, 32) + 2 * hi;
  } else if (cls == CLASS_FP8) {
    off = v_off + (tok / 16) * 2048 + lane_word(lane, 2 * m + a / 2, 16) + 2 * (a % 2) + hi;
  } else if (cls == CLASS_INT4) {
    const int nib = a + 4 * hi;
    off = v_off + (tok / 16) * 1024 + lane_word(lane, m, 8) + nib / 2;
    shift = 4 * (nib % 2);
  } else {
    const int crumb = (m % 2) * 4 + a + 8 * hi;
    off = v_off + (tok / 16) * 512 + lane_word(lane, m / 2, 4) + crumb / 4;
    shift = 2 * (crumb % 4);
  }
}

__device__ __forceinline__ float e4m3(unsigned int code) {
  const unsigned int e = (code >> 3) & 15u, m = code & 7u;
  const float mag = e == 0 ? (float)m * 0.001953125f  // m / 8 * 2^-6
                           : (1.f + (float)m * 0.125f) * exp2f((float)e - 7.f);
  return (code & 0x80u) ? -mag : mag;
}

__device__ __forceinline__ float h2f(const unsigned char* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

__device__ __forceinline__ float load_k(int cls, const unsigned char* slab, const ClassTable& ct,
                                        int tok, int dim) {
  int off, shift;
  k_pos(cls, tok, dim, off, shift);
  if (cls == CLASS_F16) return h2f(slab + off);
  if (cls == CLASS_FP8) return e4m3(slab[off]) * *reinterpret_cast<const float*>(slab + ct.ks_off);
  const unsigned int mask = cls == CLASS_INT4 ? 15u : 3u;
  const float q = (float)((slab[off] >> shift) & mask);
  const int at = 4 * D * (tok / ct.k_group) + 2 * dim;
  return q * h2f(slab + ct.ks_off + at) + h2f(slab + ct.kz_off + at);
}

__device__ __forceinline__ float load_v(int cls, const unsigned char* slab, const ClassTable& ct,
                                        int v_group, int tok, int dim) {
  int off, shift;
  v_pos(cls, ct.v_off, tok, dim, off, shift);
  if (cls == CLASS_F16) return h2f(slab + off);
  if (cls == CLASS_FP8)
    return e4m3(slab[off]) * *reinterpret_cast<const float*>(slab + ct.ks_off + 4);
  const unsigned int mask = cls == CLASS_INT4 ? 15u : 3u;
  const float q = (float)((slab[off] >> shift) & mask);
  const int groups = D / v_group;
  const int idx = (tok / 2) * 2 * groups + 2 * (dim / v_group) + tok % 2;
  return q * h2f(slab + ct.vs_off + 2 * idx) + h2f(slab + ct.vz_off + 2 * idx);
}

}  // namespace tkp

using namespace tkp;

__device__ __forceinline__ void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_h2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 fp16 matrices from shared memory, rows addressed by lanes 8m..8m+7 for matrix m.
__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                        const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

// The same, transposed: the B operand of P V from values stored [token][dim].
__device__ __forceinline__ void ldsm_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2,
                                              unsigned& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

// 16-byte pieces (8 dims of one token) of a K or V tile each thread carries.
enum { PIECES = KT * (D / 8) / (NWARPS * 32) };

// This thread's pieces of the tile of decoded tokens from `base` on (zeros past `n_seen`),
// into registers: issued before the current tile's math, so the loads are in flight during it.
__device__ __forceinline__ void fetch_tile(const PrefillParams& p, int kvh, int base, int n_seen,
                                           int tid, uint4 (&pk)[PIECES], uint4 (&pv)[PIECES]) {
  const int n = min(KT, n_seen - base);
#pragma unroll
  for (int it = 0; it < PIECES; it++) {
    const int i = tid + it * NWARPS * 32;
    const int t = i / (D / 8), d8 = (i % (D / 8)) * 8;
    pk[it] = make_uint4(0u, 0u, 0u, 0u);
    pv[it] = pk[it];
    if (t < n) {
      const long long at = ((long long)(base + t) * p.kv_heads + kvh) * D + d8;
      pk[it] = *reinterpret_cast<const uint4*>(p.k + at);
      pv[it] = *reinterpret_cast<const uint4*>(p.v + at);
    }
  }
}

// One CTA of one call: (128 / GQA query tokens from blockIdx.x, KV head blockIdx.y).
__device__ __forceinline__ void prefill_cta(const PrefillParams& p) {
  // Context tile, keys and values both [token][dim] fp16 (values reach the P V operand through
  // ldmatrix.trans), rows padded by 16 bytes so the 8 rows of an ldmatrix hit 32 distinct banks.
  __shared__ __align__(16) __half ks[KT][D + 8];
  __shared__ __align__(16) __half vs[KT][D + 8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int kvh = blockIdx.y;
  const int qt_per_cta = ROWS / p.gqa;
  const int tok0 = blockIdx.x * qt_per_cta;
  const int qtoks = min(qt_per_cta, p.rows - tok0);
  const int nrows = qtoks * p.gqa;

  // This lane's two rows (g and g + 8 of the warp's 16) and their causal limits.
  int row_q[2], limit[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int r = warp * 16 + g + 8 * h;
    row_ok[h] = r < nrows;
    row_q[h] = row_ok[h] ? ((tok0 + r / p.gqa) * p.q_heads + kvh * p.gqa + r % p.gqa) : -1;
    limit[h] = p.f16_base + tok0 + (row_ok[h] ? r / p.gqa : 0) + 1;
  }
  // Q fragments (A operand, 16 rows x 128 dims = 8 k-steps), straight from global memory.
  unsigned qa[8][4];
#pragma unroll
  for (int s = 0; s < 8; s++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      unsigned lo = 0, hi = 0;
      if (row_ok[h]) {
        const unsigned* q = reinterpret_cast<const unsigned*>(p.q + (long long)row_q[h] * D);
        lo = q[(16 * s + 2 * t4) / 2];
        hi = q[(16 * s + 2 * t4 + 8) / 2];
      }
      qa[s][h] = lo;      // a0 (row g), a1 (row g + 8)
      qa[s][2 + h] = hi;  // a2, a3
    }
  }
  float o[16][4];
#pragma unroll
  for (int j = 0; j < 16; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-TKP_INF, -TKP_INF}, l_run[2] = {0.f, 0.f};

  // Tokens past the CTA's last query token are masked for every row: stop before them.
  const int n_seen = min(p.n, p.n_quant + p.f16_base + tok0 + qtoks);
  uint4 pk[PIECES], pv[PIECES];
  if (n_seen > 0) fetch_tile(p, kvh, 0, n_seen, tid, pk, pv);
  for (int base = 0; base < n_seen; base += KT) {
    const int n = min(KT, n_seen - base);
    __syncthreads();  // the previous tile is consumed
#pragma unroll
    for (int it = 0; it < PIECES; it++) {
      const int i = tid + it * NWARPS * 32;
      const int t = i / (D / 8), d8 = (i % (D / 8)) * 8;
      *reinterpret_cast<uint4*>(&ks[t][d8]) = pk[it];
      *reinterpret_cast<uint4*>(&vs[t][d8]) = pv[it];
    }
    __syncthreads();
    if (base + KT < n_seen) fetch_tile(p, kvh, base + KT, n_seen, tid, pk, pv);
    // S = Q K^T: 8 n-tiles of 8 tokens; one ldmatrix.x4 = the B operand of two k-steps.
    float sc[KT / 8][4];
#pragma unroll
    for (int j = 0; j < KT / 8; j++) {
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
      for (int sp = 0; sp < 4; sp++) {
        unsigned b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, &ks[8 * j + (lane & 7)][32 * sp + 8 * (lane >> 3)]);
        mma16816(sc[j], qa[2 * sp][0], qa[2 * sp][1], qa[2 * sp][2], qa[2 * sp][3], b0, b1);
        mma16816(sc[j], qa[2 * sp + 1][0], qa[2 * sp + 1][1], qa[2 * sp + 1][2],
                 qa[2 * sp + 1][3], b2, b3);
      }
    }
    // Mask, scale, online softmax over this lane's rows (the quad t4 = 0..3 shares a row).
    float mx[2] = {-TKP_INF, -TKP_INF};
#pragma unroll
    for (int j = 0; j < KT / 8; j++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int h = e >> 1, t = 8 * j + 2 * t4 + (e & 1);
        const int i = base + t;
        const bool live = t < n && (i < p.n_quant || i - p.n_quant < limit[h]);
        const float x = live ? sc[j][e] * p.scale_log2 : -TKP_INF;
        sc[j][e] = x;
        mx[h] = fmaxf(mx[h], x);
      }
    }
    float corr[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m_run[h], mx[h]);
      const float base = m_new == -TKP_INF ? 0.f : m_new;
      corr[h] = exp2f(m_run[h] - base);
      m_run[h] = m_new;
      mx[h] = base;  // the exponent base from here on
    }
    float ls[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < KT / 8; j++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int h = e >> 1;
        const float pr = exp2f(sc[j][e] - mx[h]);
        sc[j][e] = pr;
        ls[h] += pr;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      ls[h] += __shfl_xor_sync(0xffffffffu, ls[h], 1);
      ls[h] += __shfl_xor_sync(0xffffffffu, ls[h], 2);
      l_run[h] = l_run[h] * corr[h] + ls[h];
    }
#pragma unroll
    for (int j = 0; j < 16; j++) {
      o[j][0] *= corr[0];
      o[j][1] *= corr[0];
      o[j][2] *= corr[1];
      o[j][3] *= corr[1];
    }
    // O += P V: P (16 rows x KT tokens) from the score registers; one ldmatrix.x4.trans = the
    // B operand of two n-tiles (16 dims) of one k-step (16 tokens).
#pragma unroll
    for (int s = 0; s < KT / 16; s++) {
      const unsigned a0 = pack_h2(sc[2 * s][0], sc[2 * s][1]);
      const unsigned a1 = pack_h2(sc[2 * s][2], sc[2 * s][3]);
      const unsigned a2 = pack_h2(sc[2 * s + 1][0], sc[2 * s + 1][1]);
      const unsigned a3 = pack_h2(sc[2 * s + 1][2], sc[2 * s + 1][3]);
#pragma unroll
      for (int jj = 0; jj < 8; jj++) {
        unsigned b0, b1, b2, b3;
        ldsm_x4_trans(b0, b1, b2, b3,
                      &vs[16 * s + 8 * ((lane >> 3) & 1) + (lane & 7)][16 * jj + 8 * (lane >> 4)]);
        mma16816(o[2 * jj], a0, a1, a2, a3, b0, b1);
        mma16816(o[2 * jj + 1], a0, a1, a2, a3, b2, b3);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    if (!row_ok[h]) continue;
    const float inv = l_run[h] > 0.f ? 1.f / l_run[h] : 0.f;
    float* out = p.out + (long long)row_q[h] * D;
#pragma unroll
    for (int j = 0; j < 16; j++) {
      float2 v2 = make_float2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
      *reinterpret_cast<float2*>(out + 8 * j + 2 * t4) = v2;
    }
  }
}

// Grid (row tiles of the longest call, kv_heads, calls) x NWARPS * 32 threads: the chunks of
// every sequence of a step in one launch (one call's CTAs alone leave most SMs idle when its
// chunk is short); CTAs past their call's rows return at once.
extern "C" __global__ void __launch_bounds__(NWARPS * 32)
    tkv_prefill_attention(const PrefillParams* __restrict__ calls) {
  const PrefillParams p = calls[blockIdx.z];
  if ((int)blockIdx.x * (ROWS / p.gqa) >= p.rows) return;
  prefill_cta(p);
}

// ---- Token moves of the serving runtime's block pool (src/gpu/token_moves.rs) --------------
// The pool is `layers` stacked layer pools of `layer_slots` slots (`DeviceCache::allocate_layers`);
// slab (layer l, slot s, KV head h) at ((l * layer_slots + s) * kv_heads + h) * slab_bytes.

namespace tkp {
struct MoveParams {
  unsigned char* pool;
  long long slab_bytes;
  long long layer_slots;
  int kv_heads, n, v_group;
  float fp8_scale;  // the store's scale of FP8 blocks (`HOLD_FP8_SCALE`), K and V alike
  const int* slot;  // n blocks (pool slot within a layer)
  const int* cls;   // their classes (gather: any; store: 16-bit or FP8)
  const int* tok;   // token index inside each block
  float* k;         // f32 [layer][n][kv_heads][128]
  float* v;
  ClassTable ct[NUM_CLASSES];  // only the byte offsets are read
};
static_assert(sizeof(MoveParams) == 80 + NUM_CLASSES * sizeof(ClassTable),
              "MoveParams layout: update src/gpu/token_moves.rs");
}  // namespace tkp

// Grid (n, kv_heads, layers) x 128 threads: token i's key and value of one head, decoded from
// any class, to f32.
extern "C" __global__ void __launch_bounds__(128) tkv_gather_tokens(const MoveParams p) {
  const int i = blockIdx.x, h = blockIdx.y, l = blockIdx.z, d = threadIdx.x;
  const int c = p.cls[i];
  const unsigned char* slab =
      p.pool + ((l * p.layer_slots + p.slot[i]) * p.kv_heads + h) * p.slab_bytes;
  const long long o = (((long long)l * p.n + i) * p.kv_heads + h) * D + d;
  p.k[o] = load_k(c, slab, p.ct[c], p.tok[i], d);
  p.v[o] = load_v(c, slab, p.ct[c], p.v_group, p.tok[i], d);
}

// The same decoded to fp16 (round to nearest: what the prefill attention's tiles hold), for
// the prefill attention's scratch (half the bytes every CTA of a chunk reads). Grid
// (ceil(n / GATHER16_TOKENS), kv_heads, layers): a CTA decodes GATHER16_TOKENS tokens, every
// load issued before the first store, so a thread keeps that many reads in flight (one token
// per CTA left the SMs waiting on one dependent chain of loads per thread).
enum { GATHER16_TOKENS = 8 };
extern "C" __global__ void __launch_bounds__(128) tkv_gather_tokens_f16(const MoveParams p) {
  const int h = blockIdx.y, l = blockIdx.z, d = threadIdx.x;
  const int i0 = blockIdx.x * GATHER16_TOKENS;
  int cls[GATHER16_TOKENS], slot[GATHER16_TOKENS], tok[GATHER16_TOKENS];
#pragma unroll
  for (int u = 0; u < GATHER16_TOKENS; u++) {
    const int i = min(i0 + u, p.n - 1);
    cls[u] = p.cls[i];
    slot[u] = p.slot[i];
    tok[u] = p.tok[i];
  }
  float kf[GATHER16_TOKENS], vf[GATHER16_TOKENS];
#pragma unroll
  for (int u = 0; u < GATHER16_TOKENS; u++) {
    const unsigned char* slab =
        p.pool + ((l * p.layer_slots + slot[u]) * p.kv_heads + h) * p.slab_bytes;
    kf[u] = load_k(cls[u], slab, p.ct[cls[u]], tok[u], d);
    vf[u] = load_v(cls[u], slab, p.ct[cls[u]], p.v_group, tok[u], d);
  }
#pragma unroll
  for (int u = 0; u < GATHER16_TOKENS; u++) {
    const int i = i0 + u;
    if (i < p.n) {
      const long long o = (((long long)l * p.n + i) * p.kv_heads + h) * D + d;
      reinterpret_cast<__half*>(p.k)[o] = __float2half_rn(kf[u]);
      reinterpret_cast<__half*>(p.v)[o] = __float2half_rn(vf[u]);
    }
  }
}

// E4M3 of x, round to nearest even, saturating (the quantize-append kernel's encoder).
__device__ __forceinline__ unsigned char e4m3_encode(float x) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(0.f), "f"(x));
  return (unsigned char)(r & 0xffu);
}

// Grid (n, kv_heads, layers) x 128 threads: f32 k/v of token i into token tok[i] of the block in
// slot slot[i]: fp16 for a 16-bit block; E4M3 of x / fp8_scale for an FP8 one, whose K and V
// scales every token of the block writes alike (the block's tokens arrive over many launches).
extern "C" __global__ void __launch_bounds__(128) tkv_store_f16(const MoveParams p) {
  const int i = blockIdx.x, h = blockIdx.y, l = blockIdx.z, d = threadIdx.x;
  unsigned char* slab = p.pool + ((l * p.layer_slots + p.slot[i]) * p.kv_heads + h) * p.slab_bytes;
  const long long o = (((long long)l * p.n + i) * p.kv_heads + h) * D + d;
  const int c = p.cls[i];
  int off, shift;
  if (c == CLASS_FP8) {
    const float inv = 1.f / p.fp8_scale;
    k_pos(CLASS_FP8, p.tok[i], d, off, shift);
    slab[off] = e4m3_encode(p.k[o] * inv);
    v_pos(CLASS_FP8, p.ct[CLASS_FP8].v_off, p.tok[i], d, off, shift);
    slab[off] = e4m3_encode(p.v[o] * inv);
    if (d < 2) reinterpret_cast<float*>(slab + p.ct[CLASS_FP8].ks_off)[d] = p.fp8_scale;
    return;
  }
  k_pos(CLASS_F16, p.tok[i], d, off, shift);
  *reinterpret_cast<__half*>(slab + off) = __float2half_rn(p.k[o]);
  v_pos(CLASS_F16, p.ct[CLASS_F16].v_off, p.tok[i], d, off, shift);
  *reinterpret_cast<__half*>(slab + off) = __float2half_rn(p.v[o]);
}

// Grid (n, layers) x 256 threads: zero slot slots[i] of every layer (`slot_bytes` = kv_heads *
// slab bytes, a multiple of 16).
extern "C" __global__ void __launch_bounds__(256)
    tkv_zero_slots(unsigned char* pool, long long layer_slots, long long slot_bytes,
                   const int* slots) {
  const int i = blockIdx.x, l = blockIdx.y;
  uint4* p = reinterpret_cast<uint4*>(pool + (l * layer_slots + slots[i]) * slot_bytes);
  const long long words = slot_bytes / 16;
  for (long long w = threadIdx.x; w < words; w += blockDim.x) p[w] = make_uint4(0, 0, 0, 0);
}
