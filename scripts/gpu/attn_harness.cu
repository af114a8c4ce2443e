// Standalone harness for kernels/decode_attention.cu (nvcc; the GPU machine has no cargo).
//   attn_harness golden FIXTURE      compare with the Rust packer + f64 reference fixture
//   attn_harness random              random packed caches at odd sizes vs a CPU reference
//   attn_harness bench OUT.json      timing grid: batch x context x cache kind
//     (env: TKV_ONLY=cache:batch:ctx one shape, TKV_QUICK=1 a few large ones,
//      TKV_CACHES=int2,mixed only those cache kinds)
// Exit code is non-zero on any failed check or CUDA error.

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// TKV_KERNEL picks another kernel file (run.sh builds the previous version for comparison).
#ifdef TKV_KERNEL
#include TKV_KERNEL
#else
#include "../../kernels/decode_attention.cu"
#endif

static void check(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess) {
    fprintf(stderr, "CUDA error %s at line %d: %s\n", cudaGetErrorString(e), line, what);
    exit(2);
  }
}
#define CK(x) check((x), #x, __LINE__)
#define CKL() check(cudaGetLastError(), "launch", __LINE__)

static const int D = 128;
static const int NC = tkv::NUM_CLASSES;  // F16, INT4, INT2, FP8

// ---- Layout (mirror of src/quant/layout.rs for head_dim 128) -------------------------------
struct Geom {
  int cls, tokens, vg;
  int k_bytes, v_bytes, ks, kz, vs, vz, slab;
};
static int align16(int x) { return (x + 15) / 16 * 16; }
static int class_bits(int cls) {
  return cls == tkv::CLASS_F16 ? 16 : cls == tkv::CLASS_INT4 ? 4 : cls == tkv::CLASS_FP8 ? 8 : 2;
}
static bool is_int(int cls) { return cls == tkv::CLASS_INT4 || cls == tkv::CLASS_INT2; }
// E4M3 code -> value (NaN codes 0x7f / 0xff never occur in a valid block).
static float e4m3(uint8_t c) {
  int e = (c >> 3) & 15, m = c & 7;
  float mag = e == 0 ? m / 8.f * ldexpf(1.f, -6) : (1.f + m / 8.f) * ldexpf(1.f, e - 7);
  if (e == 15 && m == 7) mag = NAN;
  return (c & 0x80) ? -mag : mag;
}
static Geom make_geom(int cls, int tokens, int vg) {
  Geom g{};
  g.cls = cls;
  g.tokens = tokens;
  g.vg = vg;
  g.k_bytes = tokens * D * class_bits(cls) / 8;
  g.v_bytes = g.k_bytes;
  if (cls == tkv::CLASS_F16) {
    g.slab = g.k_bytes + g.v_bytes;
    return g;
  }
  if (cls == tkv::CLASS_FP8) {  // K scale f32, V scale f32, padded to 16
    g.ks = g.kz = g.vs = g.vz = align16(g.k_bytes + g.v_bytes);
    g.slab = g.ks + 16;
    return g;
  }
  int ng = D / vg;
  g.ks = align16(g.k_bytes + g.v_bytes);
  g.kz = g.ks + 2 * D;
  g.vs = align16(g.kz + 2 * D);
  g.vz = align16(g.vs + 2 * tokens * ng);
  g.slab = align16(g.vz + 2 * tokens * ng);
  return g;
}
static int lwo(int lane, int j, int nw) {
  int r = std::min(nw, 4);
  return (j / r) * 128 * r + lane * 4 * r + (j % r) * 4;
}
// Byte offset and shift of K code (tok, d) / V code (tok, d) inside the slab.
static void k_pos(const Geom& g, int tok, int d, int& off, int& shift) {
  int c = d / 16, w = d % 16, t = (w % 8) / 2, b = w / 8, hi = w % 2;
  if (g.cls == tkv::CLASS_F16) {
    off = (tok / 8) * 2048 + lwo(4 * (tok % 8) + t, 2 * c + b, 16) + 2 * hi;
    shift = 0;
  } else if (g.cls == tkv::CLASS_FP8) {
    int rr = tok % 16, gg = rr % 8, second = rr / 8;
    off = (tok / 16) * 2048 + lwo(4 * gg + t, second * 8 + c, 16) + 2 * b + hi;
    shift = 0;
  } else if (g.cls == tkv::CLASS_INT4) {
    int nib = (c % 2) * 2 + b + 4 * hi;
    off = (tok / 8) * 512 + lwo(4 * (tok % 8) + t, c / 2, 4) + nib / 2;
    shift = 4 * (nib % 2);
  } else {
    int rr = tok % 16, gg = rr % 8, second = rr / 8, crumb = (c % 4) * 2 + b + 8 * hi;
    off = (tok / 16) * 512 + lwo(4 * gg + t, second * 2 + c / 4, 4) + crumb / 4;
    shift = 2 * (crumb % 4);
  }
}
static void v_pos(const Geom& g, int tok, int d, int& off, int& shift) {
  int m = d / 16, w = d % 16, gg = w % 8, row_hi = w / 8;
  int rr = tok % 16, t = (rr % 8) / 2, hi = rr % 2, tok_hi = rr / 8;
  int a = row_hi + 2 * tok_hi, lane = 4 * gg + t, tile = tok / 16;
  if (g.cls == tkv::CLASS_F16) {
    off = g.k_bytes + tile * 4096 + lwo(lane, 4 * m + a, 32) + 2 * hi;
    shift = 0;
  } else if (g.cls == tkv::CLASS_FP8) {
    off = g.k_bytes + tile * 2048 + lwo(lane, 2 * m + a / 2, 16) + 2 * (a % 2) + hi;
    shift = 0;
  } else if (g.cls == tkv::CLASS_INT4) {
    int nib = a + 4 * hi;
    off = g.k_bytes + tile * 1024 + lwo(lane, m, 8) + nib / 2;
    shift = 4 * (nib % 2);
  } else {
    int crumb = (m % 2) * 4 + a + 8 * hi;
    off = g.k_bytes + tile * 512 + lwo(lane, m / 2, 4) + crumb / 4;
    shift = 2 * (crumb % 4);
  }
}
static float h2f(const uint8_t* p) {
  __half h;
  memcpy(&h, p, 2);
  return __half2float(h);
}
// Dequantize one slab's first n tokens into K, V [n][D].
static void dequant_slab(const Geom& g, const uint8_t* s, int n, std::vector<float>& K,
                         std::vector<float>& V) {
  int ng = D / g.vg;
  for (int r = 0; r < n; r++)
    for (int d = 0; d < D; d++) {
      int ko, kshift, vo, vshift;
      k_pos(g, r, d, ko, kshift);
      v_pos(g, r, d, vo, vshift);
      float k, v;
      if (g.cls == tkv::CLASS_F16) {
        k = h2f(s + ko);
        v = h2f(s + vo);
      } else if (g.cls == tkv::CLASS_FP8) {
        float sk, sv;
        memcpy(&sk, s + g.ks, 4);
        memcpy(&sv, s + g.ks + 4, 4);
        k = e4m3(s[ko]) * sk;
        v = e4m3(s[vo]) * sv;
      } else {
        int mask = (1 << class_bits(g.cls)) - 1;
        int kc = (s[ko] >> kshift) & mask, vc = (s[vo] >> vshift) & mask;
        k = kc * h2f(s + g.ks + 2 * d) + h2f(s + g.kz + 2 * d);
        int slot = (r / 2) * 2 * ng + 2 * (d / g.vg) + r % 2;
        v = vc * h2f(s + g.vs + 2 * slot) + h2f(s + g.vz + 2 * slot);
      }
      K.push_back(k);
      V.push_back(v);
    }
}

