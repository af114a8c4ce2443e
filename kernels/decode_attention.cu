// Fused paged decode attention over a mixed-precision KV cache (16-bit, INT4, INT2, FP8 blocks)
// and the log-sum-exp merge of its split-K partials. Layout: docs/KV_LAYOUT.md.
//
// One CTA = one work item (a run of blocks of ONE class of one sequence) x one KV head; one
// launch per class present, then one merge launch.
// Its 4 warps take whole blocks round-robin, or (short work items) interleaved tile groups of
// every block. All query heads of the KV head (GQA <= 8) ride in one mma tile, so packed bytes
// are read once:
//   S^T = K . Q'^T  mma.m16n8k16, A = K (16 tokens x 16 dims), B = Q'^T (16 dims x 8 heads)
//   O^T += V^T . P'^T  mma.m16n8k16, A = V^T (16 dims x 16 tokens), B = P^T (16 tokens x 8 heads)
// (P^T from S^T's fp16 fragments by two movmatrix transposes).
// Per-channel K scales are folded into Q once per block (Q' = q * s_k, bias = q . z_k); V's
// per-token scales are folded into P (P' = P * s_v per value group) and its zeros into a
// per-head, per-group sum. Dequantization: K is one lop3 per pair (the magic-number base goes
// into the per-block bias). V: 16-bit / FP8 as below; INT4 / INT2 (v4) read V codes as fp16
// subnormals, one lop3 per pair and no subtraction (see the packed-class section), and get the
// V-zero sums and the softmax sum from one extra mma per tile. FP8 (E4M3) is one
// cvt.rn.f16x2.e4m3x2 per pair; its per-block K scale multiplies the fp32 scores and its V
// scale is folded into P' (times FP8_P_SHIFT, undone on the output).
// INT4 / INT2 blocks stream through a per-warp shared-memory ring filled by cp.async.bulk
// (mbarrier completion), so the kernel needs sm_90.
// Head dim is fixed at 128. Compiles with nvcc and NVRTC (no host code, no std headers).

#include <cuda_fp16.h>

namespace tkv {

typedef unsigned int u32;
#define TKV_NEG_INF (-__int_as_float(0x7f800000))

enum { CLASS_F16 = 0, CLASS_INT4 = 1, CLASS_INT2 = 2, CLASS_FP8 = 3, NUM_CLASSES = 4 };
enum { HEAD_DIM = 128, NWARPS = 4, MAX_GQA = 8 };

// Where one class's blocks live and how its bytes are arranged (offsets inside a slab).
struct ClassInfo {
  const int* slot;  // pool slot of each table entry
  const int* ntok;  // valid tokens of each table entry
  int tokens;       // block capacity
  int v_off, ks_off, kz_off, vs_off, vz_off;  // FP8: K scale f32 at ks_off, V scale at +4
  int k_group;  // tokens per K scale group (INT4/INT2): group j's scales at ks_off + 512 j
};
// P' = P * v_scale * FP8_P_SHIFT keeps small probabilities out of the fp16 subnormals
// (v_scale = amax / 448 is often ~1e-3); the output is multiplied back by its inverse.
#define TKV_FP8_P_SHIFT 256.f

struct DecodeParams {
  const unsigned char* pool;  // [slot][kv_head][slab_bytes]
  long long slab_bytes;
  int kv_heads, q_heads, gqa;
  const __half* q;      // [seq][q_head][128]
  float scale_log2;     // softmax scale * log2(e)
  ClassInfo cls[NUM_CLASSES];
  const int4* work;     // (seq, class, first entry, end entry)
  float* part_o;        // [work][q_head][128], normalised
  float* part_lse;      // [work][q_head], log2 domain
};
// The Rust launcher (src/gpu/decode_attention.rs) passes these by value as #[repr(C)] mirrors.
static_assert(sizeof(ClassInfo) == 48, "ClassInfo layout changed: update the Rust mirror");
static_assert(sizeof(DecodeParams) == 264, "DecodeParams layout changed: update the Rust mirror");

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 h2u(__half2 h) { return *reinterpret_cast<u32*>(&h); }
__device__ __forceinline__ __half2 u2h(u32 u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ uint4 ldg16(const unsigned char* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ u32 word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Packed code -> fp16 with one lop3 per register pair: `(word & mask) | magic` where the magic
// word's exponent makes the field's lowest bit worth exactly 1, so the half is `base + q` with
// base = 1024 * 4^-j for a field at mantissa bits 2j (nibbles: base 1024 at bits 0-3, 64 at
// bits 4-7). K keeps the base (its sum with q' is a per-block constant folded into the score
// bias, see fold_block); V subtracts it with one hsub2, which is exact.
// The five magic words live in registers: with an immediate magic ptxas splits the and/or into
// two lop3 (an instruction has one immediate slot).
struct Magic {
  u32 m[5];  // half2(1024 * 4^-j) for j = 0..4
};
__device__ __forceinline__ Magic make_magic() {
  Magic g;
  g.m[0] = 0x64006400u;
  g.m[1] = 0x5c005c00u;
  g.m[2] = 0x54005400u;
  g.m[3] = 0x4c004c00u;
  g.m[4] = 0x44004400u;
#pragma unroll
  for (int j = 0; j < 5; j++) asm volatile("" : "+r"(g.m[j]));  // opaque: stays in a register
  return g;
}
__device__ __forceinline__ u32 and_or(u32 x, u32 mask, u32 magic) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));
  return r;
}
// INT4 pair i (0..3) = nibbles (i, i+4): half2(base + q) and its magic index (0: 1024, 2: 64).
__device__ __forceinline__ int mag4(int i) { return (i & 1) ? 2 : 0; }
__device__ __forceinline__ u32 raw4(u32 x, int i, const Magic& g) {
  const u32 y = (i >= 2) ? (x >> 8) : x;
  return and_or(y, (i & 1) ? 0x00f000f0u : 0x000f000fu, g.m[mag4(i)]);
}
// INT2 pair i (0..7) = crumbs (i, i+8); crumbs 5..7 are shifted down by 10 first.
__device__ __forceinline__ int mag2(int i) { return i < 5 ? i : i - 5; }
__device__ __forceinline__ u32 raw2(u32 x, int i, const Magic& g) {
  const int j = mag2(i);
  const u32 y = i < 5 ? x : (x >> 10);
  return and_or(y, 0x00030003u << (2 * j), g.m[j]);
}
__device__ __forceinline__ u32 exact(u32 raw, u32 magic) {
  return h2u(__hsub2(u2h(raw), u2h(magic)));
}

// Registers one warp holds for one 16-token tile, by class.
template <int CLS> struct Tile;
template <> struct Tile<CLASS_INT4> { uint4 k[2]; uint4 v[2]; };
template <> struct Tile<CLASS_INT2> { uint4 k; uint4 v; };
template <> struct Tile<CLASS_F16> { uint4 k[2][4]; uint4 v[8]; };
template <> struct Tile<CLASS_FP8> { uint4 k[4]; uint4 v[4]; };

// Two E4M3 codes (low / high 16 bits of x) -> half2, low byte to the low half.
__device__ __forceinline__ u32 fp8pair(u32 x, int hi) {
  u32 r;
  if (hi)
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %1;\ncvt.rn.f16x2.e4m3x2 %0, h;\n}\n"
        : "=r"(r) : "r"(x));
  else
    asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %1;\ncvt.rn.f16x2.e4m3x2 %0, l;\n}\n"
        : "=r"(r) : "r"(x));
  return r;
}

