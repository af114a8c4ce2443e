// Prefill attention: a chunk of consecutive query tokens of one sequence attends to that
// sequence's paged cache read directly from the packed blocks of every precision class
// (docs/KV_LAYOUT.md) — no 16-bit scratch copy of the history. The chunk's own K/V are already
// in the sequence's 16-bit blocks (appended in order before the launch), so causality is one
// rule: query row r (of the chunk) sees every quantized token and the first `f16_base + r + 1`
// tokens of the 16-bit class in table order. Launched from src/gpu/prefill_attention.rs; CPU
// reference: tests/gpu.rs (prefill_attention_matches_cpu_reference).
//
// One CTA = (8 query tokens, one KV head): its rows are the 8 tokens x the GQA group's query
// heads (<= 64). A tile of up to 32 context tokens of one block is dequantized into shared
// memory (keys f32, values f16), read once per CTA; each warp runs an online softmax for its
// rows with one context token per lane for the scores. Head dim 128 (smaller heads arrive
// zero-padded); head-dim-sized arithmetic on CUDA cores, not tensor cores: correct first.

#include <cuda_fp16.h>

#define TKP_INF __int_as_float(0x7f800000)

namespace tkp {

enum { D = 128, QT = 8, KT = 32, NWARPS = 8, MAX_GQA = 8, MAX_ROWS = QT * MAX_GQA };
enum { CLASS_F16 = 0, CLASS_INT4 = 1, CLASS_INT2 = 2, CLASS_FP8 = 3, NUM_CLASSES = 4 };

struct ClassTable {
  const int* slot;  // pool slot of each entry of the class's table
  const int* ntok;  // valid tokens of each entry
  int begin, end;   // this sequence's entries
  int tokens;       // block capacity
  int v_off, ks_off, kz_off, vs_off, vz_off;
};

struct PrefillParams {
  const unsigned char* pool;
  long long slab_bytes;
  int kv_heads, q_heads, gqa, rows;  // rows: query tokens of the chunk
  int f16_base;                      // 16-bit tokens in the table before the chunk's first
  int v_group;
  const unsigned short* q;           // fp16 [rows][q_heads][128]
  float* out;                        // f32 [rows][q_heads][128]
  float scale_log2;                  // softmax scale * log2(e)
  int _pad;
  ClassTable cls[NUM_CLASSES];
};
static_assert(sizeof(ClassTable) == 48, "ClassTable layout: update src/gpu/prefill_attention.rs");
static_assert(sizeof(PrefillParams) == 256, "PrefillParams layout: update src/gpu/prefill_attention.rs");

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
  return q * h2f(slab + ct.ks_off + 2 * dim) + h2f(slab + ct.kz_off + 2 * dim);
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

extern "C" __global__ void __launch_bounds__(NWARPS * 32)
    tkv_prefill_attention(const PrefillParams p) {
  __shared__ float ks[KT][D + 1];
  __shared__ __half vs[KT][D];
  __shared__ __half qs[MAX_ROWS][D];
  __shared__ int valid_limit[QT];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kvh = blockIdx.y, tok0 = blockIdx.x * QT;
  const int qtoks = min(QT, p.rows - tok0);
  const int nrows = qtoks * p.gqa;

  for (int i = tid; i < nrows * D; i += blockDim.x) {
    const int r = i / D, d = i % D, qt = r / p.gqa, g = r % p.gqa;
    const long long at = ((long long)(tok0 + qt) * p.q_heads + kvh * p.gqa + g) * D + d;
    qs[r][d] = __ushort_as_half(p.q[at]);
  }
  if (tid < QT) valid_limit[tid] = p.f16_base + tok0 + tid + 1;

  // Per row of this warp (rows warp, warp + 8, ...): running max, sum, 4 output dims per lane.
  float m_run[MAX_ROWS / NWARPS], l_run[MAX_ROWS / NWARPS], acc[MAX_ROWS / NWARPS][4];
#pragma unroll
  for (int i = 0; i < MAX_ROWS / NWARPS; i++) {
    m_run[i] = -TKP_INF;
    l_run[i] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  }

  for (int cls = 0; cls < NUM_CLASSES; cls++) {
    const ClassTable ct = p.cls[cls];
    int ordinal = 0;  // tokens of this class before the current block (the causal rule)
    for (int e = ct.begin; e < ct.end; e++) {
      const int n = ct.ntok[e];
      const unsigned char* slab = p.pool + ((long long)ct.slot[e] * p.kv_heads + kvh) * p.slab_bytes;
      for (int t0 = 0; t0 < n; t0 += KT) {
        const int nt = min(KT, n - t0);
        __syncthreads();  // the previous tile (and q) are consumed / written
        for (int i = tid; i < KT * D; i += blockDim.x) {
          const int t = i / D, d = i % D;
          float k = 0.f, v = 0.f;
          if (t < nt) {
            k = load_k(cls, slab, ct, t0 + t, d);
            v = load_v(cls, slab, ct, p.v_group, t0 + t, d);
          }
          ks[t][d] = k;
          vs[t][d] = __float2half_rn(v);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < MAX_ROWS / NWARPS; i++) {
          const int r = warp + i * NWARPS;
          if (r < nrows) {
            const int qt = r / p.gqa;
            bool live = lane < nt;
            if (cls == CLASS_F16) live = live && ordinal + t0 + lane < valid_limit[qt];
            float s = 0.f;
            if (live) {
#pragma unroll 8
              for (int d = 0; d < D; d++) s += __half2float(qs[r][d]) * ks[lane][d];
            }
            s = live ? s * p.scale_log2 : -TKP_INF;
            float mx = s;
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_new = fmaxf(m_run[i], mx);
            if (m_new != -TKP_INF) {
              const float corr = exp2f(m_run[i] - m_new);
              const float pr = live ? exp2f(s - m_new) : 0.f;
              float ps = pr;
              for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
              l_run[i] = l_run[i] * corr + ps;
#pragma unroll
              for (int j = 0; j < 4; j++) acc[i][j] *= corr;
              for (int t = 0; t < nt; t++) {
                const float pt = __shfl_sync(0xffffffffu, pr, t);
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += pt * __half2float(vs[t][lane * 4 + j]);
              }
              m_run[i] = m_new;
            }
          }
        }
      }
      ordinal += n;
    }
  }
#pragma unroll
  for (int i = 0; i < MAX_ROWS / NWARPS; i++) {
    const int r = warp + i * NWARPS;
    if (r < nrows) {
      const int qt = r / p.gqa, g = r % p.gqa;
      const float inv = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
      float* o = p.out + ((long long)(tok0 + qt) * p.q_heads + kvh * p.gqa + g) * D + lane * 4;
#pragma unroll
      for (int j = 0; j < 4; j++) o[j] = acc[i][j] * inv;
    }
  }
}