// ---- A cache description shared by all modes ---------------------------------------------
struct Entry {
  int seq, slot, ntok;
};
struct Cache {
  int seqs, q_heads, kv_heads, slab, vg;
  Geom geom[NC];
  std::vector<Entry> entries[NC];  // sorted by seq
  long long slots;
};

struct DeviceRun {
  tkv::DecodeParams p;
  std::vector<int4> work;  // grouped by class: [work_base[c], work_base[c + 1])
  int work_base[NC + 1] = {};
  std::vector<int> seq_begin, work_index;
  int4* d_work = nullptr;
  int *d_seq_begin = nullptr, *d_work_index = nullptr;
  int* d_slot[NC] = {};
  int* d_ntok[NC] = {};
  float *d_part_o = nullptr, *d_part_lse = nullptr, *d_out = nullptr;
  long long bytes_read = 0;
};

// Split each sequence's entries of each class into work items of at most `bpw` blocks.
static void build_run(DeviceRun& r, const Cache& c, const uint8_t* d_pool, const __half* d_q,
                      int bpw) {
  r.work.clear();
  for (int cls = 0; cls < NC; cls++) {
    r.work_base[cls] = (int)r.work.size();
    const auto& es = c.entries[cls];
    for (int s = 0; s < c.seqs; s++) {
      int i = 0;
      while (i < (int)es.size() && es[i].seq < s) i++;
      int j = i;
      while (j < (int)es.size() && es[j].seq == s) j++;
      for (int b = i; b < j; b += bpw) r.work.push_back(make_int4(s, cls, b, std::min(j, b + bpw)));
    }
  }
  r.work_base[NC] = (int)r.work.size();
  r.seq_begin.assign(1, 0);
  r.work_index.clear();
  for (int s = 0; s < c.seqs; s++) {
    for (int w = 0; w < (int)r.work.size(); w++)
      if (r.work[w].x == s) r.work_index.push_back(w);
    r.seq_begin.push_back((int)r.work_index.size());
  }
  r.bytes_read = 0;
  for (int cls = 0; cls < NC; cls++)
    for (auto& e : c.entries[cls]) {
      const Geom& g = c.geom[cls];
      // Bytes the kernel touches: whole 16-token tiles of codes plus all scales.
      long long tiles = (e.ntok + 15) / 16;
      long long b = tiles * 16 * (g.k_bytes + g.v_bytes) / g.tokens;
      if (cls != tkv::CLASS_F16) b += g.slab - g.ks;
      r.bytes_read += b * c.kv_heads;
    }
  CK(cudaMalloc(&r.d_work, r.work.size() * sizeof(int4)));
  CK(cudaMemcpy(r.d_work, r.work.data(), r.work.size() * sizeof(int4), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&r.d_seq_begin, r.seq_begin.size() * sizeof(int)));
  CK(cudaMemcpy(r.d_seq_begin, r.seq_begin.data(), r.seq_begin.size() * sizeof(int),
                cudaMemcpyHostToDevice));
  CK(cudaMalloc(&r.d_work_index, std::max<size_t>(1, r.work_index.size()) * sizeof(int)));
  CK(cudaMemcpy(r.d_work_index, r.work_index.data(), r.work_index.size() * sizeof(int),
                cudaMemcpyHostToDevice));
  memset(&r.p, 0, sizeof(r.p));
  for (int cls = 0; cls < NC; cls++) {
    std::vector<int> slot, ntok;
    for (auto& e : c.entries[cls]) {
      slot.push_back(e.slot);
      ntok.push_back(e.ntok);
    }
    size_t n = std::max<size_t>(1, slot.size());
    CK(cudaMalloc(&r.d_slot[cls], n * sizeof(int)));
    CK(cudaMalloc(&r.d_ntok[cls], n * sizeof(int)));
    if (!slot.empty()) {
      CK(cudaMemcpy(r.d_slot[cls], slot.data(), slot.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(r.d_ntok[cls], ntok.data(), ntok.size() * 4, cudaMemcpyHostToDevice));
    }
    const Geom& g = c.geom[cls];
    tkv::ClassInfo& ci = r.p.cls[cls];
    ci.slot = r.d_slot[cls];
    ci.ntok = r.d_ntok[cls];
    ci.tokens = g.tokens;
    ci.v_off = g.k_bytes;
    ci.ks_off = g.ks;
    ci.kz_off = g.kz;
    ci.vs_off = g.vs;
    ci.vz_off = g.vz;
  }
  size_t rows = r.work.size() * c.q_heads;
  CK(cudaMalloc(&r.d_part_o, rows * D * sizeof(float)));
  CK(cudaMalloc(&r.d_part_lse, rows * sizeof(float)));
  CK(cudaMalloc(&r.d_out, (size_t)c.seqs * c.q_heads * D * sizeof(float)));
  r.p.pool = d_pool;
  r.p.slab_bytes = c.slab;
  r.p.kv_heads = c.kv_heads;
  r.p.q_heads = c.q_heads;
  r.p.gqa = c.q_heads / c.kv_heads;
  r.p.q = d_q;
  r.p.work = r.d_work;
  r.p.part_o = r.d_part_o;
  r.p.part_lse = r.d_part_lse;
}
static void free_run(DeviceRun& r) {
  cudaFree(r.d_work);
  cudaFree(r.d_seq_begin);
  cudaFree(r.d_work_index);
  for (int i = 0; i < NC; i++) {
    cudaFree(r.d_slot[i]);
    cudaFree(r.d_ntok[i]);
  }
  cudaFree(r.d_part_o);
  cudaFree(r.d_part_lse);
  cudaFree(r.d_out);
}
typedef void (*DecodeFn)(const tkv::DecodeParams, int);
static DecodeFn decode_fn(int cls, int vg) {
  static const DecodeFn fns[3][NC] = {
      {tkv_decode_f16_vg32, tkv_decode_int4_vg32, tkv_decode_int2_vg32, tkv_decode_fp8_vg32},
      {tkv_decode_f16_vg64, tkv_decode_int4_vg64, tkv_decode_int2_vg64, tkv_decode_fp8_vg64},
      {tkv_decode_f16_vg128, tkv_decode_int4_vg128, tkv_decode_int2_vg128, tkv_decode_fp8_vg128}};
  return fns[vg == 32 ? 0 : vg == 64 ? 1 : 2][cls];
}

// All work is issued on g_main (a non-default stream, so it can be captured into a graph).
static cudaStream_t g_main;
// One decode launch per class present (each on its own stream so small classes overlap the
// large ones), then the merge on g_main.
static cudaStream_t g_streams[NC];
static cudaEvent_t g_fork, g_join[NC];
static void init_streams() {
  if (g_main) return;
  CK(cudaStreamCreateWithFlags(&g_main, cudaStreamNonBlocking));
  for (int i = 0; i < NC; i++) {
    CK(cudaStreamCreateWithFlags(&g_streams[i], cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&g_join[i], cudaEventDisableTiming));
  }
  CK(cudaEventCreateWithFlags(&g_fork, cudaEventDisableTiming));
}
static void launch(DeviceRun& r, const Cache& c, float sm_scale) {
  init_streams();
  r.p.scale_log2 = sm_scale * 1.4426950408889634f;
  int present = 0;
  for (int cls = 0; cls < NC; cls++) present += r.work_base[cls + 1] > r.work_base[cls];
  // One class: launch it on g_main, no fork/join. Several: each on its own stream.
  const bool fork = present > 1;
  if (fork) CK(cudaEventRecord(g_fork, g_main));
  for (int cls = 0; cls < NC; cls++) {
    int n = r.work_base[cls + 1] - r.work_base[cls];
    if (n == 0) continue;
    cudaStream_t st = fork ? g_streams[cls] : g_main;
    if (fork) CK(cudaStreamWaitEvent(st, g_fork, 0));
    int base = r.work_base[cls];
    void* args[] = {&r.p, &base};
    CK(cudaLaunchKernel((const void*)decode_fn(cls, c.vg), dim3(n, c.kv_heads),
                        dim3(tkv::NWARPS * 32), args, 0, st));
    if (fork) {
      CK(cudaEventRecord(g_join[cls], st));
      CK(cudaStreamWaitEvent(g_main, g_join[cls], 0));
    }
  }
  tkv_merge_partials<<<dim3(c.seqs, c.q_heads), D, 0, g_main>>>(
      r.d_part_o, r.d_part_lse, r.d_seq_begin, r.d_work_index, c.q_heads, r.d_out);
  CKL();
}
// The same launches captured once into a CUDA graph (one cudaGraphLaunch per decode call).
static cudaGraphExec_t capture(DeviceRun& r, const Cache& c, float sm_scale) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  init_streams();
  CK(cudaStreamBeginCapture(g_main, cudaStreamCaptureModeThreadLocal));
  launch(r, c, sm_scale);
  CK(cudaStreamEndCapture(g_main, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  CK(cudaGraphDestroy(graph));
  return exec;
}

// f64 reference over the host copy of the pool; q is the fp16-rounded query.
static std::vector<float> cpu_reference(const Cache& c, const std::vector<uint8_t>& pool,
                                        const std::vector<float>& q, float sm_scale) {
  int gqa = c.q_heads / c.kv_heads;
  std::vector<float> out((size_t)c.seqs * c.q_heads * D);
  for (int s = 0; s < c.seqs; s++)
    for (int kh = 0; kh < c.kv_heads; kh++) {
      std::vector<float> K, V;
      for (int cls = 0; cls < NC; cls++)
        for (auto& e : c.entries[cls])
          if (e.seq == s)
            dequant_slab(c.geom[cls], &pool[((size_t)e.slot * c.kv_heads + kh) * c.slab], e.ntok,
                         K, V);
      size_t n = K.size() / D;
      for (int h = kh * gqa; h < (kh + 1) * gqa; h++) {
        const float* qh = &q[((size_t)s * c.q_heads + h) * D];
        std::vector<double> sc(n);
        double m = -1e300;
        for (size_t t = 0; t < n; t++) {
          double a = 0;
          for (int d = 0; d < D; d++) a += (double)qh[d] * K[t * D + d];
          sc[t] = a * sm_scale;
          m = std::max(m, sc[t]);
        }
        std::vector<double> acc(D, 0.0);
        double l = 0;
        for (size_t t = 0; t < n; t++) {
          double p = std::exp(sc[t] - m);
          l += p;
          for (int d = 0; d < D; d++) acc[d] += p * V[t * D + d];
        }
        for (int d = 0; d < D; d++) out[((size_t)s * c.q_heads + h) * D + d] = (float)(acc[d] / l);
      }
    }
  return out;
}

// max |gpu - ref| / max |ref|; any non-finite output fails.
static double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); i++) {
    if (!std::isfinite(a[i])) return 1e30;
    num = std::max(num, (double)std::fabs(a[i] - b[i]));
    den = std::max(den, (double)std::fabs(b[i]));
  }
  return num / std::max(den, 1e-30);
}