__device__ __forceinline__ void load_tile(Tile<CLASS_INT4>& t, const unsigned char* blk, int v_off,
                                          int tile, int lane) {
  const unsigned char* k = blk + tile * 1024 + lane * 16;
  const unsigned char* v = blk + v_off + tile * 1024 + lane * 16;
  t.k[0] = ldg16(k);
  t.k[1] = ldg16(k + 512);
  t.v[0] = ldg16(v);
  t.v[1] = ldg16(v + 512);
}
__device__ __forceinline__ void load_tile(Tile<CLASS_INT2>& t, const unsigned char* blk, int v_off,
                                          int tile, int lane) {
  t.k = ldg16(blk + tile * 512 + lane * 16);
  t.v = ldg16(blk + v_off + tile * 512 + lane * 16);
}
// FP8: 16-token K tile of 2048 B (lane word second * 8 + c), V tile of 2048 B (word 2m + a/2).
__device__ __forceinline__ void load_tile(Tile<CLASS_FP8>& t, const unsigned char* blk, int v_off,
                                          int tile, int lane) {
  const unsigned char* k = blk + tile * 2048 + lane * 16;
  const unsigned char* v = blk + v_off + tile * 2048 + lane * 16;
#pragma unroll
  for (int l = 0; l < 4; l++) t.k[l] = ldg16(k + l * 512);
#pragma unroll
  for (int l = 0; l < 4; l++) t.v[l] = ldg16(v + l * 512);
}
__device__ __forceinline__ void load_tile(Tile<CLASS_F16>& t, const unsigned char* blk, int v_off,
                                          int tile, int lane) {
  const unsigned char* k = blk + tile * 4096 + lane * 16;
  const unsigned char* v = blk + v_off + tile * 4096 + lane * 16;
#pragma unroll
  for (int n = 0; n < 2; n++)
#pragma unroll
    for (int l = 0; l < 4; l++) t.k[n][l] = ldg16(k + n * 2048 + l * 512);
#pragma unroll
  for (int l = 0; l < 8; l++) t.v[l] = ldg16(v + l * 512);
}

// B fragment of K^T for n-tile n (tokens 8n..8n+7 of the tile), chunk c (dims 16c..16c+15),
// register b (0: dims 2t,2t+1; 1: dims 2t+8,2t+9).
// Packed classes return base + q (see Magic); kbase gives that base for the bias.
__device__ __forceinline__ u32 kfrag(const Tile<CLASS_INT4>& t, int n, int c, int b,
                                     const Magic& g) {
  return raw4(word(t.k[n], c / 2), (c % 2) * 2 + b, g);
}
__device__ __forceinline__ u32 kfrag(const Tile<CLASS_INT2>& t, int n, int c, int b,
                                     const Magic& g) {
  return raw2(word(t.k, n * 2 + c / 4), (c % 4) * 2 + b, g);
}
__device__ __forceinline__ u32 kfrag(const Tile<CLASS_F16>& t, int n, int c, int b, const Magic&) {
  return word(t.k[n][c / 2], (c % 2) * 2 + b);
}
__device__ __forceinline__ u32 kfrag(const Tile<CLASS_FP8>& t, int n, int c, int b, const Magic&) {
  return fp8pair(word(t.k[n * 2 + c / 4], c % 4), b);
}
template <int CLS> __device__ __forceinline__ float kbase(int c, int b) {
  if (CLS == CLASS_INT4) return mag4((c % 2) * 2 + b) ? 64.f : 1024.f;
  if (CLS == CLASS_INT2) return 1024.f / (float)(1 << (2 * mag2((c % 4) * 2 + b)));
  return 0.f;
}

// A fragment of V^T for m-tile m (dims 16m..16m+15), register a.
__device__ __forceinline__ u32 vfrag(const Tile<CLASS_INT4>& t, int m, int a, const Magic& g) {
  return exact(raw4(word(t.v[m / 4], m % 4), a, g), g.m[mag4(a)]);
}
__device__ __forceinline__ u32 vfrag(const Tile<CLASS_INT2>& t, int m, int a, const Magic& g) {
  const int i = (m % 2) * 4 + a;
  return exact(raw2(word(t.v, m / 2), i, g), g.m[mag2(i)]);
}
__device__ __forceinline__ u32 vfrag(const Tile<CLASS_F16>& t, int m, int a, const Magic&) {
  return word(t.v[m], a);
}
__device__ __forceinline__ u32 vfrag(const Tile<CLASS_FP8>& t, int m, int a, const Magic&) {
  return fp8pair(word(t.v[m / 2], 2 * (m % 2) + (a >> 1)), a & 1);
}

// Per-warp running state: O^T fragments (dims x heads 2t, 2t+1), and for heads 2t, 2t+1 the
// softmax max (equal on all lanes of a t), this lane's partial sum and V-zero sums.
template <int NG> struct WarpState {
  float o[8][4];
  float m[2], l[2];
  float z[2][NG];
};

// Fold a block's per-channel K scales into q (Q' = q * s_k) and q . z_k - Q' . base into a
// per-head bias.
// `ksz` points at the block's K scales (128 fp16) followed by its K zeros (128 fp16).
// FP8: Q' = q, and bias2 = (K scale, V scale * FP8_P_SHIFT) of the block (two f32 at ksz).
template <int CLS>
__device__ __forceinline__ void fold_block(u32 (&qk)[8][2], float2& bias2, const u32 (&qf)[8][2],
                                           const unsigned char* ksz, int lane) {
  const int t = lane & 3;
  float bias = 0.f;
#pragma unroll
  for (int c = 0; c < 8; c++)
#pragma unroll
    for (int b = 0; b < 2; b++) {
      if (CLS == CLASS_INT4 || CLS == CLASS_INT2) {
        const int d = 16 * c + 2 * t + 8 * b;
        const __half2 s = *reinterpret_cast<const __half2*>(ksz + 2 * d);
        const __half2 z = *reinterpret_cast<const __half2*>(ksz + 2 * HEAD_DIM + 2 * d);
        qk[c][b] = h2u(__hmul2(u2h(qf[c][b]), s));
        const float2 qz = __half22float2(u2h(qf[c][b]));
        const float2 zz = __half22float2(z);
        // The mma sees K = base + q: subtract q' . base with the exact fp16 q' it multiplies.
        const float2 qs = __half22float2(u2h(qk[c][b]));
        bias += qz.x * zz.x + qz.y * zz.y - kbase<CLS>(c, b) * (qs.x + qs.y);
      } else {
        qk[c][b] = qf[c][b];
      }
    }
  bias2 = make_float2(0.f, 0.f);
  if (CLS == CLASS_FP8) {
    const float2 sc = *reinterpret_cast<const float2*>(ksz);
    bias2 = make_float2(sc.x, sc.y * TKV_FP8_P_SHIFT);
  } else if (CLS != CLASS_F16) {
    // Quad sum gives head g's bias; the scores need heads 2t and 2t+1.
    bias += __shfl_xor_sync(0xffffffffu, bias, 1);
    bias += __shfl_xor_sync(0xffffffffu, bias, 2);
    bias2.x = __shfl_sync(0xffffffffu, bias, 8 * t);
    bias2.y = __shfl_sync(0xffffffffu, bias, 8 * t + 4);
  }
}