static const double TOL = 2e-3;

// Run the kernel on a host-side cache, poisoning the output first; returns the output.
static std::vector<float> run_on(const Cache& c, const std::vector<uint8_t>& pool,
                                 const std::vector<float>& q32, float sm_scale, int bpw) {
  uint8_t* d_pool;
  __half* d_q;
  CK(cudaMalloc(&d_pool, pool.size()));
  CK(cudaMemcpy(d_pool, pool.data(), pool.size(), cudaMemcpyHostToDevice));
  std::vector<__half> qh(q32.size());
  for (size_t i = 0; i < q32.size(); i++) qh[i] = __float2half(q32[i]);
  CK(cudaMalloc(&d_q, qh.size() * 2));
  CK(cudaMemcpy(d_q, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice));
  DeviceRun r;
  build_run(r, c, d_pool, d_q, bpw);
  size_t n = (size_t)c.seqs * c.q_heads * D;
  CK(cudaMemset(r.d_out, 0xff, n * 4));  // NaN poison: every element must be written
  CK(cudaDeviceSynchronize());  // g_main does not order against the legacy stream
  if (getenv("TKV_GRAPH")) {
    cudaGraphExec_t g = capture(r, c, sm_scale);
    CK(cudaGraphLaunch(g, g_main));
    CK(cudaStreamSynchronize(g_main));
    CK(cudaGraphExecDestroy(g));
  } else {
    launch(r, c, sm_scale);
  }
  CK(cudaDeviceSynchronize());
  std::vector<float> out(n);
  CK(cudaMemcpy(out.data(), r.d_out, n * 4, cudaMemcpyDeviceToHost));
  free_run(r);
  cudaFree(d_pool);
  cudaFree(d_q);
  return out;
}