// 2^x without exp2f's range fix-up (x <= 0 here; -inf gives 0, tiny results flush to 0).
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ u32 transpose8x8(u32 x) {
  u32 r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// One 16-token tile: scores, online softmax, and the p.v update.
// Scores are S^T = K Q'^T (A = 16 tokens x 16 dims of K, B = Q'^T, 16 dims x 8 heads): 8 mma
// per tile and no zero rows. Lane (g, t) gets tokens g, g+8 x heads 2t, 2t+1; two movmatrix
// transposes turn fp16 P into the B operand of O^T += V^T P'^T (tokens 2t.., head g).
// `vsc` points at the tile's V scales (8 token pairs x NG half2) and `vzc` at its V zeros.
template <int CLS, int VG>
__device__ __forceinline__ void compute_tile(WarpState<HEAD_DIM / VG>& st, const Tile<CLS>& tl,
                                             const u32 (&qk)[8][2], float2 bias,
                                             const __half2* vsc, const __half2* vzc, int tile,
                                             int ntok, int lane, const Magic& mg) {
  constexpr int NG = HEAD_DIM / VG;
  constexpr bool INT = CLS == CLASS_INT4 || CLS == CLASS_INT2;
  constexpr bool FP8 = CLS == CLASS_FP8;
  const int g = lane >> 2, t = lane & 3;
  // Two independent accumulation chains halve the mma dependency latency.
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int c = 0; c < 8; c++)
    mma16816(acc[c & 1], kfrag(tl, 0, c, 0, mg), kfrag(tl, 1, c, 0, mg), kfrag(tl, 0, c, 1, mg),
             kfrag(tl, 1, c, 1, mg), qk[c][0], qk[c][1]);
  // s[r][h]: token g + 8r, head 2t + h.
  float s[2][2];
  const int tok0 = tile * 16 + g;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const bool ok = tok0 + 8 * r < ntok;
    if (FP8) {  // bias = (K scale, P' scale)
      s[r][0] = ok ? (acc[0][2 * r] + acc[1][2 * r]) * bias.x : TKV_NEG_INF;
      s[r][1] = ok ? (acc[0][2 * r + 1] + acc[1][2 * r + 1]) * bias.x : TKV_NEG_INF;
    } else {
      s[r][0] = ok ? acc[0][2 * r] + acc[1][2 * r] + bias.x : TKV_NEG_INF;
      s[r][1] = ok ? acc[0][2 * r + 1] + acc[1][2 * r + 1] + bias.y : TKV_NEG_INF;
    }
  }
  float alpha[2], p[2][2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float mx = fmaxf(s[0][h], s[1][h]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    const float m_new = fmaxf(st.m[h], mx);
    alpha[h] = ex2(st.m[h] - m_new);
    st.m[h] = m_new;
    p[0][h] = ex2(s[0][h] - m_new);
    p[1][h] = ex2(s[1][h] - m_new);
    st.l[h] = st.l[h] * alpha[h] + (p[0][h] + p[1][h]);
  }
  // Lazy rescale: once the running max settles, no head's max moves and the 32 multiplies
  // are skipped (warp-uniform branch).
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int mt = 0; mt < 8; mt++) {
      st.o[mt][0] *= alpha[0];
      st.o[mt][1] *= alpha[1];
      st.o[mt][2] *= alpha[0];
      st.o[mt][3] *= alpha[1];
    }
  }
  // P^T fragments: tokens (2t, 2t+1) / (2t+8, 2t+9) of head g.
  const float ps = FP8 ? bias.y : 1.f;
  const __half2 pb0 = u2h(transpose8x8(h2u(__floats2half2_rn(p[0][0] * ps, p[0][1] * ps))));
  const __half2 pb1 = u2h(transpose8x8(h2u(__floats2half2_rn(p[1][0] * ps, p[1][1] * ps))));
  u32 b0[NG], b1[NG];
  if (INT) {
    const __half* vz = reinterpret_cast<const __half*>(vzc);
#pragma unroll
    for (int gi = 0; gi < NG; gi++) {
      // V scale pairs of tokens (2t, 2t+1) and (2t+8, 2t+9) for the P' operand.
      b0[gi] = h2u(__hmul2(pb0, vsc[t * NG + gi]));
      b1[gi] = h2u(__hmul2(pb1, vsc[(t + 4) * NG + gi]));
      // V zeros of tokens g and g+8 (index (tok / 2) * 2NG + 2 gi + tok % 2) for heads 2t, 2t+1.
      const float z0 = __half2float(vz[(g >> 1) * 2 * NG + 2 * gi + (g & 1)]);
      const float z1 = __half2float(vz[((g >> 1) + 4) * 2 * NG + 2 * gi + (g & 1)]);
#pragma unroll
      for (int h = 0; h < 2; h++) st.z[h][gi] = st.z[h][gi] * alpha[h] + p[0][h] * z0 + p[1][h] * z1;
    }
  } else {
#pragma unroll
    for (int gi = 0; gi < NG; gi++) {
      b0[gi] = h2u(pb0);
      b1[gi] = h2u(pb1);
    }
  }
#pragma unroll
  for (int mt = 0; mt < 8; mt++) {
    const int gi = (16 * mt) / VG;
    mma16816(st.o[mt], vfrag(tl, mt, 0, mg), vfrag(tl, mt, 1, mg), vfrag(tl, mt, 2, mg),
             vfrag(tl, mt, 3, mg), b0[gi], b1[gi]);
  }
}

// ---- Walking a warp's blocks ----------------------------------------------------------------
// Register path: load UNR tiles, compute them, repeat. Used for 16-bit blocks, whose tiles are
// large (8 KB per warp) and few.
template <int CLS, int VG, int UNR>
__device__ __forceinline__ void walk_registers(WarpState<HEAD_DIM / VG>& st, const u32 (&qf)[8][2],
                                               const DecodeParams& p, const ClassInfo& ci, int kvh,
                                               int e0, int e1, int warp, int lane,
                                               const Magic& mg) {
  constexpr int NG = HEAD_DIM / VG;
  for (int e = e0 + warp; e < e1; e += NWARPS) {
    const unsigned char* blk = p.pool + ((long long)ci.slot[e] * p.kv_heads + kvh) * p.slab_bytes;
    const int ntok = ci.ntok[e], ntiles = (ntok + 15) >> 4;
    u32 qk[8][2];
    float2 bias;
    fold_block<CLS>(qk, bias, qf, blk + ci.ks_off, lane);
    const int kgt = ci.k_group >> 4;  // tiles per K scale group
    for (int tile0 = 0; tile0 < ntiles; tile0 += UNR) {
      Tile<CLS> tl[UNR];
#pragma unroll
      for (int u = 0; u < UNR; u++)
        if (tile0 + u < ntiles) load_tile(tl[u], blk, ci.v_off, tile0 + u, lane);
#pragma unroll
      for (int u = 0; u < UNR; u++) {
        const int tile = tile0 + u;
        if (tile >= ntiles) break;
        if ((CLS == CLASS_INT4 || CLS == CLASS_INT2) && tile > 0 && tile % kgt == 0)
          fold_block<CLS>(qk, bias, qf, blk + ci.ks_off + (tile / kgt) * 4 * HEAD_DIM, lane);
        const __half2* vs = reinterpret_cast<const __half2*>(blk + ci.vs_off + tile * 32 * NG);
        const __half2* vz = reinterpret_cast<const __half2*>(blk + ci.vz_off + tile * 32 * NG);
        compute_tile<CLS, VG>(st, tl[u], qk, bias, vs, vz, tile, ntok, lane, mg);
      }
    }
  }
}

// ---- Packed classes (INT4 / INT2) ------------------------------------------------------------
// Per warp, a STAGES-deep shared-memory ring filled by cp.async.bulk (one bulk copy per area:
// K codes, V codes, V scales, V zeros of UNR tiles, and the block's K scales/zeros on a warp's
// first unit of a block; lane 0 issues them), completing on one mbarrier per stage.
//
// V codes are read as fp16 subnormals: `word & mask` (one lop3 per register pair, no magic and
// no subtraction) is q * 2^(2j-24) for a field at mantissa bits 2j. The field weight 2^(2j)
// depends on the A-fragment register a = row_hi + 2 tok_hi only: rows (dims) carry 4^row_hi
// (INT2) or 16^row_hi (INT4), undone on the output; INT2's tokens 8..15 carry another 16,
// undone by storing their probabilities as P / 16 (the exponent argument minus 4).
// The V zeros and the softmax sum ride in one more mma per tile: A rows 0..NG-1 = the V zeros of
// each value group (per token), row NG = ones; B = P^T. The running max moves only when a score
// passes m + TKV_LAZY_T (probabilities up to 2^T are fine in fp16), so most tiles need no
// cross-lane reduction at all.
#ifndef TKV_LAZY_T
#define TKV_LAZY_T 6.f
#endif

template <int NG> struct IntState {
  float o[8][4];  // O^T fragments (dims x heads 2t, 2t+1), row-weighted V codes
  float zl[4];    // [0], [1]: row g (g < NG: V-zero sum of group g; g == NG: softmax sum)
  float m[2];     // running max of heads 2t, 2t+1 (log2 domain)
};

template <int CLS> struct TileBytes { static const int N = CLS == CLASS_INT4 ? 1024 : 512; };

template <int CLS, int VG, int UNR> struct BStage {
  uint4 k[UNR * TileBytes<CLS>::N / 16];  // K codes of UNR consecutive tiles (global order)
  uint4 v[UNR * TileBytes<CLS>::N / 16];  // V codes
  uint4 vs[UNR * 2 * (HEAD_DIM / VG)];    // V scales, 32 * NG bytes per tile
  uint4 vz[UNR * 2 * (HEAD_DIM / VG)];    // V zeros
  uint4 ksz[32];                          // K scales (256 B) + K zeros (256 B)
};

__device__ __forceinline__ u32 smem_u32(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  u32 ok;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!ok);
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ u32 lds32s(u32 a) {
  u32 r;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(a) : "memory");
  return r;
}
__device__ __forceinline__ uint4 lds128s(u32 a) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "r"(a)
               : "memory");
  return r;
}
__device__ __forceinline__ u32 hfma2u(u32 a, u32 b, u32 c) {
  return h2u(__hfma2(u2h(a), u2h(b), u2h(c)));
}

// V^T A fragment as fp16 subnormals (see above): m-tile m, register a.
__device__ __forceinline__ u32 vsub(const Tile<CLASS_INT4>& t, int m, int a) {
  const u32 x = word(t.v[m / 4], m % 4);
  return ((a >= 2) ? (x >> 8) : x) & (0x000f000fu << (4 * (a & 1)));
}
__device__ __forceinline__ u32 vsub(const Tile<CLASS_INT2>& t, int m, int a) {
  const u32 x = word(t.v, m / 2);
  return ((m & 1) ? (x >> 8) : x) & (0x00030003u << (2 * a));
}
// Output weight of O^T row half (dims 16m + g + 8 row_hi): 2^24 / field weight.
template <int CLS> __device__ __forceinline__ float vweight(int row_hi) {
  return row_hi ? (CLS == CLASS_INT2 ? 4194304.f : 1048576.f) : 16777216.f;
}
// Exponent offset of tokens 8..15 of a tile (INT2 stores P / 16 for them).
template <int CLS> __device__ __forceinline__ float tok_hi_off() {
  return CLS == CLASS_INT2 ? 4.f : 0.f;
}

// Per-block K fold by mma: Q' = q * s_k (per channel), and the score bias
// q . z_k - Q' . base (base: the magic-number base of each K field, see Magic), computed as
// two mma chains with all A rows equal, so every lane gets the bias of its heads 2t, 2t+1.
template <int CLS>
__device__ __forceinline__ void fold_mma(u32 (&qk)[8][2], float2& bias, const uint4* qsm,
                                         u32 ksz, int lane) {
  const int t = lane & 3;
  float az[4] = {0.f, 0.f, 0.f, 0.f}, ab[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const uint4 w4 = qsm[i * 32 + lane];
    const u32 qf[2][2] = {{w4.x, w4.y}, {w4.z, w4.w}};
#pragma unroll
    for (int cc = 0; cc < 2; cc++) {
      const int c = 2 * i + cc;
      const int d0 = 16 * c + 2 * t, d1 = d0 + 8;
      const u32 s0 = lds32s(ksz + 2 * d0), s1 = lds32s(ksz + 2 * d1);
      const u32 z0 = lds32s(ksz + 2 * HEAD_DIM + 2 * d0), z1 = lds32s(ksz + 2 * HEAD_DIM + 2 * d1);
      qk[c][0] = h2u(__hmul2(u2h(qf[cc][0]), u2h(s0)));
      qk[c][1] = h2u(__hmul2(u2h(qf[cc][1]), u2h(s1)));
      const u32 nb0 = h2u(__float2half2_rn(-kbase<CLS>(c, 0)));
      const u32 nb1 = h2u(__float2half2_rn(-kbase<CLS>(c, 1)));
      mma16816(az, z0, z0, z1, z1, qf[cc][0], qf[cc][1]);
      mma16816(ab, nb0, nb0, nb1, nb1, qk[c][0], qk[c][1]);
    }
  }
  bias = make_float2(az[0] + ab[0], az[1] + ab[1]);
}

// Constants of the zero/sum mma's A operand for this lane (row g).
struct ZRow {
  u32 k0, c0, k2, c2;  // a0 = z * k0 + c0 (tokens 2t, 2t+1), a2 = z * k2 + c2 (tokens 2t+8, 2t+9)
  int gc;              // value group this lane reads (clamped)
};
template <int CLS, int NG> __device__ __forceinline__ ZRow make_zrow(int lane) {
  const int g = lane >> 2;
  const float hi = CLS == CLASS_INT2 ? 16.f : 1.f;
  ZRow r;
  r.k0 = h2u(__float2half2_rn(g < NG ? 1.f : 0.f));
  r.c0 = h2u(__float2half2_rn(g == NG ? 1.f : 0.f));
  r.k2 = h2u(__float2half2_rn(g < NG ? hi : 0.f));
  r.c2 = h2u(__float2half2_rn(g == NG ? hi : 0.f));
  r.gc = g < NG ? g : 0;
  return r;
}