// ---- golden ------------------------------------------------------------------------------
static int mode_golden(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "%s: cannot open\n", path);
    return 1;
  }
  std::vector<uint8_t> buf;
  uint8_t tmp[65536];
  size_t got;
  while ((got = fread(tmp, 1, sizeof tmp, f)) > 0) buf.insert(buf.end(), tmp, tmp + got);
  fclose(f);
  size_t at = 0;
  auto u32 = [&]() {
    uint32_t v;
    memcpy(&v, &buf[at], 4);
    at += 4;
    return (int)v;
  };
  if (buf.size() < 40 || memcmp(buf.data(), "TKVG", 4) != 0) {
    fprintf(stderr, "%s: not a TKVG fixture\n", path);
    return 1;
  }
  at = 4;
  int version = u32(), hd = u32();
  Cache c{};
  c.q_heads = u32();
  c.kv_heads = u32();
  c.seqs = u32();
  c.slab = u32();
  c.slots = u32();
  float sm_scale;
  memcpy(&sm_scale, &buf[at], 4);
  at += 4;
  if (version != 2 || hd != D) {
    fprintf(stderr, "%s: version %d head_dim %d unsupported\n", path, version, hd);
    return 1;
  }
  for (int cls = 0; cls < NC; cls++) {
    int tokens = u32(), vg = u32(), n = u32();
    c.geom[cls] = make_geom(cls, tokens, vg);
    if (is_int(cls)) c.vg = vg;
    for (int i = 0; i < n; i++) {
      Entry e;
      e.seq = u32();
      e.slot = u32();
      e.ntok = u32();
      c.entries[cls].push_back(e);
    }
  }
  int max_slab = 0;
  for (auto& g : c.geom) max_slab = std::max(max_slab, g.slab);
  if (max_slab != c.slab) {
    fprintf(stderr, "golden: slab %d but harness layout says %d\n", c.slab, max_slab);
    return 1;
  }
  size_t pool_bytes = (size_t)c.slots * c.kv_heads * c.slab;
  std::vector<uint8_t> pool(buf.begin() + at, buf.begin() + at + pool_bytes);
  at += pool_bytes;
  size_t nq = (size_t)c.seqs * c.q_heads * D;
  std::vector<float> q(nq), expected(nq);
  memcpy(q.data(), &buf[at], nq * 4);
  memcpy(expected.data(), &buf[at + nq * 4], nq * 4);
  // The harness's own decoder must agree with the Rust reference first.
  double e_cpu = rel_err(cpu_reference(c, pool, q, sm_scale), expected);
  int fails = 0;
  printf("golden: harness CPU decode vs Rust reference  rel_err %.2e  %s\n", e_cpu,
         e_cpu < 1e-5 ? "ok" : "FAIL");
  fails += e_cpu >= 1e-5;
  for (int bpw : {1, 2, 7}) {
    double e = rel_err(run_on(c, pool, q, sm_scale, bpw), expected);
    printf("golden: kernel (blocks/work %d) vs Rust reference  rel_err %.2e  %s\n", bpw, e,
           e < TOL ? "ok" : "FAIL");
    fails += e >= TOL;
  }
  return fails ? 1 : 0;
}

// ---- random ------------------------------------------------------------------------------
static uint64_t rng_state = 0x1234567;
static uint32_t rnd() {
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (uint32_t)(rng_state >> 33);
}
static float rndf(float lo, float hi) { return lo + (hi - lo) * (rnd() / 2147483648.0f); }
static void put_half(uint8_t* p, float x) {
  __half h = __float2half(x);
  memcpy(p, &h, 2);
}

// Fill one slab with random codes and sane scales; slots past ntok are zero (layout rule).
static void random_slab(const Geom& g, uint8_t* s, int ntok) {
  int ng = D / g.vg;
  memset(s, 0, g.slab);
  for (int r = 0; r < ntok; r++)
    for (int d = 0; d < D; d++) {
      int ko, ks, vo, vs;
      k_pos(g, r, d, ko, ks);
      v_pos(g, r, d, vo, vs);
      if (g.cls == tkv::CLASS_F16) {
        put_half(s + ko, rndf(-2, 2) + (d == 5 ? 4.f : 0.f));
        put_half(s + vo, rndf(-1, 1));
      } else if (g.cls == tkv::CLASS_FP8) {
        // Any finite code (bit 3 clear avoids the NaN codes 0x7f / 0xff); channel 5 large.
        s[ko] = (uint8_t)(rnd() & 0xf7) | (d == 5 ? 0x70 : 0);
        s[vo] = (uint8_t)(rnd() & 0xf7);
      } else {
        int mask = (1 << class_bits(g.cls)) - 1;
        s[ko] |= (rnd() & mask) << ks;
        s[vo] |= (rnd() & mask) << vs;
      }
    }
  if (g.cls == tkv::CLASS_F16) return;
  if (g.cls == tkv::CLASS_FP8) {
    float sc[2] = {rndf(0.5f, 4.f) / 448.f, rndf(0.2f, 3.f) / 448.f};
    memcpy(s + g.ks, sc, 8);
    return;
  }
  float top = (float)((1 << class_bits(g.cls)) - 1);
  for (int d = 0; d < D; d++) {
    float lo = rndf(-2, 0), hi = lo + rndf(0.2f, 4);
    put_half(s + g.ks + 2 * d, (hi - lo) / top);
    put_half(s + g.kz + 2 * d, lo);
  }
  for (int r = 0; r < ntok; r++)
    for (int gi = 0; gi < ng; gi++) {
      int slot = (r / 2) * 2 * ng + 2 * gi + r % 2;
      float lo = rndf(-1.5f, 0), hi = lo + rndf(0.1f, 3);
      put_half(s + g.vs + 2 * slot, (hi - lo) / top);
      put_half(s + g.vz + 2 * slot, lo);
    }
}