// NT (1 or 2) consecutive 16-token tiles of a packed class, one softmax step: the two tiles'
// chains interleave (independent mma and decode work while the other waits).
// cinit = bias - m per score slot (token g / g+8 x heads 2t, 2t+1; INT2 tokens g+8 also minus
// 4). rem[j] = valid tokens from tile j's first; vsc/vzc = shared addresses of tile 0's V
// scales / zeros (tile 1's follow at +32 NG bytes).
template <int CLS, int VG, int NT>
__device__ __forceinline__ void tiles_int(IntState<HEAD_DIM / VG>& st, const Tile<CLS> (&tl)[NT],
                                          const u32 (&qk)[8][2], float (&cinit)[4], u32 vsc,
                                          u32 vzc, int rem0, bool& first, int lane,
                                          const Magic& mg, const ZRow& zr) {
  constexpr int NG = HEAD_DIM / VG;
  const int g = lane >> 2, t = lane & 3;
  float acc[NT][2][4];
#pragma unroll
  for (int j = 0; j < NT; j++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      acc[j][0][i] = cinit[i];
      acc[j][1][i] = 0.f;
    }
#pragma unroll
  for (int c = 0; c < 8; c++)
#pragma unroll
    for (int j = 0; j < NT; j++)
      mma16816(acc[j][c & 1], kfrag(tl[j], 0, c, 0, mg), kfrag(tl[j], 1, c, 0, mg),
               kfrag(tl[j], 0, c, 1, mg), kfrag(tl[j], 1, c, 1, mg), qk[c][0], qk[c][1]);
  // x[j][2r + h]: tile j, token g + 8r, head 2t + h, minus m (INT2 r = 1: minus 4 more).
  float x[NT][4];
  bool hot = false;
#pragma unroll
  for (int j = 0; j < NT; j++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      x[j][i] = acc[j][0][i] + acc[j][1][i];
      hot = hot || x[j][i] > TKV_LAZY_T;
    }
  // Rare, warp-uniform: the first tile, a partial tile, or a score past m + T.
  const int remN = rem0 - 16 * (NT - 1);  // valid tokens of the last tile
  if (first || remN < 16 || __any_sync(0xffffffffu, hot)) {
    if (remN < 16) {
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int i = 0; i < 4; i++)
          x[j][i] = g + 8 * (i >> 1) < rem0 - 16 * j ? x[j][i] : TKV_NEG_INF;
    }
    float d[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float mx = TKV_NEG_INF;
#pragma unroll
      for (int j = 0; j < NT; j++) mx = fmaxf(mx, fmaxf(x[j][h], x[j][2 + h] + tok_hi_off<CLS>()));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      d[h] = first ? mx : fmaxf(mx, 0.f);  // a computed tile has a valid token
    }
    if (first || __any_sync(0xffffffffu, d[0] != 0.f || d[1] != 0.f)) {
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; h++) {
        st.m[h] += d[h];
#pragma unroll
        for (int j = 0; j < NT; j++) {
          x[j][h] -= d[h];
          x[j][2 + h] -= d[h];
        }
        cinit[h] -= d[h];
        cinit[2 + h] -= d[h];
        alpha[h] = ex2(-d[h]);
      }
      if (!first) {
#pragma unroll
        for (int mt = 0; mt < 8; mt++) {
          st.o[mt][0] *= alpha[0];
          st.o[mt][1] *= alpha[1];
          st.o[mt][2] *= alpha[0];
          st.o[mt][3] *= alpha[1];
        }
        st.zl[0] *= alpha[0];
        st.zl[1] *= alpha[1];
        st.zl[2] *= alpha[0];
        st.zl[3] *= alpha[1];
      }
      first = false;
    }
  }
  u32 b0[NT][NG], b1[NT][NG];
#pragma unroll
  for (int j = 0; j < NT; j++) {
    const u32 vs = vsc + j * 32 * NG, vz = vzc + j * 32 * NG;
    // P^T fragments: tokens (2t, 2t+1) / (2t+8, 2t+9) of head g.
    const u32 pb0 = transpose8x8(h2u(__floats2half2_rn(ex2(x[j][0]), ex2(x[j][1]))));
    const u32 pb1 = transpose8x8(h2u(__floats2half2_rn(ex2(x[j][2]), ex2(x[j][3]))));
    // V zeros and ones x P^T: group sums and the softmax sum.
    const u32 za0 = hfma2u(lds32s(vz + 4 * (t * NG + zr.gc)), zr.k0, zr.c0);
    const u32 za2 = hfma2u(lds32s(vz + 4 * ((t + 4) * NG + zr.gc)), zr.k2, zr.c2);
    mma16816(st.zl, za0, 0u, za2, 0u, pb0, pb1);
#pragma unroll
    for (int gi = 0; gi < NG; gi++) {
      b0[j][gi] = h2u(__hmul2(u2h(pb0), u2h(lds32s(vs + 4 * (t * NG + gi)))));
      b1[j][gi] = h2u(__hmul2(u2h(pb1), u2h(lds32s(vs + 4 * ((t + 4) * NG + gi)))));
    }
  }
#pragma unroll
  for (int mt = 0; mt < 8; mt++) {
    const int gi = (16 * mt) / VG;
#pragma unroll
    for (int j = 0; j < NT; j++)
      mma16816(st.o[mt], vsub(tl[j], mt, 0), vsub(tl[j], mt, 1), vsub(tl[j], mt, 2),
               vsub(tl[j], mt, 3), b0[j][gi], b1[j][gi]);
  }
}

// Which (block, tile group) units of a work item a warp takes. Long work items: whole blocks
// round-robin over the warps (one K fold per block). Short ones (small batch, few blocks per
// CTA): the units (block, group of UNR tiles) of all blocks in order, warp w taking units
// w, w + NWARPS, ..., so all warps have work and each warp's serial chain is a quarter as long.
// Block tables come from shared memory (the first TKV_TAB entries of the work item).
#ifndef TKV_TAB
#define TKV_TAB 64
#endif
// Tiles per softmax step (1 or 2; 2 interleaves two tiles' dependency chains).
#ifndef TKV_PAIR
#define TKV_PAIR 2
#endif
struct Units {
  int e, g, nt, ntok;
  bool first;  // first unit of this entry for this warp (its K scales are needed)
  bool inter;
  // Whether this unit (tiles g * unr ..) needs K scales other than the warp's previous unit:
  // its entry's first, or it starts a K scale group (units never straddle one: unr divides
  // the group's tiles kgt); interleaved warps skip units, so they fold every unit when a
  // block holds several groups.
  __device__ __forceinline__ bool fold(int unr, int kgt, int block_tiles) const {
    return first || (kgt < block_tiles && (inter || (g * unr) % kgt == 0));
  }
  // The K scale group of this unit.
  __device__ __forceinline__ int kgroup(int unr, int kgt) const { return (g * unr) / kgt; }
  __device__ __forceinline__ void load(const ClassInfo& ci, const int* s_ntok, int e0, int e1) {
    if (e < e1) {
      ntok = e - e0 < TKV_TAB ? s_ntok[e - e0] : ci.ntok[e];
      nt = (ntok + 15) >> 4;
    }
  }
  __device__ __forceinline__ void step(const ClassInfo& ci, const int* s_ntok, int e0, int e1,
                                       int unr, int estep) {
    g++;
    while (e < e1 && g * unr >= nt) {
      e += estep;
      g = 0;
      first = true;
      load(ci, s_ntok, e0, e1);
    }
  }
  __device__ __forceinline__ void init(const ClassInfo& ci, const int* s_ntok, int e0, int e1,
                                       int warp, int unr) {
    inter = e1 - e0 < 2 * NWARPS;
    e = inter ? e0 : e0 + warp;
    g = -1;
    nt = 0;
    load(ci, s_ntok, e0, e1);
    first = true;
    step(ci, s_ntok, e0, e1, unr, inter ? 1 : NWARPS);
    if (inter)
      for (int i = 0; i < warp; i++) step(ci, s_ntok, e0, e1, unr, 1);
    first = true;
  }
  __device__ __forceinline__ void next(const ClassInfo& ci, const int* s_ntok, int e0, int e1,
                                       int unr) {
    first = false;
    if (inter) {
#pragma unroll
      for (int i = 0; i < NWARPS; i++) step(ci, s_ntok, e0, e1, unr, 1);
    } else {
      step(ci, s_ntok, e0, e1, unr, NWARPS);
    }
  }
};

template <int CLS, int VG, int UNR, int STAGES>
__device__ __forceinline__ void walk_bulk(IntState<HEAD_DIM / VG>& st, const uint4* qsm,
                                          const DecodeParams& p, const ClassInfo& ci, int kvh,
                                          int e0, int e1, int warp, int lane,
                                          BStage<CLS, VG, UNR>* ring, unsigned long long* bars,
                                          const int* s_slot, const int* s_ntok, const Magic& mg) {
  constexpr int NG = HEAD_DIM / VG;
  constexpr int TB = TileBytes<CLS>::N;
  typedef BStage<CLS, VG, UNR> Stage;
  const u32 ring_s = smem_u32(ring), bar_s = smem_u32(bars);
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; s++) mbar_init(bar_s + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncwarp();
  constexpr u32 OFF_V = UNR * TB, OFF_VS = 2 * UNR * TB, OFF_VZ = OFF_VS + UNR * 32 * NG,
                OFF_KSZ = OFF_VZ + UNR * 32 * NG;
  static_assert(OFF_KSZ + 512 == sizeof(Stage), "BStage layout");
  const int kgt = ci.k_group >> 4, block_tiles = ci.tokens >> 4;
  Units is, cs;  // issue and compute iterators walk the same sequence
  is.init(ci, s_ntok, e0, e1, warp, UNR);
  cs = is;
  auto issue = [&](int stage) {
    if (is.e < e1) {
      const int slot = is.e - e0 < TKV_TAB ? s_slot[is.e - e0] : ci.slot[is.e];
      const unsigned char* blk = p.pool + ((long long)slot * p.kv_heads + kvh) * p.slab_bytes;
      const int t0 = is.g * UNR;
      const int n = min(UNR, is.nt - t0);
      const u32 bar = bar_s + 8 * stage;
      const bool fold = is.fold(UNR, kgt, block_tiles);
      if (lane == 0) {
        mbar_expect_tx(bar, n * (2 * TB + 64 * NG) + (fold ? 512 : 0));
        const u32 sd = ring_s + stage * (u32)sizeof(Stage);
        bulk_copy(sd, blk + t0 * TB, n * TB, bar);
        bulk_copy(sd + OFF_V, blk + ci.v_off + t0 * TB, n * TB, bar);
        bulk_copy(sd + OFF_VS, blk + ci.vs_off + t0 * 32 * NG, n * 32 * NG, bar);
        bulk_copy(sd + OFF_VZ, blk + ci.vz_off + t0 * 32 * NG, n * 32 * NG, bar);
        if (fold) bulk_copy(sd + OFF_KSZ, blk + ci.ks_off + is.kgroup(UNR, kgt) * 512, 512, bar);
      }
      is.next(ci, s_ntok, e0, e1, UNR);
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) issue(s);
  const ZRow zr = make_zrow<CLS, NG>(lane);
  int stage = 0;
  u32 phase = 0;
  bool first = true;  // no tile computed yet (the running max is not set)
  u32 qk[8][2];
  float cinit[4] = {0.f, 0.f, 0.f, 0.f};
  while (cs.e < e1) {
    issue((stage + STAGES - 1) % STAGES);
    const u32 sb = ring_s + stage * (u32)sizeof(Stage);
    mbar_wait(bar_s + 8 * stage, (phase >> stage) & 1);
    phase ^= 1u << stage;
    if (cs.fold(UNR, kgt, block_tiles)) {
      float2 bias;
      fold_mma<CLS>(qk, bias, qsm, sb + OFF_KSZ, lane);
      cinit[0] = bias.x - st.m[0];
      cinit[1] = bias.y - st.m[1];
      cinit[2] = cinit[0] - tok_hi_off<CLS>();
      cinit[3] = cinit[1] - tok_hi_off<CLS>();
    }
    auto load = [&](Tile<CLS>& tl, int u) {
      uint4* w = reinterpret_cast<uint4*>(&tl);
#pragma unroll
      for (int i = 0; i < TB / 512; i++) {
        w[i] = lds128s(sb + u * TB + i * 512 + lane * 16);
        w[TB / 512 + i] = lds128s(sb + OFF_V + u * TB + i * 512 + lane * 16);
      }
    };
#pragma unroll
    for (int u = 0; u < UNR; u += TKV_PAIR) {
      const int tile = cs.g * UNR + u;
      const u32 vs = sb + OFF_VS + u * 32 * NG, vz = sb + OFF_VZ + u * 32 * NG;
      if (TKV_PAIR == 2 && u + 1 < UNR && tile + 1 < cs.nt) {
        Tile<CLS> tl[2];
        load(tl[0], u);
        load(tl[1], u + 1);
        tiles_int<CLS, VG, 2>(st, tl, qk, cinit, vs, vz, cs.ntok - tile * 16, first, lane, mg, zr);
      } else if (tile < cs.nt) {
        Tile<CLS> tl[1];
        load(tl[0], u);
        tiles_int<CLS, VG, 1>(st, tl, qk, cinit, vs, vz, cs.ntok - tile * 16, first, lane, mg, zr);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
    cs.next(ci, s_ntok, e0, e1, UNR);
    stage = (stage + 1) % STAGES;
  }
  if (first) st.m[0] = st.m[1] = -1e30f;  // no tile: this warp must not weigh in the combine
}

template <int CLS, int VG, int UNR, int STAGES>
__device__ __forceinline__ void decode_attention_body(const DecodeParams& p, int work_base) {
  constexpr int NG = HEAD_DIM / VG;
  const int work_id = work_base + blockIdx.x, kvh = blockIdx.y;
  const int4 w = p.work[work_id];
  const int seq = w.x, e0 = w.z, e1 = w.w;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int gqa = p.gqa;

  // Query fragments for head g (rows >= gqa stay zero), pre-scaled into the log2 domain.
  u32 qf[8][2];
  const __half* qrow = p.q + ((long long)seq * p.q_heads + kvh * gqa + g) * HEAD_DIM;
#pragma unroll
  for (int c = 0; c < 8; c++)
#pragma unroll
    for (int b = 0; b < 2; b++) {
      float2 v = make_float2(0.f, 0.f);
      if (g < gqa) {
        v = __half22float2(*reinterpret_cast<const __half2*>(qrow + 16 * c + 2 * t + 8 * b));
        v.x *= p.scale_log2;
        v.y *= p.scale_log2;
      }
      qf[c][b] = h2u(__floats2half2_rn(v.x, v.y));
    }

  // One shared buffer: the bulk-copy ring while walking, the cross-warp combine afterwards.
  struct Combine {
    float o[NWARPS][MAX_GQA][HEAD_DIM];
    float m[NWARPS][MAX_GQA], l[NWARPS][MAX_GQA], z[NWARPS][MAX_GQA][NG];
  };
  // Class of the packed path (16-bit and FP8 blocks take the register path).
  constexpr int PCLS = CLS == CLASS_INT4 ? CLASS_INT4 : CLASS_INT2;
  constexpr bool REG_PATH = CLS == CLASS_F16 || CLS == CLASS_FP8 || STAGES == 0;
  constexpr int NSTAGES = STAGES > 1 ? STAGES : 2;
  constexpr int RING = REG_PATH ? 0 : (int)sizeof(BStage<PCLS, VG, UNR>) * NSTAGES * NWARPS;
  constexpr int SMEM = RING > (int)sizeof(Combine) ? RING : (int)sizeof(Combine);
  __shared__ __align__(128) unsigned char smem[SMEM];
  __shared__ unsigned long long bars[REG_PATH ? 1 : NWARPS * NSTAGES];
  Combine& cb = *reinterpret_cast<Combine*>(smem);

  const ClassInfo& ci = p.cls[CLS];
  const Magic mg = make_magic();
  if constexpr (REG_PATH) {
    WarpState<NG> st;
#pragma unroll
    for (int mt = 0; mt < 8; mt++)
#pragma unroll
      for (int i = 0; i < 4; i++) st.o[mt][i] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      st.m[h] = -1e30f;  // finite, so a fully masked tile never computes inf - inf
      st.l[h] = 0.f;
#pragma unroll
      for (int i = 0; i < NG; i++) st.z[h][i] = 0.f;
    }
    walk_registers<CLS, VG, UNR>(st, qf, p, ci, kvh, e0, e1, warp, lane, mg);
    __syncthreads();
    // Finish the per-lane partial sums over the 8 lanes of each t (tokens g, g+8).
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int x = 4; x < 32; x *= 2) {
        st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], x);
#pragma unroll
        for (int i = 0; i < NG; i++) st.z[h][i] += __shfl_xor_sync(0xffffffffu, st.z[h][i], x);
      }
#pragma unroll
    for (int mt = 0; mt < 8; mt++)
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int h = 2 * t + (i & 1), d = 16 * mt + g + 8 * (i >> 1);
        cb.o[warp][h][d] = st.o[mt][i];
      }
    if (g == 0) {
#pragma unroll
      for (int h = 0; h < 2; h++) {
        cb.m[warp][2 * t + h] = st.m[h];
        cb.l[warp][2 * t + h] = st.l[h];
#pragma unroll
        for (int i = 0; i < NG; i++) cb.z[warp][2 * t + h][i] = st.z[h][i];
      }
    }
  } else {
    __shared__ uint4 qsm[4 * 32];  // qf of every lane (equal in all warps), for the K fold
    __shared__ int s_slot[TKV_TAB], s_ntok[TKV_TAB];  // the work item's block table
    for (int i = threadIdx.x; i < e1 - e0 && i < TKV_TAB; i += NWARPS * 32) {
      s_slot[i] = ci.slot[e0 + i];
      s_ntok[i] = ci.ntok[e0 + i];
    }
    if (warp == 0) {
#pragma unroll
      for (int i = 0; i < 4; i++)
        qsm[i * 32 + lane] =
            make_uint4(qf[2 * i][0], qf[2 * i][1], qf[2 * i + 1][0], qf[2 * i + 1][1]);
    }
    __syncthreads();
    IntState<NG> st;
#pragma unroll
    for (int mt = 0; mt < 8; mt++)
#pragma unroll
      for (int i = 0; i < 4; i++) st.o[mt][i] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) st.zl[i] = 0.f;
    st.m[0] = st.m[1] = 0.f;
    typedef BStage<PCLS, VG, UNR> Stage;
    walk_bulk<PCLS, VG, UNR, NSTAGES>(st, qsm, p, ci, kvh, e0, e1, warp, lane,
                                      reinterpret_cast<Stage*>(smem) + warp * NSTAGES,
                                      bars + warp * NSTAGES, s_slot, s_ntok, mg);
    __syncthreads();  // the ring is reused below