// A cache with the given token counts per (seq, class); slots handed out in shuffled order.
static Cache make_cache(int q_heads, int kv_heads, int vg, const std::vector<std::array<int, NC>>& toks,
                        const int tokens_per_block[NC]) {
  Cache c{};
  c.seqs = (int)toks.size();
  c.q_heads = q_heads;
  c.kv_heads = kv_heads;
  c.vg = vg;
  c.slab = 0;
  for (int cls = 0; cls < NC; cls++) {
    c.geom[cls] = make_geom(cls, tokens_per_block[cls], vg);
    c.slab = std::max(c.slab, c.geom[cls].slab);
  }
  long long slot = 0;
  for (int s = 0; s < c.seqs; s++)
    for (int cls = 0; cls < NC; cls++)
      for (int left = toks[s][cls]; left > 0;) {
        int n = std::min(left, c.geom[cls].tokens);
        left -= n;
        c.entries[cls].push_back({s, (int)slot++, n});
      }
  c.slots = slot;
  return c;
}

static int mode_random() {
  struct Case {
    int q_heads, kv_heads, vg;
    std::vector<std::array<int, NC>> toks;  // F16, INT4, INT2, FP8 tokens per sequence
  };
  std::vector<Case> cases = {
      {32, 8, 64, {{4, 0, 0, 0}}},                           // sinks only
      {8, 2, 64, {{68, 300, 901, 77}, {5, 17, 0, 0}, {0, 0, 3, 0}}},  // odd lengths, GQA 4
      {12, 4, 32, {{16, 64, 128, 32}, {33, 1, 257, 1}}},     // GQA 3, value group 32
      {7, 1, 128, {{20, 130, 77, 0}}},                       // GQA 7, value group 128
      {8, 8, 64, {{64, 1000, 3000, 500}}},                   // MHA (GQA 1), longer
      {40, 5, 64, {{3, 65, 129, 33}, {64, 0, 0, 0}, {1, 1, 1, 1}}},  // GQA 8
      {16, 4, 64, {{0, 0, 0, 1000}, {0, 0, 0, 31}}},         // FP8 only
  };
  const int tpb[NC] = {16, 64, 128, 32};
  int fails = 0;
  for (size_t ci = 0; ci < cases.size(); ci++) {
    const Case& k = cases[ci];
    Cache c = make_cache(k.q_heads, k.kv_heads, k.vg, k.toks, tpb);
    std::vector<uint8_t> pool((size_t)c.slots * c.kv_heads * c.slab);
    // Shuffle the slot assignment so block tables are not the identity.
    std::vector<int> perm(c.slots);
    for (int i = 0; i < (int)c.slots; i++) perm[i] = i;
    for (int i = (int)c.slots - 1; i > 0; i--) std::swap(perm[i], perm[rnd() % (i + 1)]);
    for (int cls = 0; cls < NC; cls++)
      for (auto& e : c.entries[cls]) {
        e.slot = perm[e.slot];
        for (int h = 0; h < c.kv_heads; h++)
          random_slab(c.geom[cls], &pool[((size_t)e.slot * c.kv_heads + h) * c.slab], e.ntok);
      }
    std::vector<float> q((size_t)c.seqs * c.q_heads * D);
    for (auto& x : q) x = __half2float(__float2half(rndf(-2, 2)));
    float sm_scale = 1.0f / std::sqrt((float)D);
    std::vector<float> ref = cpu_reference(c, pool, q, sm_scale);
    for (int bpw : {1, 3, 9}) {  // 9: whole blocks per warp; 1, 3: tile groups interleaved
      double e = rel_err(run_on(c, pool, q, sm_scale, bpw), ref);
      printf("random case %zu (q %d kv %d vg %d seqs %d, blocks/work %d): rel_err %.2e  %s\n", ci,
             k.q_heads, k.kv_heads, k.vg, c.seqs, bpw, e, e < TOL ? "ok" : "FAIL");
      fails += e >= TOL;
    }
  }
  return fails ? 1 : 0;
}

// ---- bench -------------------------------------------------------------------------------
__global__ void init_pool(uint8_t* pool, long long n_slabs, int slab, int ks_off, int is_f16,
                          unsigned seed, int is_fp8) {
  long long words = n_slabs * slab / 4;
  uint32_t* w = reinterpret_cast<uint32_t*>(pool);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words;
       i += (long long)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)(i * 2654435761u) ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    int off = (int)((i * 4) % slab);
    if (is_fp8) {
      // Codes: bit 3 clear (no NaN codes); scales: K 1/448, V 0.5/448.
      x = off < ks_off ? (x & 0xf7f7f7f7u) : __float_as_uint(off == ks_off ? 1.f / 448 : 0.5f / 448);
    } else if (is_f16 || off >= ks_off) {
      // Two finite halves in [-1, 1) / small positive scales: keep every value sane.
      float a = ((x & 0xffff) / 65536.f) * 2.f - 1.f, b = ((x >> 16) / 65536.f) * 2.f - 1.f;
      if (!is_f16) {
        a = 0.01f + 0.2f * fabsf(a);
        b = -fabsf(b);
      }
      __half2 h = __floats2half2_rn(a, b);
      x = *reinterpret_cast<uint32_t*>(&h);
    }
    w[i] = x;
  }
}