#pragma unroll
    for (int mt = 0; mt < 8; mt++)
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int h = 2 * t + (i & 1), d = 16 * mt + g + 8 * (i >> 1);
        cb.o[warp][h][d] = st.o[mt][i] * vweight<PCLS>(i >> 1);
      }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      if (g == 0) cb.m[warp][2 * t + h] = st.m[h];
      if (g < NG) cb.z[warp][2 * t + h][g] = st.zl[h];
      if (g == NG) cb.l[warp][2 * t + h] = st.zl[h];
    }
  }
  __syncthreads();
  const int d = threadIdx.x;  // one thread per dimension
  for (int h = 0; h < gqa; h++) {
    float M = -1e30f;
#pragma unroll
    for (int wi = 0; wi < NWARPS; wi++) M = fmaxf(M, cb.m[wi][h]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int wi = 0; wi < NWARPS; wi++) {
      const float f = exp2f(cb.m[wi][h] - M);
      L += f * cb.l[wi][h];
      O += f * (cb.o[wi][h][d] + cb.z[wi][h][d / VG]);
    }
    const long long row = (long long)work_id * p.q_heads + kvh * gqa + h;
    if (CLS == CLASS_FP8) O *= 1.f / TKV_FP8_P_SHIFT;
    p.part_o[row * HEAD_DIM + d] = L > 0.f ? O / L : 0.f;
    if (d == 0) p.part_lse[row] = L > 0.f ? M + log2f(L) : TKV_NEG_INF;
  }
}

#ifndef TKV_MERGE_MAXW
#define TKV_MERGE_MAXW (2 * HEAD_DIM)  // at most 2 * HEAD_DIM (two partials per thread)
#endif
// Merge the split-K partials of each (sequence, query head) by log-sum-exp. The partials of
// sequence s are rows work_index[seq_work_begin[s] .. seq_work_begin[s + 1]].
// grid (num_seqs, q_heads), block HEAD_DIM threads.
__device__ __forceinline__ void merge_partials(const float* part_o, const float* part_lse,
                                               const int* seq_work_begin, const int* work_index,
                                               int q_heads, float* out) {
  const int seq = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int w0 = seq_work_begin[seq], n = seq_work_begin[seq + 1] - w0;
  // Up to 2 * HEAD_DIM partials: their weights are computed once, in parallel (one partial per
  // thread), and the weighted rows are then read with independent loads. More: the same steps
  // strided over the threads, the rows in chunks of MAXW.
  constexpr int MAXW = TKV_MERGE_MAXW;
  __shared__ float s_f[MAXW];
  __shared__ int s_row[MAXW];
  __shared__ float s_red[2][HEAD_DIM / 32];
  const int warp = d >> 5, lane = d & 31;
  if (n > MAXW) {
    // Many partials: the same three steps, strided over the threads, then the rows in chunks.
    float m = TKV_NEG_INF;
    for (int i = d; i < n; i += HEAD_DIM)
      m = fmaxf(m, part_lse[(long long)work_index[w0 + i] * q_heads + h]);
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, x));
    if (lane == 0) s_red[0][warp] = m;
    __syncthreads();
    float M = s_red[0][0];
#pragma unroll
    for (int wi = 1; wi < HEAD_DIM / 32; wi++) M = fmaxf(M, s_red[0][wi]);
    float l = 0.f;
    for (int i = d; i < n; i += HEAD_DIM) {
      const float lse = part_lse[(long long)work_index[w0 + i] * q_heads + h];
      l += lse == TKV_NEG_INF ? 0.f : exp2f(lse - M);
    }
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) l += __shfl_xor_sync(0xffffffffu, l, x);
    if (lane == 0) s_red[1][warp] = l;
    __syncthreads();
    float L = 0.f;
#pragma unroll
    for (int wi = 0; wi < HEAD_DIM / 32; wi++) L += s_red[1][wi];
    const float inv = L > 0.f ? 1.f / L : 0.f;
    float O = 0.f;
    for (int c0 = 0; c0 < n; c0 += MAXW) {
      const int cnt = min(MAXW, n - c0);
      for (int i = d; i < cnt; i += HEAD_DIM) {
        const int row = work_index[w0 + c0 + i] * q_heads + h;
        const float lse = part_lse[row];
        s_f[i] = lse == TKV_NEG_INF ? 0.f : exp2f(lse - M) * inv;
        s_row[i] = row;
      }
      __syncthreads();
      int i = 0;
      for (; i + 4 <= cnt; i += 4) {
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = part_o[(long long)s_row[i + k] * HEAD_DIM + d];
#pragma unroll
        for (int k = 0; k < 4; k++) O += s_f[i + k] * v[k];
      }
      for (; i < cnt; i++) O += s_f[i] * part_o[(long long)s_row[i] * HEAD_DIM + d];
      __syncthreads();
    }
    out[((long long)seq * q_heads + h) * HEAD_DIM + d] = O;
    return;
  }
  int r[2] = {0, 0};
  float lse[2] = {TKV_NEG_INF, TKV_NEG_INF};
#pragma unroll
  for (int k = 0; k < 2; k++) {
    const int i = d + k * HEAD_DIM;
    if (i < n) {
      r[k] = work_index[w0 + i] * q_heads + h;
      lse[k] = part_lse[r[k]];
    }
  }
  float m = fmaxf(lse[0], lse[1]);
#pragma unroll
  for (int x = 16; x > 0; x >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, x));
  if (lane == 0) s_red[0][warp] = m;
  __syncthreads();
  float M = s_red[0][0];
#pragma unroll
  for (int wi = 1; wi < HEAD_DIM / 32; wi++) M = fmaxf(M, s_red[0][wi]);
  float f[2];
#pragma unroll
  for (int k = 0; k < 2; k++) f[k] = lse[k] == TKV_NEG_INF ? 0.f : exp2f(lse[k] - M);
  float l = f[0] + f[1];
#pragma unroll
  for (int x = 16; x > 0; x >>= 1) l += __shfl_xor_sync(0xffffffffu, l, x);
  if (lane == 0) s_red[1][warp] = l;
  __syncthreads();
  float L = 0.f;
#pragma unroll
  for (int wi = 0; wi < HEAD_DIM / 32; wi++) L += s_red[1][wi];
  const float inv = L > 0.f ? 1.f / L : 0.f;
#pragma unroll
  for (int k = 0; k < 2; k++) {
    const int i = d + k * HEAD_DIM;
    if (i < n) {
      s_f[i] = f[k] * inv;
      s_row[i] = r[k];
    }
  }
  __syncthreads();
  float O = 0.f;
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = part_o[(long long)s_row[i + k] * HEAD_DIM + d];
#pragma unroll
    for (int k = 0; k < 4; k++) O += s_f[i + k] * v[k];
  }
  for (; i < n; i++) O += s_f[i] * part_o[(long long)s_row[i] * HEAD_DIM + d];
  out[((long long)seq * q_heads + h) * HEAD_DIM + d] = O;
}

}  // namespace tkv

// C entry points (unmangled names for NVRTC / cudarc launchers), one per class and value
// group size: grid (work items of that class, kv_heads), block NWARPS * 32 threads; the work
// items of one class are contiguous from `work_base`. One launch per class present (not one
// fused launch): a kernel holding all three paths needed 253 registers per thread (2 CTAs per
// SM), the specialised ones need 112-168.
#define TKV_DECODE_ENTRY(NAME, CLS, UNR, STAGES, VG, MINB)                          \
  extern "C" __global__ void __launch_bounds__(tkv::NWARPS * 32, MINB)              \
      tkv_decode_##NAME##_vg##VG(const tkv::DecodeParams p, int work_base) {        \
    tkv::decode_attention_body<CLS, VG, UNR, STAGES>(p, work_base);                 \
  }
#define TKV_DECODE_ENTRIES(VG)                                                   \
  TKV_DECODE_ENTRY(f16, tkv::CLASS_F16, 1, 0, VG, TKV_MIN_BLOCKS)                          \
  TKV_DECODE_ENTRY(int4, tkv::CLASS_INT4, TKV_UNR_INT4, TKV_STAGES_INT4, VG, TKV_MIN_BLOCKS_INT4) \
  TKV_DECODE_ENTRY(int2, tkv::CLASS_INT2, TKV_UNR_INT2, TKV_STAGES_INT2, VG, TKV_MIN_BLOCKS_INT2)      \
  TKV_DECODE_ENTRY(fp8, tkv::CLASS_FP8, TKV_UNR_FP8, 0, VG, TKV_MIN_BLOCKS_FP8)
// Tiles per group and bulk-copy ring depth for the packed classes (TKV_STAGES 0: plain register
// loads, no ring); measured variants in docs/KERNEL_BENCH.md.
#ifndef TKV_UNR_INT4
#define TKV_UNR_INT4 2
#endif
#ifndef TKV_UNR_INT2
#define TKV_UNR_INT2 4
#endif
// FP8 walks plain register loads: 2 tiles = 8 KB per warp in flight, as much as 16-bit.
#ifndef TKV_UNR_FP8
#define TKV_UNR_FP8 2
#endif
#ifndef TKV_STAGES
#define TKV_STAGES 2  // v4: 2 stages x 4 (INT2) / 2 (INT4) tiles; static shared memory <= 48 KB
#endif
#ifndef TKV_STAGES_INT4
#define TKV_STAGES_INT4 TKV_STAGES
#endif
#ifndef TKV_STAGES_INT2
#define TKV_STAGES_INT2 TKV_STAGES
#endif
// CTAs per SM the register allocation must allow (4 caps registers at 128 per thread).
#ifndef TKV_MIN_BLOCKS
#define TKV_MIN_BLOCKS 4
#endif
#ifndef TKV_MIN_BLOCKS_INT4
#define TKV_MIN_BLOCKS_INT4 TKV_MIN_BLOCKS
#endif
#ifndef TKV_MIN_BLOCKS_INT2
#define TKV_MIN_BLOCKS_INT2 TKV_MIN_BLOCKS
#endif
#ifndef TKV_MIN_BLOCKS_FP8
#define TKV_MIN_BLOCKS_FP8 3  // UNR 2 needs ~148 registers (128 spills 112 B)
#endif
TKV_DECODE_ENTRIES(32)
TKV_DECODE_ENTRIES(64)
TKV_DECODE_ENTRIES(128)

extern "C" __global__ void tkv_merge_partials(const float* part_o, const float* part_lse,
                                              const int* seq_work_begin, const int* work_index,
                                              int q_heads, float* out) {
  tkv::merge_partials(part_o, part_lse, seq_work_begin, work_index, q_heads, out);
}