__global__ void read_kernel(const uint4* p, long long n, unsigned* sink) {
  unsigned acc = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct BenchCfg {
  const char* name;
  double frac_int2, frac_int4;  // of the tokens outside sinks + window
  bool f16_only, sinks_window;
  bool fp8_only;
};

static int mode_bench(const char* json_path) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int sms = prop.multiProcessorCount;
  // L2 flush buffer, written between timed calls so no call starts with a warm L2.
  size_t flush_bytes = 256ull << 20;
  void* flush;
  CK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  // Bandwidth references measured in this run.
  size_t bw_bytes = 2ull << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bw_bytes));
  CK(cudaMalloc(&b, bw_bytes));
  CK(cudaMemset(a, 1, bw_bytes));
  unsigned* sink;
  CK(cudaMalloc(&sink, 4));
  std::vector<float> tc, tr;
  for (int i = 0; i < 10; i++) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpyAsync(b, a, bw_bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    tc.push_back(ms);
    CK(cudaEventRecord(e0));
    read_kernel<<<sms * 8, 512>>>((const uint4*)a, bw_bytes / 16, sink);
    CKL();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    tr.push_back(ms);
  }
  double copy_gbs = 2.0 * bw_bytes / (median(tc) * 1e-3) / 1e9;
  double read_gbs = 1.0 * bw_bytes / (median(tr) * 1e-3) / 1e9;
  cudaFree(a);
  cudaFree(b);
  printf("bandwidth: device copy %.0f GB/s (read+write), read-only kernel %.0f GB/s\n", copy_gbs,
         read_gbs);

  std::vector<BenchCfg> cfgs = {
      {"fp16", 0, 0, true, false, false},
      {"fp8", 0, 0, false, false, true},
      {"int4", 0, 1, false, false, false},
      {"int2", 1, 0, false, false, false},
      {"mixed", 0.75, 0.25, false, true, false},
  };
  const int tpb[NC] = {16, 64, 128, 32};
  const int q_heads = 32, kv_heads = 8;
  FILE* js = fopen(json_path, "w");
  if (!js) {
    fprintf(stderr, "%s: cannot write\n", json_path);
    return 1;
  }
  fprintf(js, "{\"device\": \"%s\", \"sms\": %d, \"copy_gbs\": %.1f, \"read_gbs\": %.1f, \"rows\": [\n",
          prop.name, sms, copy_gbs, read_gbs);
  bool first = true;
  printf("%-6s %5s %7s %9s %9s %8s %8s %6s %9s\n", "cache", "batch", "ctx", "us", "GB/s", "%read",
         "eff_bits", "works", "graph_us");
  // TKV_ONLY=cache:batch:ctx runs one shape (for ncu); TKV_QUICK=1 a few large ones.
  const char* only = getenv("TKV_ONLY");
  const bool quick = getenv("TKV_QUICK") != nullptr;
  for (int batch : {1, 8, 32})
    for (int ctx : {4096, 32768, 131072})
      for (const BenchCfg& cfg : cfgs) {
        char tag[64];
        snprintf(tag, sizeof tag, "%s:%d:%d", cfg.name, batch, ctx);
        if (only && strcmp(only, tag) != 0) continue;
        // TKV_CACHES=int2,mixed limits the cache kinds (comma list).
        if (const char* cs = getenv("TKV_CACHES")) {
          std::string list = std::string(",") + cs + ",";
          if (list.find(std::string(",") + cfg.name + ",") == std::string::npos) continue;
        }
        if (quick && (cfg.f16_only || ctx == 4096 || (batch == 1 && ctx == 32768) ||
                      (batch == 32 && ctx == 131072)))
          continue;
        std::vector<std::array<int, NC>> toks(batch);
        for (auto& t : toks) {
          if (cfg.f16_only) {
            t = {ctx, 0, 0, 0};
          } else if (cfg.fp8_only) {
            t = {0, 0, 0, ctx};
          } else {
            int f16 = cfg.sinks_window ? 4 + 64 : 0;
            int rest = ctx - f16;
            int i2 = (int)(rest * cfg.frac_int2) / 128 * 128;
            t = {f16, rest - i2, i2, 0};
            if (cfg.frac_int2 == 0) t = {f16, rest, 0, 0};
          }
        }
        // Sinks (4) and window (64) share 16-bit blocks of 16 tokens.
        Cache c = make_cache(q_heads, kv_heads, 64, toks, tpb);
        if (cfg.f16_only) c.slab = c.geom[tkv::CLASS_F16].slab;  // a 16-bit-only pool
        if (cfg.fp8_only) c.slab = c.geom[tkv::CLASS_FP8].slab;  // an FP8-only pool
        size_t pool_bytes = (size_t)c.slots * kv_heads * c.slab;
        uint8_t* d_pool;
        if (cudaMalloc(&d_pool, pool_bytes) != cudaSuccess) {
          cudaGetLastError();
          printf("%-6s %5d %7d  skipped: %.1f GB does not fit\n", cfg.name, batch, ctx,
                 pool_bytes / 1e9);
          continue;
        }
        // Slots were handed out seq-major; fill each run of same-class slots by its class so
        // scale areas hold sane values.
        for (int cls = 0; cls < NC; cls++)
          for (size_t i = 0; i < c.entries[cls].size();) {
            size_t j = i;
            while (j + 1 < c.entries[cls].size() &&
                   c.entries[cls][j + 1].slot == c.entries[cls][j].slot + 1)
              j++;
            long long s0 = c.entries[cls][i].slot, n = c.entries[cls][j].slot - s0 + 1;
            const Geom& g = c.geom[cls];
            init_pool<<<sms * 8, 256>>>(d_pool + s0 * kv_heads * c.slab, n * kv_heads, c.slab,
                                        cls == tkv::CLASS_F16 ? c.slab : g.ks,
                                        cls == tkv::CLASS_F16, 77u + cls, cls == tkv::CLASS_FP8);
            CKL();
            i = j + 1;
          }
        std::vector<__half> qh((size_t)batch * q_heads * D);
        for (auto& x : qh) x = __float2half(rndf(-2, 2));
        __half* d_q;
        CK(cudaMalloc(&d_q, qh.size() * 2));
        CK(cudaMemcpy(d_q, qh.data(), qh.size() * 2, cudaMemcpyHostToDevice));
        long long total_blocks = 0;
        for (auto& es : c.entries) total_blocks += (long long)es.size();
        long long bpw = std::max(1LL, std::min(16LL, total_blocks * kv_heads / (sms * 4LL)));
        DeviceRun r;
        build_run(r, c, d_pool, d_q, (int)bpw);
        float sm_scale = 1.0f / std::sqrt((float)D);
        CK(cudaDeviceSynchronize());  // init_pool ran on the legacy stream
        for (int i = 0; i < 3; i++) launch(r, c, sm_scale);
        CK(cudaDeviceSynchronize());
        std::vector<float> ts;
        for (int i = 0; i < 25; i++) {
          CK(cudaMemsetAsync(flush, i, flush_bytes, g_main));
          CK(cudaEventRecord(e0, g_main));
          launch(r, c, sm_scale);
          CK(cudaEventRecord(e1, g_main));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          ts.push_back(ms);
        }
        // The same call as one CUDA graph launch (per-class launches + merge captured once).
        cudaGraphExec_t gexec = capture(r, c, sm_scale);
        for (int i = 0; i < 3; i++) CK(cudaGraphLaunch(gexec, g_main));
        CK(cudaStreamSynchronize(g_main));
        std::vector<float> tg;
        for (int i = 0; i < 25; i++) {
          CK(cudaMemsetAsync(flush, i, flush_bytes, g_main));
          CK(cudaEventRecord(e0, g_main));
          CK(cudaGraphLaunch(gexec, g_main));
          CK(cudaEventRecord(e1, g_main));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          tg.push_back(ms);
        }
        CK(cudaGraphExecDestroy(gexec));
        double graph_us = median(tg) * 1e3;
        std::vector<float> out((size_t)batch * q_heads * D);
        CK(cudaMemcpy(out.data(), r.d_out, out.size() * 4, cudaMemcpyDeviceToHost));
        bool finite = std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); });
        double us = median(ts) * 1e3;
        double gbs = r.bytes_read / (us * 1e-6) / 1e9;
        double eff_bits = 8.0 * r.bytes_read / ((double)batch * ctx * kv_heads * D * 2);
        printf("%-6s %5d %7d %9.1f %9.0f %7.1f%% %8.2f %6zu %9.1f%s\n", cfg.name, batch, ctx, us,
               gbs, 100 * gbs / read_gbs, eff_bits, r.work.size(), graph_us,
               finite ? "" : "  NON-FINITE OUTPUT");
        fprintf(js,
                "%s  {\"cache\": \"%s\", \"batch\": %d, \"context\": %d, \"us\": %.2f, \"bytes\": %lld, "
                "\"gbs\": %.1f, \"frac_read_bw\": %.3f, \"effective_bits\": %.3f, \"works\": %zu, "
                "\"blocks_per_work\": %lld, \"graph_us\": %.2f, \"finite\": %s}",
                first ? "" : ",\n", cfg.name, batch, ctx, us, r.bytes_read, gbs, gbs / read_gbs,
                eff_bits, r.work.size(), bpw, graph_us, finite ? "true" : "false");
        first = false;
        free_run(r);
        cudaFree(d_q);
        cudaFree(d_pool);
      }
  fprintf(js, "\n]}\n");
  fclose(js);
  return 0;
}

int main(int argc, char** argv) {
  if (argc >= 3 && !strcmp(argv[1], "golden")) return mode_golden(argv[2]);
  if (argc >= 2 && !strcmp(argv[1], "random")) return mode_random();
  if (argc >= 3 && !strcmp(argv[1], "bench")) return mode_bench(argv[2]);
  fprintf(stderr, "usage: %s golden FIXTURE | random | bench OUT.json\n", argv[0]);
  return 2;
}
