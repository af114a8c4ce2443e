//! GPU decode attention against the CPU reference (`quant::reference_attention`, f64 over the
//! dequantized blocks), on blocks packed by `quant::layout`. Without a CUDA driver the GPU
//! tests print `SKIPPED` and pass, unless `TRIAXKV_REQUIRE_GPU=1` (set by
//! `scripts/gpu-check.sh`, so a device run can never skip silently).
//!
//! Tolerance: max |O_gpu - O_ref| / max |O_ref| < 2e-3 over the whole output. The kernel
//! rounds q, the folded q·s_k and P·s_v to fp16 (relative step 2^-11 ≈ 4.9e-4) and
//! accumulates in fp32; the nvcc harness measured 2.5e-4 – 6.6e-4 on the same layouts.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use triaxkv::gpu::decode_attention::{decode_host, HEAD_DIM};
use triaxkv::gpu::{
    driver_available, DecodeAttention, GpuContext, HostCache, PagedLayout, QuantizeAppend,
    QuantizeJob,
};
use triaxkv::quant::layout::{e4m3_decode, e4m3_encode, BlockGeometry, KvClass, QuantizedBlock};
use triaxkv::quant::reference_attention;

const TOL: f64 = 2e-3;

/// Printed past libtest's output capture (which takes `eprintln!` only), so a skip is visible
/// in a plain `cargo test`.
fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

fn gpu_or_skip(test: &str) -> Option<GpuContext> {
    let required = std::env::var("TRIAXKV_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if !driver_available() && !required {
        skip(test, "no CUDA driver on this machine");
        return None;
    }
    match GpuContext::open(0) {
        Ok(g) => Some(g),
        Err(e) if !required => {
            // A driver library without a usable device (a container without the GPU).
            skip(test, &e.to_string());
            None
        }
        Err(e) => panic!("{test}: TRIAXKV_REQUIRE_GPU=1 but the device did not open: {e}"),
    }
}

/// max |a - b| / max |b|; any non-finite value of `a` fails.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num = num.max((*x as f64 - *y as f64).abs());
        den = den.max((*y as f64).abs());
    }
    num / den.max(1e-30)
}

/// A random cache: `toks[seq]` tokens per class (F16, INT4, INT2, FP8) quantized by the real
/// quantizer, slots shuffled; returns it with every sequence's blocks per KV head.
struct Case {
    host: HostCache,
    /// blocks[seq][kv_head] = that sequence's blocks of that head, all classes.
    blocks: Vec<Vec<Vec<QuantizedBlock>>>,
}

fn make_case(
    q_heads: usize,
    kv_heads: usize,
    (v_group, k_group): (usize, usize),
    toks: &[[usize; 4]],
    rng: &mut StdRng,
) -> Case {
    let layout = PagedLayout::new(q_heads, kv_heads, toks.len(), v_group)
        .unwrap()
        .with_k_group(k_group)
        .unwrap();
    let mut plan: Vec<(usize, KvClass, usize)> = Vec::new();
    for (seq, t) in toks.iter().enumerate() {
        for (i, c) in KvClass::ALL.iter().enumerate() {
            let cap = layout.geom(*c).tokens;
            let mut left = t[i];
            while left > 0 {
                let n = left.min(cap);
                plan.push((seq, *c, n));
                left -= n;
            }
        }
    }
    let mut slots: Vec<usize> = (0..plan.len()).collect();
    slots.shuffle(rng);
    let mut host = HostCache::new(layout, plan.len());
    let mut blocks = vec![vec![Vec::new(); kv_heads]; toks.len()];
    let d = HEAD_DIM;
    for (i, &(seq, c, n)) in plan.iter().enumerate() {
        let g: BlockGeometry = *host.layout.geom(c);
        let mut heads = Vec::with_capacity(kv_heads);
        for (h, head_blocks) in blocks[seq].iter_mut().enumerate() {
            let mut k: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..n * d)
                .map(|_| rng.random_range(-1.0..1.0f32) * (1.0 + h as f32))
                .collect();
            for r in 0..n {
                k[r * d + 5] += 4.0; // outlier key channel
            }
            let b = QuantizedBlock::quantize(g, &k, &v).unwrap();
            head_blocks.push(b.clone());
            heads.push(b);
        }
        host.put(seq, slots[i], &heads).unwrap();
    }
    Case { host, blocks }
}

fn reference(case: &Case, q: &[f32], sm_scale: f32) -> Vec<f32> {
    let l = &case.host.layout;
    let gqa = l.gqa();
    let mut out = Vec::with_capacity(q.len());
    for (seq, heads) in case.blocks.iter().enumerate() {
        for (h, bs) in heads.iter().enumerate() {
            let refs: Vec<&QuantizedBlock> = bs.iter().collect();
            let at = (seq * l.q_heads + h * gqa) * HEAD_DIM;
            out.extend(
                reference_attention(&q[at..at + gqa * HEAD_DIM], gqa, &refs, sm_scale).unwrap(),
            );
        }
    }
    out
}

#[test]
fn decode_attention_matches_cpu_reference_on_random_caches() {
    let Some(gpu) = gpu_or_skip("decode_attention_matches_cpu_reference_on_random_caches") else {
        return;
    };
    type Shape = (usize, usize, usize, Vec<[usize; 4]>);
    let cases: Vec<(&str, Shape)> = vec![
        ("sinks only", (32, 8, 64, vec![[4, 0, 0, 0]])),
        (
            "odd lengths, all classes, GQA 4",
            (
                8,
                2,
                64,
                vec![[68, 300, 901, 77], [5, 17, 0, 0], [0, 0, 3, 0]],
            ),
        ),
        (
            "GQA 3, value group 32",
            (12, 4, 32, vec![[16, 64, 128, 32], [33, 1, 257, 1]]),
        ),
        (
            "GQA 7, value group 128",
            (7, 1, 128, vec![[20, 130, 77, 0]]),
        ),
        ("MHA, long", (8, 8, 64, vec![[64, 1000, 3000, 500]])),
        (
            "GQA 8, 1-token blocks",
            (
                40,
                5,
                64,
                vec![[3, 65, 129, 33], [64, 0, 0, 0], [1, 1, 1, 1]],
            ),
        ),
        (
            "FP8 only",
            (16, 4, 64, vec![[0, 0, 0, 1000], [0, 0, 0, 31]]),
        ),
        ("F16 only", (32, 8, 64, vec![[333, 0, 0, 0]])),
        (
            "INT4 only",
            (32, 8, 64, vec![[0, 777, 0, 0], [0, 64, 0, 0]]),
        ),
        ("INT2 only", (32, 8, 64, vec![[0, 0, 1501, 0]])),
    ];
    // Key groups of 128 tokens (one per INT2 block) for all; of 64 for a few (two per INT2
    // block: the kernels fold the key scales twice per block).
    let kg64 = [
        "odd lengths, all classes, GQA 4",
        "GQA 7, value group 128",
        "GQA 8, 1-token blocks",
        "INT2 only",
    ];
    let cases: Vec<(String, Shape, usize)> = cases
        .iter()
        .map(|(n, c)| (n.to_string(), c.clone(), 128))
        .chain(
            cases
                .iter()
                .filter(|(n, _)| kg64.contains(n))
                .map(|(n, c)| (format!("{n}, key groups of 64"), c.clone(), 64)),
        )
        .collect();
    let mut rng = StdRng::seed_from_u64(0x6b76);
    let mut failures = Vec::new();
    for (name, (qh, kvh, vg, toks), kg) in cases {
        let case = make_case(qh, kvh, (vg, kg), &toks, &mut rng);
        let kernels = DecodeAttention::load(&gpu, vg).unwrap();
        let q: Vec<f32> = (0..toks.len() * qh * HEAD_DIM)
            .map(|_| half::f16::from_f32(rng.random_range(-2.0..2.0)).to_f32())
            .collect();
        let sm_scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let want = reference(&case, &q, sm_scale);
        // 9, 32: whole blocks per warp; 1, 3: short work items, tile groups interleaved.
        for bpw in [1, 3, 9, 32] {
            let got = decode_host(&gpu, &kernels, &case.host, &q, sm_scale, bpw).unwrap();
            let e = rel_err(&got, &want);
            eprintln!(
                "{name} (q {qh} kv {kvh} vg {vg} kg {kg}, blocks/work {bpw}): rel_err {e:.2e}"
            );
            if e >= TOL {
                failures.push(format!("{name} bpw {bpw}: {e:.2e}"));
            }
        }
    }
    assert!(failures.is_empty(), "over tolerance {TOL}: {failures:?}");
}

/// The committed golden fixture (`tests/fixtures/kv_golden/`, embedded so the test binary
/// runs anywhere): the packer's bytes and the f64 reference output it stores.
#[test]
fn decode_attention_matches_golden_fixture() {
    let Some(gpu) = gpu_or_skip("decode_attention_matches_golden_fixture") else {
        return;
    };
    let buf: &[u8] = include_bytes!("fixtures/kv_golden/decode_case1.bin");
    let mut at = 4;
    let mut u32_at = || {
        let v = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        v
    };
    assert_eq!(&buf[..4], b"TKVG");
    let (version, hd, q_heads, kv_heads, seqs, slab, slots) = (
        u32_at(),
        u32_at(),
        u32_at(),
        u32_at(),
        u32_at(),
        u32_at(),
        u32_at(),
    );
    assert_eq!((version, hd), (2, 128));
    let sm_scale = f32::from_bits(u32_at() as u32);
    let mut tables = Vec::new();
    let mut vg = 64;
    for c in KvClass::ALL {
        let (tokens, g, n) = (u32_at(), u32_at(), u32_at());
        assert_eq!(tokens, BlockGeometry::default_for(c, 128).unwrap().tokens);
        if matches!(c, KvClass::Int4 | KvClass::Int2) {
            vg = g;
        }
        let entries: Vec<(usize, usize, usize)> =
            (0..n).map(|_| (u32_at(), u32_at(), u32_at())).collect();
        tables.push((c, entries));
    }
    let mut layout = PagedLayout::new(q_heads, kv_heads, seqs, vg).unwrap();
    assert_eq!(layout.slab_bytes, slab);
    for (c, entries) in &tables {
        for &(seq, slot, n) in entries {
            layout.push(*c, seq, slot, n);
        }
    }
    layout.slots = slots;
    let pool_bytes = slots * kv_heads * slab;
    let pool = buf[at..at + pool_bytes].to_vec();
    at += pool_bytes;
    let nq = seqs * q_heads * HEAD_DIM;
    let floats = |from: usize| -> Vec<f32> {
        buf[from..from + 4 * nq]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let q = floats(at);
    let expected = floats(at + 4 * nq);
    let host = HostCache { layout, pool };
    let kernels = DecodeAttention::load(&gpu, vg).unwrap();
    for bpw in [1, 2, 7] {
        let got = decode_host(&gpu, &kernels, &host, &q, sm_scale, bpw).unwrap();
        let e = rel_err(&got, &expected);
        eprintln!("golden fixture, blocks/work {bpw}: rel_err {e:.2e}");
        assert!(
            e < TOL,
            "golden fixture, blocks/work {bpw}: rel_err {e:.2e}"
        );
    }
}

#[test]
fn open_without_driver_is_a_clear_error() {
    if driver_available() {
        skip(
            "open_without_driver_is_a_clear_error",
            "this machine has a driver",
        );
        return;
    }
    let e = GpuContext::open(0).unwrap_err().to_string();
    assert!(e.contains("no CUDA driver"), "{e}");
}

#[test]
fn compiled_kernels_report_no_spills() {
    let Some(gpu) = gpu_or_skip("compiled_kernels_report_no_spills") else {
        return;
    };
    let kernels = DecodeAttention::load(&gpu, 64).unwrap();
    for r in kernels.resources().unwrap() {
        eprintln!(
            "{}: {} registers, {} B local, {} B shared",
            r.kernel, r.registers, r.local_bytes, r.shared_bytes
        );
        assert_eq!(r.local_bytes, 0, "{} spills to local memory", r.kernel);
    }
}

/// NVRTC alone (no driver needed): both kernel files compile to sm_90 cubins and ptxas
/// reports no spills in the decode kernels. Skips without libnvrtc.
#[test]
fn nvrtc_compiles_the_kernels_for_sm90() {
    use triaxkv::gpu::nvrtc::{compile_cached, nvrtc_available, ptxas_registers};
    use triaxkv::gpu::{DECODE_ATTENTION, LAYER_OPS, MEMBENCH, PREFILL_ATTENTION, QUANTIZE_APPEND};
    if !nvrtc_available() {
        skip(
            "nvrtc_compiles_the_kernels_for_sm90",
            "no libnvrtc on this machine",
        );
        return;
    }
    for src in [
        DECODE_ATTENTION,
        MEMBENCH,
        QUANTIZE_APPEND,
        LAYER_OPS,
        PREFILL_ATTENTION,
    ] {
        let c = compile_cached(&src, "sm_90", &[], None).unwrap();
        assert!(
            c.cubin.starts_with(b"\x7fELF"),
            "{} is not a cubin",
            src.name
        );
        for (kernel, regs, spill) in ptxas_registers(&c.log) {
            eprintln!("{kernel}: {regs} registers, {spill} B spill stores");
            if kernel.starts_with("tkv_decode_")
                || kernel == "tkv_quantize_append"
                || kernel == "tkv_prefill_attention"
            {
                assert_eq!(spill, 0, "{kernel} spills");
            }
        }
    }
}

/// Quantize-append on the GPU writes exactly the bytes the CPU packer writes
/// (`QuantizedBlock::quantize` + `pack`), every class, head dims 128 and 64, value groups
/// 32/64/128, partial blocks, a constant key channel and constant value groups; the rest of
/// each pool slab is zero and slots no job names keep their old bytes.
#[test]
fn quantize_append_matches_cpu_packer_byte_for_byte() {
    let Some(gpu) = gpu_or_skip("quantize_append_matches_cpu_packer_byte_for_byte") else {
        return;
    };
    let qa = QuantizeAppend::load(&gpu).unwrap();
    let mut rng = StdRng::seed_from_u64(0x9a);
    for (d, vg, kg) in [
        (128, 64, 128),
        (128, 32, 128),
        (128, 128, 128),
        (64, 64, 128),
        (64, 32, 128),
        (128, 64, 64),
        (128, 128, 64),
        (64, 32, 64),
    ] {
        let kv_heads = 3;
        let mut layout = PagedLayout::with_head_dim(kv_heads, kv_heads, 1, d, vg)
            .unwrap()
            .with_k_group(kg)
            .unwrap();
        let mut jobs = Vec::new();
        let mut next_token = 0;
        for c in KvClass::ALL {
            let cap = layout.geom(c).tokens;
            for n in [1, 7, cap - 1, cap] {
                jobs.push(QuantizeJob {
                    slot: 0,
                    class: c,
                    first_token: next_token,
                    tokens: n,
                    start: 0,
                });
                next_token += n;
            }
        }
        // Slots shuffled, with two spare slots no job writes.
        let mut slots: Vec<usize> = (0..jobs.len() + 2).collect();
        slots.shuffle(&mut rng);
        for (j, s) in jobs.iter_mut().zip(&slots) {
            j.slot = *s;
        }
        layout.slots = jobs.len() + 2;
        let row = kv_heads * d;
        let mut k: Vec<f32> = (0..next_token * row)
            .map(|_| rng.random_range(-3.0..3.0f32))
            .collect();
        let mut v: Vec<f32> = (0..next_token * row)
            .map(|_| rng.random_range(-2.0..2.0f32))
            .collect();
        for t in 0..next_token {
            k[t * row + 5] += 8.0; // outlier channel of head 0
            k[t * row + d + 2] = 0.75; // constant channel of head 1: scale 0
            for e in 0..vg {
                v[t * row + 2 * d + e] = -1.5; // constant first value group of head 2
            }
        }
        let poison = vec![0xabu8; layout.pool_bytes()];
        let mut pool = gpu.upload(&poison).unwrap();
        let (dk, dv) = (gpu.upload(&k).unwrap(), gpu.upload(&v).unwrap());
        qa.run(&gpu, &layout, &mut pool, &dk, &dv, &jobs).unwrap();
        let got = gpu.download(&pool).unwrap();
        let mut bad = Vec::new();
        for (ji, j) in jobs.iter().enumerate() {
            let g = *layout.geom(j.class);
            for h in 0..kv_heads {
                let rows = |x: &[f32]| -> Vec<f32> {
                    (j.first_token..j.first_token + j.tokens)
                        .flat_map(|t| x[t * row + h * d..t * row + (h + 1) * d].to_vec())
                        .collect()
                };
                let want = QuantizedBlock::quantize(g, &rows(&k), &rows(&v))
                    .unwrap()
                    .pack();
                let at = layout.slab_offset(j.slot, h);
                let slab = &got[at..at + layout.slab_bytes];
                for (i, (a, b)) in slab
                    .iter()
                    .zip(want.iter().chain(std::iter::repeat(&0)))
                    .enumerate()
                {
                    if a != b && bad.len() < 8 {
                        bad.push(format!(
                            "d {d} vg {vg} kg {kg} job {ji} ({:?}, {} tokens) head {h} byte {i}: gpu {a:#04x} cpu {b:#04x}",
                            j.class, j.tokens
                        ));
                    }
                }
            }
        }
        for s in &slots[jobs.len()..] {
            let at = layout.slab_offset(*s, 0);
            assert!(
                got[at..at + kv_heads * layout.slab_bytes]
                    .iter()
                    .all(|&b| b == 0xab),
                "a slot no job names was written"
            );
        }
        assert!(
            bad.is_empty(),
            "GPU bytes differ from the CPU packer: {bad:#?}"
        );
        eprintln!(
            "quantize-append d {d} vg {vg}: {} blocks × {kv_heads} heads byte-identical",
            jobs.len()
        );
    }
    // A non-finite value is reported, not silently packed.
    let mut layout = PagedLayout::with_head_dim(1, 1, 1, 128, 64).unwrap();
    layout.slots = 1;
    let mut pool = gpu.zeros::<u8>(layout.pool_bytes()).unwrap();
    let mut k = vec![0.5f32; 128];
    k[3] = f32::NAN;
    let (dk, dv) = (
        gpu.upload(&k).unwrap(),
        gpu.upload(&vec![0.5f32; 128]).unwrap(),
    );
    let job = QuantizeJob {
        slot: 0,
        class: KvClass::Int4,
        first_token: 0,
        tokens: 1,
        start: 0,
    };
    let e = qa
        .run(&gpu, &layout, &mut pool, &dk, &dv, &[job])
        .unwrap_err();
    assert!(e.to_string().contains("not finite"), "{e}");
}

/// RMSNorm, RoPE (plain and Llama-3 scaled frequencies), SwiGLU and the residual add against
/// f64 references written out here (the formulas of `model::llama`), f32 and bf16, odd sizes.
/// Tolerance (max |err| / max |ref|): f32 1e-5; bf16 8e-3 (the output is rounded to bf16,
/// relative step 2^-8, and the inputs of the reference are the bf16-rounded values).
#[test]
fn layer_ops_match_cpu_references() {
    use triaxkv::gpu::{Bf16, LayerOps};
    use triaxkv::model::config::{Arch, ModelConfig, RopeScaling};
    let Some(gpu) = gpu_or_skip("layer_ops_match_cpu_references") else {
        return;
    };
    let ops = LayerOps::load(&gpu).unwrap();
    let mut rng = StdRng::seed_from_u64(0x1a7e);
    let mut rand_vec =
        |n: usize, amp: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-amp..amp)).collect() };
    let bf = |x: &[f32]| -> Vec<Bf16> { x.iter().map(|&v| Bf16::from_f32(v)).collect() };
    let unbf = |x: &[Bf16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    let round_bf =
        |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| Bf16::from_f32(v).to_f32()).collect() };
    let check = |what: &str, got: &[f32], want: &[f64], tol: f64| {
        let want32: Vec<f32> = want.iter().map(|&w| w as f32).collect();
        let e = rel_err(got, &want32);
        eprintln!("{what}: rel_err {e:.2e}");
        assert!(e < tol, "{what}: rel_err {e:.2e} >= {tol}");
    };

    // RMSNorm: SmolLM2's hidden size 576, an odd one, and Qwen3's per-head norm (d = 128).
    for (rows, d) in [(7, 576), (3, 1001), (40, 128)] {
        let x = rand_vec(rows * d, 3.0);
        let w = rand_vec(d, 1.5);
        let eps = 1e-5f32;
        let reference = |x: &[f32], w: &[f32]| -> Vec<f64> {
            let mut out = Vec::with_capacity(x.len());
            for r in x.chunks(d) {
                let ss = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let inv = 1.0 / (ss + eps as f64).sqrt();
                out.extend(r.iter().zip(w).map(|(&v, &wt)| v as f64 * inv * wt as f64));
            }
            out
        };
        let (dx, dw) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
        let mut out = gpu.zeros::<f32>(rows * d).unwrap();
        ops.rmsnorm(&gpu, &dx, &dw, &mut out, rows, eps).unwrap();
        check(
            &format!("rmsnorm f32 {rows}x{d}"),
            &gpu.download(&out).unwrap(),
            &reference(&x, &w),
            1e-5,
        );
        let (bx, bw) = (gpu.upload(&bf(&x)).unwrap(), gpu.upload(&bf(&w)).unwrap());
        let mut out = gpu.zeros::<Bf16>(rows * d).unwrap();
        ops.rmsnorm(&gpu, &bx, &bw, &mut out, rows, eps).unwrap();
        check(
            &format!("rmsnorm bf16 {rows}x{d}"),
            &unbf(&gpu.download(&out).unwrap()),
            &reference(&round_bf(&x), &round_bf(&w)),
            8e-3,
        );
    }

    // RoPE: SmolLM2-like (head dim 64, theta 1e5) and Llama-3.1-like scaled (128, 5e5),
    // positions up to 100k (large angles), odd token and head counts.
    let mut cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 1,
        hidden_size: 64,
        intermediate_size: 1,
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 64,
        rope_theta: 100_000.0,
        rope_scaling: RopeScaling::None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        qk_norm: false,
    };
    for scaled in [false, true] {
        if scaled {
            cfg.head_dim = 128;
            cfg.rope_theta = 500_000.0;
            cfg.rope_scaling = RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            };
        }
        let (tokens, heads, hd) = (5, 3, cfg.head_dim);
        let freq = triaxkv::model::llama::inv_freq(&cfg);
        let positions: Vec<i32> = vec![0, 1, 17, 4099, 100_003];
        let x = rand_vec(tokens * heads * hd, 2.0);
        let reference = |x: &[f32]| -> Vec<f64> {
            let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let half = hd / 2;
            for (t, &p) in positions.iter().enumerate() {
                for h in 0..heads {
                    let at = (t * heads + h) * hd;
                    for j in 0..half {
                        let angle = (p as f32 * freq[j]) as f64;
                        let (x0, x1) = (x[at + j] as f64, x[at + j + half] as f64);
                        out[at + j] = x0 * angle.cos() - x1 * angle.sin();
                        out[at + j + half] = x1 * angle.cos() + x0 * angle.sin();
                    }
                }
            }
            out
        };
        let (df, dp) = (gpu.upload(&freq).unwrap(), gpu.upload(&positions).unwrap());
        let mut dx = gpu.upload(&x).unwrap();
        ops.rope(&gpu, &mut dx, &df, &dp, heads, hd).unwrap();
        check(
            &format!("rope f32 hd {hd} scaled {scaled}"),
            &gpu.download(&dx).unwrap(),
            &reference(&x),
            1e-5,
        );
        let mut bx = gpu.upload(&bf(&x)).unwrap();
        ops.rope(&gpu, &mut bx, &df, &dp, heads, hd).unwrap();
        check(
            &format!("rope bf16 hd {hd} scaled {scaled}"),
            &unbf(&gpu.download(&bx).unwrap()),
            &reference(&round_bf(&x)),
            8e-3,
        );
    }

    // SwiGLU and the residual add on an odd length.
    let n = 1536 * 3 + 7;
    let (g, u) = (rand_vec(n, 6.0), rand_vec(n, 2.0));
    let swiglu_ref = |g: &[f32], u: &[f32]| -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(&a, &b)| a as f64 / (1.0 + (-(a as f64)).exp()) * b as f64)
            .collect()
    };
    let add_ref = |g: &[f32], u: &[f32]| -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect()
    };
    let (dg, du) = (gpu.upload(&g).unwrap(), gpu.upload(&u).unwrap());
    let mut out = gpu.zeros::<f32>(n).unwrap();
    ops.swiglu(&gpu, &dg, &du, &mut out).unwrap();
    check(
        "swiglu f32",
        &gpu.download(&out).unwrap(),
        &swiglu_ref(&g, &u),
        1e-5,
    );
    let mut dx = gpu.upload(&g).unwrap();
    ops.add(&gpu, &mut dx, &du).unwrap();
    check(
        "add f32",
        &gpu.download(&dx).unwrap(),
        &add_ref(&g, &u),
        1e-6,
    );
    let (bg, bu) = (gpu.upload(&bf(&g)).unwrap(), gpu.upload(&bf(&u)).unwrap());
    let mut out = gpu.zeros::<Bf16>(n).unwrap();
    ops.swiglu(&gpu, &bg, &bu, &mut out).unwrap();
    check(
        "swiglu bf16",
        &unbf(&gpu.download(&out).unwrap()),
        &swiglu_ref(&round_bf(&g), &round_bf(&u)),
        8e-3,
    );
    let mut bx = gpu.upload(&bf(&g)).unwrap();
    ops.add(&gpu, &mut bx, &bu).unwrap();
    check(
        "add bf16",
        &unbf(&gpu.download(&bx).unwrap()),
        &add_ref(&round_bf(&g), &round_bf(&u)),
        8e-3,
    );
}

/// cuBLAS bf16 GEMM (`gpu::gemm::Gemm::linear`, f32 accumulation) against an f64 product of
/// the same bf16-rounded operands, odd sizes, bf16 and f32 outputs poisoned with NaN first.
/// Tolerance (max |err| / max |ref|): f32 output 1e-4 (f32 accumulation over up to 4,099
/// terms); bf16 output 8e-3 (rounded to bf16, relative step 2^-8).
#[test]
fn cublas_bf16_gemm_matches_cpu() {
    use triaxkv::gpu::gemm::Gemm;
    use triaxkv::gpu::Bf16;
    let Some(gpu) = gpu_or_skip("cublas_bf16_gemm_matches_cpu") else {
        return;
    };
    let gemm = Gemm::new(&gpu).unwrap();
    let mut rng = StdRng::seed_from_u64(0x9e11);
    for (rows, k, n) in [(1, 7, 3), (5, 1001, 77), (33, 4099, 129), (32, 256, 1003)] {
        let x: Vec<f32> = (0..rows * k)
            .map(|_| Bf16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|_| Bf16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
            .collect();
        let mut want = vec![0f32; rows * n];
        for r in 0..rows {
            for o in 0..n {
                let s: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                    .sum();
                want[r * n + o] = s as f32;
            }
        }
        let bx: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
        let bw: Vec<Bf16> = w.iter().map(|&v| Bf16::from_f32(v)).collect();
        let (dx, dw) = (gpu.upload(&bx).unwrap(), gpu.upload(&bw).unwrap());
        let mut y32 = gpu.upload(&vec![f32::NAN; rows * n]).unwrap();
        gemm.linear(&gpu, &dx, &dw, &mut y32, rows, k, n).unwrap();
        let mut y16 = gpu.upload(&vec![Bf16(0x7fc0); rows * n]).unwrap();
        gemm.linear(&gpu, &dx, &dw, &mut y16, rows, k, n).unwrap();
        gpu.synchronize().unwrap();
        let got32 = gpu.download(&y32).unwrap();
        let got16: Vec<f32> = gpu
            .download(&y16)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let (e32, e16) = (rel_err(&got32, &want), rel_err(&got16, &want));
        eprintln!("gemm {rows}x{k} · ({n}x{k})^T: f32 out rel_err {e32:.2e}, bf16 out {e16:.2e}");
        assert!(e32 < 1e-4, "f32 output {rows}x{k}x{n}: {e32:.2e}");
        assert!(e16 < 8e-3, "bf16 output {rows}x{k}x{n}: {e16:.2e}");
    }
    // Sizes are checked, not trusted.
    let small = gpu.zeros::<Bf16>(4).unwrap();
    let mut y = gpu.zeros::<f32>(4).unwrap();
    assert!(gemm.linear(&gpu, &small, &small, &mut y, 2, 3, 2).is_err());
}

/// One GPU decode step of a tiny random model (2 layers, hidden 256, 4 query / 2 KV heads of
/// 128, MLP 320, vocab 1003; a Llama-style and a Qwen3-style q-norm variant), F16-only paged
/// caches of 37 / 200 / 129 tokens per layer (made by the real packer), against an f32/f64
/// CPU computation of the same step: the same bf16-rounded weights and cache values, the
/// activations rounded to bf16 where the GPU stores bf16, q rounded to fp16 as the attention
/// kernel reads it, attention by `quant::reference_attention`. Checks: max |Δlogit| <
/// 2e-2 × max |logit_ref|; the GPU argmax kernel picks the argmax of the GPU logits; top-1
/// equal to the CPU's wherever the CPU's top-2 gap exceeds 2 × max |Δlogit| (closer pairs
/// are a tie within the tolerance and are reported).
#[test]
fn decode_step_matches_cpu_reference() {
    use triaxkv::gpu::decode_step::{
        DecodeStep, DeviceWeights, HostLayer, HostWeights, KvCaches, ModelShape, StepOptions,
    };
    use triaxkv::gpu::{Bf16, DecodePlan, DeviceCache};
    let Some(gpu) = gpu_or_skip("decode_step_matches_cpu_reference") else {
        return;
    };
    let bf = |x: f32| Bf16::from_f32(x).to_f32();
    let lens = [37usize, 200, 129];
    let batch = lens.len();
    for qk_norm in [false, true] {
        let shape = ModelShape {
            name: format!("tiny{}", if qk_norm { "-qknorm" } else { "" }),
            layers: 2,
            hidden: 256,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 128,
            intermediate: 320,
            vocab: 1003,
            rope_theta: 10_000.0,
            rope_scaling: triaxkv::model::config::RopeScaling::None,
            rms_eps: 1e-5,
            qk_norm,
        };
        let (h, inter, v, qd) = (shape.hidden, shape.intermediate, shape.vocab, shape.q_dim());
        let mut rng = StdRng::seed_from_u64(0xdec0 + qk_norm as u64);
        let mut rv = |n: usize, off: f32, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|_| bf(off + rng.random_range(-amp..amp)))
                .collect()
        };
        let a = |fan: usize| (3.0 / fan as f32).sqrt();
        let mut layers = Vec::new();
        for _ in 0..shape.layers {
            layers.push(HostLayer {
                attn_norm: rv(h, 1.0, 0.2),
                wqkv: rv(shape.qkv_dim() * h, 0.0, a(h)),
                wo: rv(h * qd, 0.0, a(qd)),
                mlp_norm: rv(h, 1.0, 0.2),
                wgu: rv(2 * inter * h, 0.0, a(h)),
                wdown: rv(h * inter, 0.0, a(inter)),
                q_norm: qk_norm.then(|| rv(128, 1.0, 0.2)),
                k_norm: qk_norm.then(|| rv(128, 1.0, 0.2)),
            });
        }
        let host = HostWeights {
            embed: rv(v * h, 0.0, 1.0),
            layers,
            final_norm: rv(h, 1.0, 0.2),
            lm_head: rv(v * h, 0.0, 2.0 * a(h)),
        };
        let ids: Vec<i32> = vec![5, 1002, 517];
        let positions: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
        let toks: Vec<[usize; 4]> = lens.iter().map(|&n| [n, 0, 0, 0]).collect();
        let cases: Vec<Case> = (0..shape.layers)
            .map(|_| make_case(shape.q_heads, shape.kv_heads, (64, 64), &toks, &mut rng))
            .collect();

        // GPU.
        let w = DeviceWeights::upload(&gpu, &shape, &host).unwrap();
        let caches: Vec<DeviceCache> = cases
            .iter()
            .map(|c| DeviceCache::upload(&gpu, &c.host).unwrap())
            .collect();
        let kv = KvCaches::PerLayer(caches);
        let mut plan = DecodePlan::new(&gpu, kv.first().unwrap(), 3).unwrap();
        let mut step = DecodeStep::new(&gpu, &shape, batch, 64).unwrap();
        step.set_inputs(&gpu, &ids, &positions).unwrap();
        step.logits = gpu.upload(&vec![f32::NAN; batch * v]).unwrap();
        step.run(&gpu, &w, &kv, &mut plan, StepOptions::default())
            .unwrap();
        gpu.synchronize().unwrap();
        let got = gpu.download(&step.logits).unwrap();
        let got_ids = gpu.download(&step.next_ids).unwrap();

        // CPU, rounding where the GPU stores bf16.
        let rms = |x: &[f32], w: &[f32], eps: f32| -> Vec<f32> {
            let d = w.len();
            let mut out = Vec::with_capacity(x.len());
            for r in x.chunks(d) {
                let ss = r.iter().map(|&v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ss + eps).sqrt();
                out.extend(r.iter().zip(w).map(|(&v, &wt)| bf(v * inv * wt)));
            }
            out
        };
        let lin = |x: &[f32], w: &[f32], k: usize, n: usize, round: bool| -> Vec<f32> {
            let rows = x.len() / k;
            let mut y = vec![0f32; rows * n];
            for r in 0..rows {
                for o in 0..n {
                    let s: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                        .sum();
                    y[r * n + o] = if round { bf(s as f32) } else { s as f32 };
                }
            }
            y
        };
        let freq = shape.inv_freq();
        let mut x: Vec<f32> = ids
            .iter()
            .flat_map(|&id| host.embed[id as usize * h..(id as usize + 1) * h].to_vec())
            .collect();
        for (l, lw) in host.layers.iter().enumerate() {
            let hn = rms(&x, &lw.attn_norm, shape.rms_eps);
            let qkv = lin(&hn, &lw.wqkv, h, shape.qkv_dim(), true);
            let mut q = vec![0f32; batch * qd];
            for b in 0..batch {
                for hh in 0..shape.q_heads {
                    let src = &qkv[b * shape.qkv_dim() + hh * 128..][..128];
                    let mut qh: Vec<f32> = src.to_vec();
                    if let Some(qn) = &lw.q_norm {
                        qh = rms(&qh, qn, shape.rms_eps);
                    }
                    for j in 0..64 {
                        let ang = positions[b] as f32 * freq[j];
                        let (s, c) = (ang as f64).sin_cos();
                        let (x0, x1) = (qh[j] as f64, qh[j + 64] as f64);
                        let o = (b * shape.q_heads + hh) * 128;
                        q[o + j] = half::f16::from_f64(x0 * c - x1 * s).to_f32();
                        q[o + j + 64] = half::f16::from_f64(x1 * c + x0 * s).to_f32();
                    }
                }
            }
            let att: Vec<f32> = reference(&cases[l], &q, 1.0 / (128f32).sqrt())
                .iter()
                .map(|&v| bf(v))
                .collect();
            let o = lin(&att, &lw.wo, qd, h, false);
            x = x.iter().zip(&o).map(|(&a, &b)| a + b).collect();
            let hn = rms(&x, &lw.mlp_norm, shape.rms_eps);
            let gu = lin(&hn, &lw.wgu, h, 2 * inter, true);
            let mut m = vec![0f32; batch * inter];
            for b in 0..batch {
                for c in 0..inter {
                    let g = gu[b * 2 * inter + c];
                    let u = gu[b * 2 * inter + inter + c];
                    m[b * inter + c] = bf(g / (1.0 + (-g).exp()) * u);
                }
            }
            let d = lin(&m, &lw.wdown, inter, h, false);
            x = x.iter().zip(&d).map(|(&a, &b)| a + b).collect();
        }
        let hn = rms(&x, &host.final_norm, shape.rms_eps);
        let want = lin(&hn, &host.lm_head, h, v, false);

        let argmax = |r: &[f32]| -> usize {
            let mut best = 0;
            for (i, &val) in r.iter().enumerate() {
                if val > r[best] {
                    best = i;
                }
            }
            best
        };
        let max_ref = want.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let max_d = got.iter().zip(&want).fold(0f32, |m, (&g, &w)| {
            if g.is_finite() {
                m.max((g - w).abs())
            } else {
                f32::INFINITY
            }
        });
        eprintln!(
            "decode step {}: max |Δlogit| {max_d:.3e}, max |logit| {max_ref:.3}, ratio {:.2e}",
            shape.name,
            max_d / max_ref
        );
        assert!(
            max_d < 2e-2 * max_ref,
            "{}: max |Δlogit| {max_d:.3e} over 2e-2 × {max_ref:.3}",
            shape.name
        );
        for b in 0..batch {
            let (g, r) = (&got[b * v..(b + 1) * v], &want[b * v..(b + 1) * v]);
            assert_eq!(got_ids[b] as usize, argmax(g), "GPU argmax kernel, row {b}");
            let top = argmax(r);
            let mut sorted = r.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let gap = sorted[0] - sorted[1];
            let gpu_top = got_ids[b] as usize;
            eprintln!(
                "  row {b}: top-1 GPU {gpu_top} CPU {top} (CPU top-2 gap {gap:.3e}){}",
                if gpu_top == top {
                    ""
                } else {
                    "  TIE WITHIN TOLERANCE"
                }
            );
            if gap > 2.0 * max_d {
                assert_eq!(gpu_top, top, "{} row {b}: top-1 differs", shape.name);
            } else {
                assert!(r[top] - r[gpu_top] <= 2.0 * max_d, "row {b}");
            }
        }
    }
}

#[test]
fn top_p_sampling_matches_the_cpu_sampler() {
    use triaxkv::gpu::GpuSampler;
    use triaxkv::model::sampling::{argmax, sample_top_p, softmax_with_temperature};
    let Some(gpu) = gpu_or_skip("top_p_sampling_matches_the_cpu_sampler") else {
        return;
    };
    let sampler = GpuSampler::load(&gpu).expect("loading the sampling kernels");
    let mut rng = StdRng::seed_from_u64(11);
    let (mut total, mut same) = (0usize, 0usize);
    for &vocab in &[7usize, 1000, 49152] {
        for &(temperature, top_p) in &[(1.0f32, 0.9f32), (0.7, 0.5), (1.3, 1.0), (0.0, 0.9)] {
            let rows = 64;
            // Peaked rows (a few large logits over noise), as real next-token logits are.
            let logits: Vec<f32> = (0..rows * vocab)
                .map(|_| {
                    let x: f32 = rng.random_range(-4.0..4.0);
                    if rng.random_range(0.0..1.0) < 0.01 {
                        x + 8.0
                    } else {
                        x
                    }
                })
                .collect();
            let coins: Vec<f32> = (0..rows).map(|_| rng.random_range(0.0..1.0)).collect();
            let d_logits = gpu.upload(&logits).unwrap();
            let d_coins = gpu.upload(&coins).unwrap();
            let mut d_ids = gpu.zeros::<i32>(rows).unwrap();
            sampler
                .sample(
                    &gpu,
                    &d_logits,
                    rows,
                    vocab,
                    temperature,
                    top_p,
                    &d_coins,
                    &mut d_ids,
                )
                .unwrap();
            let ids = gpu.download(&d_ids).unwrap();
            for r in 0..rows {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let got = ids[r] as u32;
                if temperature <= 0.0 {
                    assert_eq!(got, argmax(row), "greedy row {r} vocab {vocab}");
                    continue;
                }
                let p = softmax_with_temperature(row, temperature);
                let want = sample_top_p(&p, top_p, coins[r]);
                total += 1;
                if got == want {
                    same += 1;
                    continue;
                }
                // A different pick is allowed only at a rounding boundary: the CPU's
                // cumulative mass at the two tokens must straddle the target within 1e-4.
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                let mass_to = |t: u32| {
                    let mut acc = 0f64;
                    for &i in &order {
                        acc += p[i] as f64;
                        if i as u32 == t {
                            return acc;
                        }
                    }
                    f64::NAN
                };
                let (a, b) = (mass_to(got), mass_to(want));
                assert!(
                    (a - b).abs() < 1e-4 + p[got as usize].max(p[want as usize]) as f64 * 1.01,
                    "row {r} vocab {vocab} T {temperature} top_p {top_p}: GPU {got} (mass {a}) \
                     vs CPU {want} (mass {b}), coin {}",
                    coins[r]
                );
            }
        }
    }
    eprintln!("top-p sampling: {same}/{total} draws identical to the CPU sampler");
    // Measured on the H200: 565/576. The rest sit where many near-equal tail probabilities
    // make the crossing token depend on summation order (checked above).
    assert!(
        same * 100 >= total * 95,
        "only {same}/{total} draws equal the CPU's"
    );
}

/// A tiny random model (weights already bf16-representable, so only the GPU's bf16
/// activations differ from the CPU's f32 math) run through `GpuForward` — two prefill chunks,
/// then decode steps; K/V appended to 16-bit blocks across block boundaries, head dim 64 zero-padded into the
/// 128 kernel, and head dim 128 with Qwen3's q/k norm — against the CPU `Model::forward`
/// over the same tokens: logits within 3e-2 × max |logit| at every position, top-1 equal
/// wherever the CPU's top-2 gap exceeds twice the largest logit difference.
/// A tiny random model whose weights are bf16-representable (so only the GPU's bf16
/// activations differ from the CPU's f32 math).
fn tiny_model(
    arch: triaxkv::model::config::Arch,
    head_dim: usize,
    qk_norm: bool,
) -> triaxkv::model::llama::Model {
    use triaxkv::model::config::{ModelConfig, RopeScaling};
    use triaxkv::model::llama::Model;
    use triaxkv::model::weights::{LayerWeights, Matrix, Weights};
    let bf = |x: f32| triaxkv::gpu::Bf16::from_f32(x).to_f32();
    let c = ModelConfig {
        arch,
        vocab_size: 301,
        hidden_size: 192,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        attention_bias: false,
        qk_norm,
    };
    let mut rng = StdRng::seed_from_u64(0xf0f0 + head_dim as u64);
    let mut rv = |n: usize, off: f32, amp: f32| -> Vec<f32> {
        (0..n)
            .map(|_| bf(off + rng.random_range(-amp..amp)))
            .collect()
    };
    let mut mat = |rows: usize, cols: usize| Matrix {
        rows,
        cols,
        data: rv(rows * cols, 0.0, (3.0 / cols as f32).sqrt()),
    };
    let (h, qd, kvd, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut layers = Vec::new();
    for _ in 0..c.num_layers {
        layers.push(LayerWeights {
            attn_norm: vec![],
            wq: mat(qd, h),
            wk: mat(kvd, h),
            wv: mat(kvd, h),
            wo: mat(h, qd),
            bq: None,
            bk: None,
            bv: None,
            q_norm: None,
            k_norm: None,
            ffn_norm: vec![],
            w_gate: mat(i, h),
            w_up: mat(i, h),
            w_down: mat(h, i),
        });
    }
    let embed = mat(c.vocab_size, h);
    let rv = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|k| bf(1.0 + 0.1 * ((k * 7 % 13) as f32 / 13.0 - 0.5)))
            .collect()
    };
    for l in &mut layers {
        l.attn_norm = rv(h);
        l.ffn_norm = rv(h);
        if qk_norm {
            l.q_norm = Some(rv(head_dim));
            l.k_norm = Some(rv(head_dim));
        }
    }
    Model {
        config: c.clone(),
        weights: Weights {
            embed,
            layers,
            final_norm: rv(h),
            lm_head: None,
        },
    }
}

#[test]
fn gpu_forward_matches_cpu_model_forward() {
    use triaxkv::gpu::GpuForward;
    use triaxkv::kvcache::KvCache;
    use triaxkv::model::config::Arch;
    use triaxkv::model::llama::Logits;
    use triaxkv::tags::TokenTag;
    let Some(gpu) = gpu_or_skip("gpu_forward_matches_cpu_model_forward") else {
        return;
    };
    for (arch, head_dim, qk_norm) in [(Arch::Llama, 64, false), (Arch::Qwen3, 128, true)] {
        let model = tiny_model(arch, head_dim, qk_norm);
        let c = model.config.clone();
        let n = 41; // two full 16-token blocks and a partial one
        let ids: Vec<u32> = (0..n)
            .map(|k| ((k * 97 + 13) % c.vocab_size) as u32)
            .collect();
        let tag = TokenTag {
            role: triaxkv::tags::Role::User,
            modality: triaxkv::tags::Modality::Text,
            turn: 1,
            step: 0,
        };
        let tags = vec![tag; n];
        let mut cache = model.new_cache();
        let want = model.forward(&ids, &tags, &mut cache as &mut dyn KvCache, Logits::All);
        let mut fwd = GpuForward::new(&gpu, "tiny", &model, 48, 24).unwrap();
        let v = c.vocab_size;
        let max_ref = want.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let mut max_d = 0f32;
        // Prefill chunks of 20 and 9 tokens (across block boundaries, the second after 16-bit
        // history), then decode steps.
        let mut got_all = fwd.prefill(&gpu, &ids[..20]).unwrap();
        got_all.extend(fwd.prefill(&gpu, &ids[20..29]).unwrap());
        assert!(
            fwd.prefill(&gpu, &ids[..25]).is_err(),
            "a chunk over max_chunk"
        );
        assert_eq!(got_all.len(), 29 * v);
        for &id in &ids[29..] {
            let got = fwd.step(&gpu, id).unwrap();
            assert_eq!(got.len(), v);
            got_all.extend(got);
        }
        for (g, w) in got_all.iter().zip(&want) {
            assert!(g.is_finite(), "{arch:?}: non-finite GPU logit");
            max_d = max_d.max((g - w).abs());
        }
        eprintln!(
            "gpu forward {arch:?} hd {head_dim}: max |Δlogit| {max_d:.3e}, max |logit| {max_ref:.3}"
        );
        assert!(max_d < 3e-2 * max_ref, "{arch:?}: max |Δlogit| {max_d:.3e}");
        for p in 0..n {
            let (g, r) = (&got_all[p * v..(p + 1) * v], &want[p * v..(p + 1) * v]);
            let top = triaxkv::model::sampling::argmax(r) as usize;
            let gt = triaxkv::model::sampling::argmax(g) as usize;
            let mut sorted = r.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 2.0 * max_d {
                assert_eq!(gt, top, "{arch:?} position {p}: top-1 differs");
            }
        }
        // The cache is full at its capacity; a reset starts a new sequence that matches again.
        fwd.reset(&gpu).unwrap();
        let again = fwd.step(&gpu, ids[0]).unwrap();
        let d0 = again
            .iter()
            .zip(&want[..v])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d0 < 3e-2 * max_ref, "after reset: {d0:.3e}");
    }
}

/// Prefill attention over a random paged cache of every class (made by the real packer): a
/// chunk of query rows whose own tokens are the last 16-bit tokens of the sequence, against an
/// f64 reference that lets row `r` see every quantized token and the first `f16_base + r + 1`
/// 16-bit tokens in table order; GQA 3/4/8, value groups 32/64/128, odd chunk lengths, and a
/// second sequence in the cache that must not be read.
#[test]
fn prefill_attention_matches_cpu_reference() {
    use triaxkv::gpu::prefill_attention::PrefillCall;
    use triaxkv::gpu::{DeviceCache, PrefillAttention};
    let Some(gpu) = gpu_or_skip("prefill_attention_matches_cpu_reference") else {
        return;
    };
    let mut kernel = PrefillAttention::load(&gpu).unwrap();
    // (q heads, kv heads, value group, tokens per class of the chunk's sequence, chunk rows)
    let cases: Vec<(usize, usize, usize, [usize; 4], usize)> = vec![
        (12, 4, 64, [70, 130, 300, 40], 37),
        (8, 2, 32, [9, 0, 0, 0], 9),
        (32, 4, 128, [200, 64, 129, 0], 150),
        (6, 2, 64, [33, 0, 257, 65], 1),
    ];
    let mut rng = StdRng::seed_from_u64(0x9e11);
    let mut failures = Vec::new();
    for (qh, kvh, vg, toks, rows) in cases {
        let other = [17usize, 64, 0, 0];
        let case = make_case(qh, kvh, (vg, 64), &[other, toks], &mut rng);
        let seq = 1;
        let f16_base = toks[0] - rows;
        let gqa = qh / kvh;
        let q: Vec<f32> = (0..rows * qh * HEAD_DIM)
            .map(|_| half::f16::from_f32(rng.random_range(-2.0..2.0)).to_f32())
            .collect();
        let sm_scale = 1.0 / (HEAD_DIM as f32).sqrt();
        // Reference.
        let mut want = vec![0f32; rows * qh * HEAD_DIM];
        for h in 0..kvh {
            let (mut keys, mut vals, mut f16_ord) = (Vec::new(), Vec::new(), Vec::new());
            let mut ord = 0usize;
            for b in &case.blocks[seq][h] {
                let (k, v) = b.dequantize();
                for t in 0..b.len {
                    keys.push(k[t * HEAD_DIM..(t + 1) * HEAD_DIM].to_vec());
                    vals.push(v[t * HEAD_DIM..(t + 1) * HEAD_DIM].to_vec());
                    if b.geom.class == KvClass::F16 {
                        f16_ord.push(Some(ord));
                        ord += 1;
                    } else {
                        f16_ord.push(None);
                    }
                }
            }
            for r in 0..rows {
                for g in 0..gqa {
                    let at = (r * qh + h * gqa + g) * HEAD_DIM;
                    let qv = &q[at..at + HEAD_DIM];
                    let vis: Vec<usize> = (0..keys.len())
                        .filter(|&t| f16_ord[t].is_none_or(|o| o < f16_base + r + 1))
                        .collect();
                    let sc: Vec<f64> = vis
                        .iter()
                        .map(|&t| {
                            qv.iter()
                                .zip(&keys[t])
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * sm_scale as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for d in 0..HEAD_DIM {
                        let o: f64 = vis
                            .iter()
                            .zip(&w)
                            .map(|(&t, wt)| wt * vals[t][d] as f64)
                            .sum();
                        want[at + d] = (o / z) as f32;
                    }
                }
            }
        }
        let cache = DeviceCache::upload(&gpu, &case.host).unwrap();
        let dq = gpu
            .upload(&triaxkv::gpu::decode_attention::to_f16_bits(&q))
            .unwrap();
        let mut out = gpu.upload(&vec![f32::NAN; rows * qh * HEAD_DIM]).unwrap();
        let call = PrefillCall {
            seq,
            f16_base,
            row0: 0,
            rows,
            sm_scale,
        };
        kernel.launch(&gpu, &cache, 0, call, &dq, &mut out).unwrap();
        gpu.synchronize().unwrap();
        let got = gpu.download(&out).unwrap();
        let e = rel_err(&got, &want);
        eprintln!("prefill q {qh} kv {kvh} vg {vg} toks {toks:?} rows {rows}: rel_err {e:.2e}");
        if e >= TOL {
            failures.push(format!("{toks:?} rows {rows}: {e:.2e}"));
        }
        // Both sequences' chunks prepared as one step (one decode, one attention launch, the
        // calls' rows side by side): each call's rows equal its launch alone, bit for bit.
        let rows0 = 5;
        let q0: Vec<f32> = (0..rows0 * qh * HEAD_DIM)
            .map(|_| half::f16::from_f32(rng.random_range(-2.0..2.0)).to_f32())
            .collect();
        let call0 = PrefillCall {
            seq: 0,
            f16_base: other[0] - rows0,
            row0: 0,
            rows: rows0,
            sm_scale,
        };
        let both_q: Vec<f32> = q.iter().chain(&q0).copied().collect();
        let dq_both = gpu
            .upload(&triaxkv::gpu::decode_attention::to_f16_bits(&both_q))
            .unwrap();
        let out_both = gpu.upload(&vec![f32::NAN; both_q.len()]).unwrap();
        let calls = [
            call,
            PrefillCall {
                row0: rows,
                ..call0
            },
        ];
        let prep = kernel
            .prepare(&gpu, &cache.layout, &calls, &dq_both, &out_both)
            .unwrap();
        kernel.launch_prepared(&gpu, &cache, 0, &prep).unwrap();
        let dq0 = gpu
            .upload(&triaxkv::gpu::decode_attention::to_f16_bits(&q0))
            .unwrap();
        let mut out0 = gpu.upload(&vec![f32::NAN; q0.len()]).unwrap();
        kernel
            .launch(&gpu, &cache, 0, call0, &dq0, &mut out0)
            .unwrap();
        gpu.synchronize().unwrap();
        let both = gpu.download(&out_both).unwrap();
        let alone0 = gpu.download(&out0).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        if bits(&both[..got.len()]) != bits(&got) || bits(&both[got.len()..]) != bits(&alone0) {
            failures.push(format!(
                "{toks:?} rows {rows}: batched calls differ from alone"
            ));
        }
        // A chunk longer than the sequence's 16-bit tokens is refused.
        let too_many = PrefillCall {
            seq,
            f16_base,
            row0: 0,
            rows: rows + 1,
            sm_scale,
        };
        let mut big = gpu.zeros::<f32>((rows + 1) * qh * HEAD_DIM).unwrap();
        let dq2 = gpu.zeros::<u16>((rows + 1) * qh * HEAD_DIM).unwrap();
        assert!(kernel
            .launch(&gpu, &cache, 0, too_many, &dq2, &mut big)
            .is_err());
    }
    assert!(failures.is_empty(), "over tolerance {TOL}: {failures:?}");
}

/// The serving pool's token moves (`gpu::token_moves`) on a stacked two-layer pool: tokens of
/// every class moved into 16-bit blocks decode to the CPU's dequantized values (rounded to
/// fp16), and blocks quantized from 16-bit staging are byte-identical to the CPU packer on
/// the same 16-bit values; each layer reads and writes only its own pool.
#[test]
#[allow(clippy::needless_range_loop)] // layer, head and slot index several tables at once
fn token_moves_match_cpu_blocks_in_every_layer() {
    use triaxkv::gpu::token_moves::TokenMoves;
    use triaxkv::paged::pool::{Move, Ops, Quantize};
    let Some(gpu) = gpu_or_skip("token_moves_match_cpu_blocks_in_every_layer") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(0x70);
    let (kv_heads, d, layers, slots) = (2usize, 128usize, 2usize, 24usize);
    // INT2 keys in two 64-token groups per block.
    let layout = PagedLayout::new(4 * kv_heads, kv_heads, 1, 64)
        .unwrap()
        .with_k_group(64)
        .unwrap();
    // Per layer: slot 0 INT4 (64 tokens), 1 INT2 (128), 2 FP8 (32), 3 F16 (16).
    let sources = [
        (0u32, KvClass::Int4),
        (1, KvClass::Int2),
        (2, KvClass::Fp8),
        (3, KvClass::F16),
    ];
    let mut pool_bytes = Vec::new();
    // decoded[layer][slot][head] = (k, v) the CPU decodes.
    let mut decoded = Vec::new();
    for _ in 0..layers {
        let mut host = HostCache::new(layout.clone(), slots);
        let mut per_slot = Vec::new();
        for &(slot, c) in &sources {
            let g = *layout.geom(c);
            let mut heads = Vec::new();
            let mut dec = Vec::new();
            for _ in 0..kv_heads {
                let k: Vec<f32> = (0..g.tokens * d)
                    .map(|_| rng.random_range(-3.0..3.0f32))
                    .collect();
                let v: Vec<f32> = (0..g.tokens * d)
                    .map(|_| rng.random_range(-2.0..2.0f32))
                    .collect();
                let b = QuantizedBlock::quantize(g, &k, &v).unwrap();
                dec.push(b.dequantize());
                heads.push(b);
            }
            host.put(0, slot as usize, &heads).unwrap();
            per_slot.push(dec);
        }
        pool_bytes.extend_from_slice(&host.pool);
        decoded.push(per_slot);
    }
    let mut layout = layout;
    layout.slots = slots;
    let mut pool = gpu.upload(&pool_bytes).unwrap();
    let mut moves = TokenMoves::new(&gpu, &layout, layers, 130).unwrap();

    // Pass 1: the whole INT2 block into 16-bit slots 4..12 (a scratch of 130 tokens: two
    // launches), then a few tokens of every class into slot 12.
    let mut ops = Ops {
        zero: (4..13).collect(),
        ..Default::default()
    };
    for t in 0..128u32 {
        ops.moves.push(Move {
            src_slot: 1,
            src_class: KvClass::Int2,
            src_tok: t,
            dst_slot: 4 + t / 16,
            dst_class: KvClass::F16,
            dst_tok: t % 16,
        });
    }
    let picks = [
        (0u32, KvClass::Int4, 5u32),
        (0, KvClass::Int4, 63),
        (2, KvClass::Fp8, 31),
        (3, KvClass::F16, 15),
        (1, KvClass::Int2, 77),
    ];
    for (i, &(s, c, t)) in picks.iter().enumerate() {
        ops.moves.push(Move {
            src_slot: s,
            src_class: c,
            src_tok: t,
            dst_slot: 12,
            dst_class: KvClass::F16,
            dst_tok: i as u32,
        });
    }
    moves.run(&gpu, &layout, &mut pool, &ops).unwrap();
    // Pass 2: quantize from the 16-bit copies: INT4 from slots 4..8, INT2 from 4..12, FP8
    // from 4..6.
    let src = |blocks: std::ops::Range<u32>| -> Vec<(u32, KvClass, u32)> {
        blocks
            .flat_map(|b| (0..16).map(move |t| (b, KvClass::F16, t)))
            .collect()
    };
    let ops2 = Ops {
        quantize: vec![
            Quantize {
                class: KvClass::Int4,
                dst_slot: 13,
                start: 0,
                src: src(4..8),
            },
            Quantize {
                class: KvClass::Int2,
                dst_slot: 14,
                start: 0,
                src: src(4..12),
            },
            Quantize {
                class: KvClass::Fp8,
                dst_slot: 15,
                start: 0,
                src: src(4..6),
            },
        ],
        ..Default::default()
    };
    moves.run(&gpu, &layout, &mut pool, &ops2).unwrap();
    // Pass 3: the same INT2 block one 64-token key group at a time into slot 16 (a job per
    // pass: the kernel reads the block it appends to, so one launch may not name it twice).
    let half = |start: u32, blocks: std::ops::Range<u32>| Quantize {
        class: KvClass::Int2,
        dst_slot: 16,
        start,
        src: src(blocks),
    };
    let twice = Ops {
        quantize: vec![half(0, 4..8), half(64, 8..12)],
        ..Default::default()
    };
    let e = moves.run(&gpu, &layout, &mut pool, &twice).unwrap_err();
    assert!(e.to_string().contains("named by an earlier job"), "{e}");
    let misaligned = Ops {
        quantize: vec![half(32, 4..6)],
        ..Default::default()
    };
    assert!(moves.run(&gpu, &layout, &mut pool, &misaligned).is_err());
    for q in [half(0, 4..8), half(64, 8..12)] {
        let ops = Ops {
            quantize: vec![q],
            ..Default::default()
        };
        moves.run(&gpu, &layout, &mut pool, &ops).unwrap();
    }
    // Pass 4: the first 64 of the INT2 block's 16-bit copies wait in FP8 blocks 17 and 18
    // (fixed scale, written a token at a time over two launches); pass 5: a key group
    // quantized from them into INT2 slot 19.
    let mut wait = Ops {
        zero: vec![17, 18],
        ..Default::default()
    };
    for t in 0..64u32 {
        wait.moves.push(Move {
            src_slot: 4 + t / 16,
            src_class: KvClass::F16,
            src_tok: t % 16,
            dst_slot: 17 + t / 32,
            dst_class: KvClass::Fp8,
            dst_tok: t % 32,
        });
    }
    let (first, second) = wait.moves.split_at(40);
    let mut ops = Ops {
        zero: wait.zero.clone(),
        moves: first.to_vec(),
        ..Default::default()
    };
    moves.run(&gpu, &layout, &mut pool, &ops).unwrap();
    ops = Ops {
        moves: second.to_vec(),
        ..Default::default()
    };
    moves.run(&gpu, &layout, &mut pool, &ops).unwrap();
    let from_fp8 = Ops {
        quantize: vec![Quantize {
            class: KvClass::Int2,
            dst_slot: 19,
            start: 0,
            src: (0..64u32)
                .map(|t| (17 + t / 32, KvClass::Fp8, t % 32))
                .collect(),
        }],
        ..Default::default()
    };
    moves.run(&gpu, &layout, &mut pool, &from_fp8).unwrap();
    let got = gpu.download(&pool).unwrap();
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    let g16 = *layout.geom(KvClass::F16);
    let mut worst = 0f32;
    for l in 0..layers {
        let base = l * layout.pool_bytes();
        let read16 = |slot: usize, h: usize, len: usize| {
            let at = base + layout.slab_offset(slot, h);
            QuantizedBlock::unpack(g16, &got[at..at + g16.slab_bytes()], len)
                .unwrap()
                .dequantize()
        };
        for h in 0..kv_heads {
            // The INT2 block's 128 tokens, 16-bit.
            let (dk, dv) = &decoded[l][1][h];
            let mut k16 = Vec::new();
            let mut v16 = Vec::new();
            for b in 0..8 {
                let (k, v) = read16(4 + b, h, 16);
                k16.extend_from_slice(&k);
                v16.extend_from_slice(&v);
            }
            for (a, b) in k16.iter().zip(dk).chain(v16.iter().zip(dv)) {
                worst = worst.max((a - f16(*b)).abs());
            }
            // The picked tokens.
            let (k, v) = read16(12, h, picks.len());
            for (i, &(s, _, t)) in picks.iter().enumerate() {
                let (dk, dv) = &decoded[l][s as usize][h];
                let t = t as usize;
                for e in 0..d {
                    worst = worst.max((k[i * d + e] - f16(dk[t * d + e])).abs());
                    worst = worst.max((v[i * d + e] - f16(dv[t * d + e])).abs());
                }
            }
            // Quantized from the 16-bit copies: byte-identical to the CPU packer.
            for (slot, c, n) in [
                (13usize, KvClass::Int4, 64usize),
                (14, KvClass::Int2, 128),
                (15, KvClass::Fp8, 32),
            ] {
                let g = *layout.geom(c);
                let want = QuantizedBlock::quantize(g, &k16[..n * d], &v16[..n * d])
                    .unwrap()
                    .pack();
                let at = base + layout.slab_offset(slot, h);
                assert_eq!(
                    &got[at..at + want.len()],
                    &want[..],
                    "layer {l} head {h}: {c:?} block from 16-bit staging differs from the CPU packer"
                );
            }
            // Filled a key group at a time: the same bytes, slab and all.
            let (whole, halves) = (
                base + layout.slab_offset(14, h),
                base + layout.slab_offset(16, h),
            );
            assert_eq!(
                &got[halves..halves + layout.slab_bytes],
                &got[whole..whole + layout.slab_bytes],
                "layer {l} head {h}: INT2 block appended per key group differs from one quantize"
            );
            // Waiting in FP8: each value E4M3-rounded at scale 1, exactly; the INT2 group
            // quantized from them is the CPU packer's of those values.
            let round = |x: &f32| e4m3_decode(e4m3_encode(*x));
            let k8: Vec<f32> = k16[..64 * d].iter().map(round).collect();
            let v8: Vec<f32> = v16[..64 * d].iter().map(round).collect();
            let g8 = *layout.geom(KvClass::Fp8);
            for b in 0..2 {
                let at = base + layout.slab_offset(17 + b, h);
                let (k, v) = QuantizedBlock::unpack(g8, &got[at..at + g8.slab_bytes()], 32)
                    .unwrap()
                    .dequantize();
                let r = b * 32 * d..(b + 1) * 32 * d;
                assert_eq!(
                    &k[..],
                    &k8[r.clone()],
                    "layer {l} head {h}: FP8 waiting keys"
                );
                assert_eq!(&v[..], &v8[r], "layer {l} head {h}: FP8 waiting values");
            }
            let g2 = *layout.geom(KvClass::Int2);
            let want = QuantizedBlock::quantize(g2, &k8, &v8).unwrap().pack();
            let at = base + layout.slab_offset(19, h);
            assert_eq!(
                &got[at..at + want.len()],
                &want[..],
                "layer {l} head {h}: INT2 group quantized from FP8 waiting blocks differs"
            );
        }
    }
    assert!(
        worst < 1e-3,
        "moved tokens differ from the CPU's decoded values by {worst}"
    );
    eprintln!("token moves: 2 layers × {kv_heads} heads, max |Δ| {worst:.2e}; 3 quantized blocks byte-identical, INT2 appended per key group identical, FP8 waiting exact and INT2 from it byte-identical");
}

/// Feed `seqs` (ids, tags, prompt length) through `backend` as the engine does — prompt
/// chunks of 40 of every sequence in one prefill pass, then teacher-forced decode tokens of
/// every sequence in one decode step — and return, per sequence, the logits at its last
/// prompt token and every decode token; the pool must be whole once the caches drop.
fn feed_backend<E: triaxkv::gpu::serve_bench::Executor + Send + 'static>(
    backend: &triaxkv::gpu::GpuBackend<E>,
    seqs: &[(Vec<u32>, Vec<triaxkv::tags::TokenTag>, usize)],
    what: &str,
) -> (Vec<Vec<Vec<f32>>>, triaxkv::runtime::KvUsage) {
    use triaxkv::runtime::{Backend, Work};
    let mut caches: Vec<_> = seqs.iter().map(|_| backend.new_seq().unwrap()).collect();
    let mut fed = vec![0usize; seqs.len()];
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
    while fed.iter().zip(seqs).any(|(&f, s)| f + 1 < s.0.len()) {
        let mut plan = Vec::new();
        let batch: Vec<Work<'_, _>> = caches
            .iter_mut()
            .enumerate()
            .filter(|&(s, _)| fed[s] + 1 < seqs[s].0.len())
            .map(|(s, seq)| {
                let p = seqs[s].2;
                let end = if fed[s] < p {
                    (fed[s] + 40).min(p)
                } else {
                    fed[s] + 1
                };
                plan.push((s, end));
                Work {
                    seq,
                    tokens: &seqs[s].0[fed[s]..end],
                    tags: &seqs[s].1[fed[s]..end],
                    logits: end >= p,
                    media: None,
                }
            })
            .collect();
        let out = backend.step(batch);
        for (&(s, end), r) in plan.iter().zip(out) {
            let l = r.unwrap_or_else(|e| panic!("{what} sequence {s}: {e}"));
            if end >= seqs[s].2 {
                assert!(l.iter().all(|x| x.is_finite()), "{what}: non-finite logit");
                got[s].push(l);
            }
            fed[s] = end;
        }
    }
    let usage = backend.usage(&caches[0]);
    drop(caches);
    let (free, total) = backend.pool_slots();
    assert_eq!(free, total, "{what}: slots leaked");
    (got, usage)
}

/// max |a - b| and the rows whose top-1 token agrees, over every sampled row.
fn logit_gap(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> (f32, usize, usize) {
    let am = |x: &[f32]| (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j]));
    let (mut d, mut same, mut rows) = (0f32, 0, 0);
    for (sa, sb) in a.iter().zip(b) {
        assert_eq!(sa.len(), sb.len(), "sampled rows");
        for (x, y) in sa.iter().zip(sb) {
            for (p, q) in x.iter().zip(y) {
                d = d.max((p - q).abs());
            }
            same += usize::from(am(x) == am(y));
            rows += 1;
        }
    }
    (d, same, rows)
}

/// `GpuBackend` (what `serve --gpu` runs) on tiny random models (head dim 64 zero-padded, and
/// 128 with Qwen3's q/k norm), two sequences batched as the engine batches them:
/// - every token 16-bit (blocks leaving the window relabelled, no copy), and INT4 with a
///   window longer than the sequences (nothing leaves 16 bits): the logits of `GpuForward`
///   running each sequence alone, within 1e-3 × max |logit|;
/// - INT4 past 4 sinks and a 16-token window (tokens moved and quantized on the device, the
///   kernels checked against the CPU in the tests above): a sequence batched with another
///   gives its logits run alone (no block of one read for the other); the logits stay near
///   16-bit ones, nearer than INT2's, and the cache holds packed blocks;
/// - FP8 holding (generated tokens written straight into the waiting blocks; a window kept
///   there): batched as alone, within INT4's bound of 16 bits.
#[test]
fn serve_backend_matches_gpu_forward() {
    use triaxkv::gpu::{GpuBackend, GpuForward, PoolSpec};
    use triaxkv::model::config::Arch;
    use triaxkv::paged::pool::{ClassMap, Fp8Hold};
    let Some(gpu) = gpu_or_skip("serve_backend_matches_gpu_forward") else {
        return;
    };
    for (arch, head_dim, qk_norm) in [(Arch::Llama, 64, false), (Arch::Qwen3, 128, true)] {
        let model = tiny_model(arch, head_dim, qk_norm);
        let v = model.config.vocab_size;
        // (prompt length, decode tokens) of each sequence; ids differ between them.
        let seqs = serve_seqs(v);
        // Reference: each sequence alone through the forward.
        let mut want: Vec<Vec<Vec<f32>>> = Vec::new();
        for (ids, _, p) in &seqs {
            let mut fwd = GpuForward::new(&gpu, "tiny", &model, 256, 64).unwrap();
            let mut rows = Vec::new();
            let mut last = Vec::new();
            for c in ids[..*p].chunks(64) {
                last = fwd.prefill(&gpu, c).unwrap();
            }
            rows.push(last[last.len() - v..].to_vec());
            for &id in &ids[*p..ids.len() - 1] {
                rows.push(fwd.step(&gpu, id).unwrap());
            }
            want.push(rows);
        }
        let max_ref = want
            .iter()
            .flatten()
            .flatten()
            .fold(0f32, |m, &x| m.max(x.abs()));
        // Key groups of 64 (the default) everywhere but the value-group-128 check.
        let open_vg = |map: ClassMap, v_group: usize, label: &str| {
            let ctx = GpuContext::open(0).unwrap();
            let spec = PoolSpec {
                v_group,
                k_group: if v_group == 128 { 128 } else { 64 },
                ..PoolSpec::new(map, 64 << 20)
            };
            GpuBackend::open(ctx, "tiny", &model, spec, 128, label).unwrap()
        };
        let open = |map: ClassMap, label: &str| open_vg(map, 64, label);
        let tag = format!("{arch:?} hd {head_dim}");
        for (label, map) in [
            ("f16", ClassMap::uniform(KvClass::F16, 0, 0)),
            (
                "int4, window 1000",
                ClassMap::uniform(KvClass::Int4, 4, 1000),
            ),
        ] {
            let (got, usage) = feed_backend(&open(map, label), &seqs, label);
            let (d, same, rows) = logit_gap(&got, &want);
            eprintln!(
                "serve backend {tag} {label}: max |Δlogit| vs forward {d:.3e} (max |logit| \
                 {max_ref:.3}), top-1 equal {same}/{rows}"
            );
            assert!(d < 1e-3 * max_ref, "{tag} {label}: max |Δlogit| {d:.3e}");
            assert_eq!(usage.packed, 0, "{tag} {label}: tokens left 16 bits");
        }
        let mut quantized = Vec::new();
        for class in [KvClass::Int4, KvClass::Int2] {
            let label = format!("{class:?}, window 16");
            let backend = open(ClassMap::uniform(class, 4, 16), &label);
            let (got, usage) = feed_backend(&backend, &seqs, &label);
            assert!(usage.packed > 0, "{tag} {label}: nothing was quantized");
            let (alone, _) = feed_backend(&backend, &seqs[..1], &label);
            let (d_alone, ..) = logit_gap(&alone, &got[..1]);
            let (d, same, rows) = logit_gap(&got, &want);
            eprintln!(
                "serve backend {tag} {label}: max |Δlogit| vs 16-bit {d:.3e}, top-1 equal \
                 {same}/{rows}; batched vs alone {d_alone:.3e}; {} packed bytes, {} 16-bit",
                usage.packed, usage.half
            );
            assert!(
                d_alone < 1e-3 * max_ref,
                "{tag} {label}: batched vs alone {d_alone:.3e}"
            );
            quantized.push((d, same, rows));
        }
        if head_dim == 128 {
            // Whole-head value groups: smaller INT2 slabs (9,216 bytes, not 9,728), the
            // same batching invariance.
            let label = "Int2, window 16, value group 128";
            let backend = open_vg(ClassMap::uniform(KvClass::Int2, 4, 16), 128, label);
            let (got, usage) = feed_backend(&backend, &seqs, label);
            let (alone, _) = feed_backend(&backend, &seqs[..1], label);
            let (d_alone, ..) = logit_gap(&alone, &got[..1]);
            let (d, same, rows) = logit_gap(&got, &want);
            eprintln!(
                "serve backend {tag} {label}: max |Δlogit| vs 16-bit {d:.3e}, top-1 equal \
                 {same}/{rows}; batched vs alone {d_alone:.3e}; {} packed bytes",
                usage.packed
            );
            assert!(
                d.is_finite() && d_alone < 1e-3 * max_ref,
                "{tag} {label}: {d_alone:.3e}"
            );
            assert_eq!(
                usage.packed % 9216,
                0,
                "{tag} {label}: {} packed bytes",
                usage.packed
            );
        }
        // FP8 holding against the same pool without it: the same batched as alone, and within
        // the bound INT4 keeps to 16 bits. Generated tokens written straight into the FP8 waiting
        // blocks (`serve --gpu --wait-fp8 --sinks-fp8 --decode-fp8`, window 0) against a 16-bit
        // stream first; a 32-token window kept in the FP8 waiting blocks (`--window-fp8`, a
        // `--hold-fp8` profile) against the same window at 16 bits.
        let fp8_pool = |window: usize, direct: bool, label: &str| {
            let fp8 = Fp8Hold {
                wait: true,
                sinks: true,
                decode: direct,
                window: direct && window > 0,
            };
            uniform_backend(&model, KvClass::Int4, window, fp8, label)
        };
        for (window, what) in [(0, "decode fp8"), (32, "window 32 in fp8")] {
            let (base, _) = feed_backend(&fp8_pool(window, false, "16-bit"), &seqs, "16-bit");
            let direct = fp8_pool(window, true, what);
            let (got, _) = feed_backend(&direct, &seqs, what);
            let (alone, _) = feed_backend(&direct, &seqs[..1], what);
            let (d_alone, ..) = logit_gap(&alone, &got[..1]);
            let (d_fp8, same, rows) = logit_gap(&got, &base);
            eprintln!(
                "serve backend {tag} Int4 window {window}, {what}: max |Δlogit| vs 16 bits \
                 {d_fp8:.3e}, top-1 equal {same}/{rows}; batched vs alone {d_alone:.3e}"
            );
            assert!(
                d_alone < 1e-3 * max_ref,
                "{tag} {what}: batched vs alone {d_alone:.3e}"
            );
            // Not "nearer than INT4": on this random model any change of INT4 codes moves
            // the max logit gap by ~0.6 (the GPU's bf16 activations alone take it 0.64 from
            // the CPU cache at INT4, `serve_backend_fp8_holding_matches_the_cpu_cache`, where
            // FP8 holding is checked against the CPU's model of it); the INT4 bound below.
            assert!(
                d_fp8.is_finite() && d_fp8 < 0.25 * max_ref,
                "{tag} {what}: {d_fp8:.3e} from 16 bits (max |logit| {max_ref:.3})"
            );
        }
        let ((d4, same4, rows), (d2, _, _)) = (quantized[0], quantized[1]);
        assert!(
            d4 < d2,
            "{tag}: INT4 ({d4:.3e}) not nearer 16-bit than INT2 ({d2:.3e})"
        );
        // Top-1 over 70 rows is too coarse to order INT4 and INT2 with 64-token key groups
        // (57 vs 58 of 70 on the Llama case): the logit gap orders them (above).
        assert!(same4 * 10 >= rows * 7, "{tag}: INT4 top-1 {same4}/{rows}");
        assert!(d4 < 0.25 * max_ref, "{tag}: INT4 max |Δlogit| {d4:.3e}");
    }
}

/// A two-layer random-weight shape with head dim 128 for the serving tests.
fn tiny_serve_shape() -> triaxkv::gpu::decode_step::ModelShape {
    triaxkv::gpu::decode_step::ModelShape {
        name: "tiny".into(),
        layers: 2,
        hidden: 256,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 128,
        intermediate: 512,
        vocab: 512,
        rope_theta: 10_000.0,
        rope_scaling: triaxkv::model::config::RopeScaling::None,
        rms_eps: 1e-5,
        qk_norm: false,
    }
}

/// `bench serve` (unless `--separate-steps`) runs an iteration's decode rows and prefill chunks as one step;
/// the same schedule served in separate steps must generate the same greedy tokens (the
/// GEMMs differ in rows only, so ties aside every token is equal).
#[test]
fn fused_step_generates_what_separate_steps_do() {
    use triaxkv::gpu::decode_step::{DecodeStep, DeviceWeights};
    use triaxkv::gpu::serve_bench::{
        pool_layout, serve_cache, BenchCache, GpuExec, HostCheck, ServeBenchConfig,
    };
    use triaxkv::paged::pool::ClassMap;
    use triaxkv::paged::workload::{Session, Turn, Workload, SCHEMA};
    use triaxkv::tags::Role;
    let Some(gpu) = gpu_or_skip("fused_step_generates_what_separate_steps_do") else {
        return;
    };
    let shape = tiny_serve_shape();
    let role = |r: Role| Role::ALL.iter().position(|&x| x == r).unwrap_or(0) as u8;
    let sessions = (0..6)
        .map(|i| {
            let mut s = Session {
                id: format!("s{i}"),
                file: "synthetic".into(),
                ids: vec![],
                role: vec![],
                modality: vec![],
                turn: vec![],
                step: vec![],
                turns: vec![],
            };
            let push = |s: &mut Session, r: Role, n: usize, t: u32| {
                for _ in 0..n {
                    let k = s.ids.len();
                    s.ids.push(((k * 131 + i * 17 + 7) % 512) as u32);
                    s.role.push(role(r));
                    s.modality.push(0);
                    s.turn.push(t);
                    s.step.push(t);
                }
            };
            push(&mut s, Role::System, 200 + 41 * i, 0);
            for t in 1..=4u32 {
                push(&mut s, Role::User, 30 + 9 * i, t);
                let start = s.ids.len();
                push(&mut s, Role::Assistant, 24, t);
                s.turns.push(Turn { start, gen: 24 });
                push(&mut s, Role::Observation, 120 + 13 * i, t);
            }
            s
        })
        .collect();
    let work = Workload {
        schema: SCHEMA.into(),
        tokenizer: "synthetic".into(),
        max_context: 1 << 20,
        max_gen: 24,
        sessions,
    };
    let w = DeviceWeights::random(&gpu, &shape, 7).unwrap();
    for (name, map) in [
        ("bf16", ClassMap::uniform(KvClass::F16, 0, 0)),
        ("int4", ClassMap::uniform(KvClass::Int4, 4, 16)),
    ] {
        let bc = BenchCache {
            name: name.into(),
            map,
            hold_fp8: false,
            key_outliers: 0.0,
        };
        let mut ids = Vec::new();
        let mut fused_steps = 0;
        for fused_step in [false, true] {
            let cfg = ServeBenchConfig {
                clients: 8,
                chunk: 128,
                max_batch: 16,
                seed: 7,
                fused_step,
                ..ServeBenchConfig::new(shape.clone(), 64 << 20)
            };
            let max_rows = cfg.max_rows();
            let mut step = DecodeStep::new(&gpu, &shape, max_rows, cfg.v_group).unwrap();
            let (layout, _) = pool_layout(&cfg, &bc.map).unwrap();
            let mut exec = GpuExec::new(&gpu, &mut step, &w, &layout, 1024, true)
                .unwrap()
                .recording_next_ids();
            let row =
                serve_cache(&mut exec, &cfg, &work, &bc, max_rows, Some(150), |_| {}).unwrap();
            assert_eq!(row.leaked_slots, 0, "{name} fused {fused_step}");
            ids.push(exec.recorded_next_ids().unwrap().to_vec());
            if fused_step {
                // The same schedule on the host checker counts the steps that were fused.
                let mut check = HostCheck::default();
                serve_cache(&mut check, &cfg, &work, &bc, max_rows, Some(150), |_| {}).unwrap();
                fused_steps = check.mixed;
            }
        }
        let (sep, fus) = (&ids[0], &ids[1]);
        assert_eq!(sep.len(), fus.len(), "{name}: decode steps");
        let mut total = 0;
        let mut differ = 0;
        for (a, b) in sep.iter().zip(fus) {
            assert_eq!(a.len(), b.len(), "{name}: rows of a decode step");
            total += a.len();
            differ += a.iter().zip(b).filter(|(x, y)| x != y).count();
        }
        eprintln!(
            "fused step {name}: {differ} of {total} greedy tokens differ from separate steps \
             ({} decode steps, {fused_steps} of them fused)",
            sep.len()
        );
        assert!(total > 500, "{name}: only {total} decode rows");
        assert!(fused_steps >= 10, "{name}: {fused_steps} fused steps");
        assert!(
            differ * 100 <= total,
            "{name}: {differ} of {total} tokens differ"
        );
    }
}

/// A generated token written straight into an FP8 waiting block (`bench serve --decode-fp8`)
/// holds the bytes the pool's move of the same token from a 16-bit block writes there in
/// layer 0, every KV head (E4M3 codes and the block's scales; one code apart where fp16 then
/// E4M3 rounds twice); in later layers, which see the token through layer 0's attention read
/// at fp16 (moved) or E4M3 (direct), near them (H200, 2026-12-05: layer 0 1 byte of 528
/// differs, layer 1 3.5% relative distance).
#[test]
fn decode_append_into_fp8_writes_what_a_move_does() {
    use triaxkv::gpu::decode_step::{DecodeStep, DeviceWeights};
    use triaxkv::gpu::serve_bench::{pool_layout, Executor, GpuExec, ServeBenchConfig, StepRows};
    use triaxkv::paged::pool::{ClassMap, Fp8Hold, Move, Ops};
    let Some(gpu) = gpu_or_skip("decode_append_into_fp8_writes_what_a_move_does") else {
        return;
    };
    let shape = tiny_serve_shape();
    let cfg = ServeBenchConfig {
        chunk: 64,
        max_batch: 4,
        fp8: Fp8Hold {
            wait: true,
            sinks: true,
            decode: true,
            window: false,
        },
        ..ServeBenchConfig::new(shape.clone(), 16 << 20)
    };
    let map = ClassMap::uniform(KvClass::Int2, 4, 0);
    let w = DeviceWeights::random(&gpu, &shape, 11).unwrap();
    let mut step = DecodeStep::new(&gpu, &shape, cfg.max_rows(), cfg.v_group).unwrap();
    let (layout, _) = pool_layout(&cfg, &map).unwrap();
    let mut exec = GpuExec::new(&gpu, &mut step, &w, &layout, 64, false).unwrap();
    let one = |class: KvClass, slot: usize| {
        let mut l = layout.clone();
        l.seqs = 1;
        l.push(class, 0, slot, 1);
        l.slots = layout.slots;
        l
    };
    let rows = |slot: i32, fp8: i32| StepRows {
        ids: vec![77],
        pos: vec![300],
        slots: vec![slot],
        toks: vec![0],
        fp8: vec![fp8],
    };
    exec.pool_ops(
        &layout,
        &Ops {
            zero: vec![0, 1, 2],
            ..Default::default()
        },
    )
    .unwrap();
    // Into a 16-bit block, then moved into FP8 block 1 as the pool moves a waiting token.
    exec.decode(&one(KvClass::F16, 0), &rows(0, 0)).unwrap();
    let mv = Move {
        src_slot: 0,
        src_class: KvClass::F16,
        src_tok: 0,
        dst_slot: 1,
        dst_class: KvClass::Fp8,
        dst_tok: 0,
    };
    exec.pool_ops(
        &layout,
        &Ops {
            moves: vec![mv],
            ..Default::default()
        },
    )
    .unwrap();
    // The same token written straight into FP8 block 2.
    exec.decode(&one(KvClass::Fp8, 2), &rows(2, 1)).unwrap();
    let pool = exec.pool_bytes().unwrap();
    let slab = layout.slab_bytes;
    let at = |l: usize, s: usize, h: usize| ((l * layout.slots + s) * layout.kv_heads + h) * slab;
    let codes = layout.geom(KvClass::Fp8).k_scale_offset();
    let mut nonzero = 0;
    for l in 0..shape.layers {
        let (mut differ, mut far, mut err2, mut ref2) = (0, 0, 0f64, 0f64);
        for h in 0..shape.kv_heads {
            let (a, b) = (at(l, 1, h), at(l, 2, h));
            for (i, (x, y)) in pool[a..a + slab].iter().zip(&pool[b..b + slab]).enumerate() {
                nonzero += usize::from(*y != 0);
                if i < codes {
                    let (dx, dy) = (e4m3_decode(*x) as f64, e4m3_decode(*y) as f64);
                    err2 += (dx - dy).powi(2);
                    ref2 += dx * dx;
                }
                if x != y {
                    differ += 1;
                    far += usize::from((*x as i32 - *y as i32).abs() > 1);
                }
            }
        }
        let rel = (err2 / ref2.max(1e-30)).sqrt();
        eprintln!(
            "decode append into FP8, layer {l}: {differ} bytes differ from the move's ({far} by \
             more than one code), relative L2 distance of the decoded values {rel:.3e}"
        );
        if l == 0 {
            // The same f32 k/v: E4M3 codes one step apart at most (fp16 then E4M3 rounds
            // twice), and rarely.
            assert_eq!(far, 0, "layer 0");
            assert!(differ <= 8, "layer 0: {differ} bytes differ");
        } else {
            // Later layers see layer 0's attention read the token at fp16 (moved) or E4M3
            // (direct): near, not equal.
            assert!(rel < 0.1, "layer {l}: relative distance {rel:.3e}");
        }
    }
    // Two layers × two heads × (128 K + 128 V codes + two 4-byte scales), most nonzero.
    assert!(nonzero > 600, "{nonzero} nonzero bytes");
}

/// `GpuBackend` over 64 MiB of `class` everywhere past 4 sinks and a `window`, with `fp8`
/// holding, in steps of at most 128 rows.
fn uniform_backend(
    model: &triaxkv::model::llama::Model,
    class: KvClass,
    window: usize,
    fp8: triaxkv::paged::pool::Fp8Hold,
    label: &str,
) -> triaxkv::gpu::GpuBackend<triaxkv::gpu::GpuDevice> {
    use triaxkv::gpu::{GpuBackend, PoolSpec};
    use triaxkv::paged::pool::ClassMap;
    let spec = PoolSpec {
        fp8,
        ..PoolSpec::new(ClassMap::uniform(class, 4, window), 64 << 20)
    };
    GpuBackend::open(
        GpuContext::open(0).unwrap(),
        "tiny",
        model,
        spec,
        128,
        label,
    )
    .unwrap()
}

/// Two sequences (prompt, generated) of the serve-backend tests, ids and tags; a prompt
/// chunk is at most 40 tokens (`feed_backend`).
type Seqs = Vec<(Vec<u32>, Vec<triaxkv::tags::TokenTag>, usize)>;

fn serve_seqs(vocab: usize) -> Seqs {
    use triaxkv::tags::{Modality, Role, TokenTag};
    [(150usize, 30usize), (97, 40)]
        .iter()
        .enumerate()
        .map(|(s, &(p, d))| {
            let ids = (0..p + d)
                .map(|k| ((k * 97 + 13 + s * 31) % vocab) as u32)
                .collect();
            let tags = (0..p + d)
                .map(|k| TokenTag {
                    role: if k < p { Role::User } else { Role::Assistant },
                    modality: Modality::Text,
                    turn: 1,
                    step: 1,
                })
                .collect();
            (ids, tags, p)
        })
        .collect()
}

/// The CPU model over a `QuantCache` of `class` everywhere, fed as `feed_backend` feeds the
/// GPU: the prompt's last logits, then one row per generated token but the last.
fn cpu_cache_logits(
    model: &triaxkv::model::llama::Model,
    seqs: &Seqs,
    class: triaxkv::kvcache::quantized::PrecisionClass,
    cfg: triaxkv::kvcache::quantized::QuantCacheConfig,
) -> Vec<Vec<Vec<f32>>> {
    use triaxkv::kvcache::quantized::{KvPolicy, QuantCache};
    use triaxkv::kvcache::KvShape;
    use triaxkv::model::llama::Logits;
    let c = &model.config;
    let shape = KvShape {
        num_layers: c.num_layers,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    seqs.iter()
        .map(|(ids, tags, p)| {
            let mut cache =
                QuantCache::new(shape, KvPolicy::uniform(c.num_layers, class), cfg).unwrap();
            let mut last = Vec::new();
            for (i, t) in ids[..*p].chunks(40).zip(tags[..*p].chunks(40)) {
                last = model.forward(i, t, &mut cache, Logits::Last);
            }
            let mut rows = vec![last];
            for k in *p..ids.len() - 1 {
                rows.push(model.forward(&ids[k..k + 1], &tags[k..k + 1], &mut cache, Logits::Last));
            }
            rows
        })
        .collect()
}

/// The serve backend holding tokens in FP8 waiting blocks (waiting for a key group, the
/// sinks, generated tokens written straight there, a window kept there) against the CPU
/// cache that models each (`QuantCacheConfig::{wait_fp8, sinks_fp8, window_fp8}`): the GPU's
/// distance from the CPU stays near the distance it has with every window token 16-bit.
#[test]
fn serve_backend_fp8_holding_matches_the_cpu_cache() {
    use triaxkv::kvcache::quantized::{PrecisionClass, QuantCacheConfig};
    use triaxkv::model::config::Arch;
    use triaxkv::paged::pool::Fp8Hold;
    let Some(_gpu) = gpu_or_skip("serve_backend_fp8_holding_matches_the_cpu_cache") else {
        return;
    };
    let model = tiny_model(Arch::Llama, 64, false);
    let seqs = serve_seqs(model.config.vocab_size);
    let int4 = PrecisionClass::new(4, 4).unwrap();
    let gpu_logits = |class: KvClass, window: usize, fp8: Fp8Hold, label: &str| {
        let backend = uniform_backend(&model, class, window, fp8, label);
        feed_backend(&backend, &seqs, label).0
    };
    let hold = |decode: bool, window: bool| Fp8Hold {
        wait: true,
        sinks: true,
        decode,
        window,
    };
    let cpu = |window: usize, wait: bool, window_fp8: bool| QuantCacheConfig {
        sinks: 4,
        window,
        wait_fp8: wait,
        sinks_fp8: wait,
        window_fp8,
        ..QuantCacheConfig::default()
    };
    let f16_gpu = gpu_logits(KvClass::F16, 0, Fp8Hold::default(), "f16");
    let f16_cpu = cpu_cache_logits(&model, &seqs, PrecisionClass::FULL, cpu(0, false, false));
    let (d_f16, ..) = logit_gap(&f16_gpu, &f16_cpu);
    let mut gaps = Vec::new();
    for (label, window, fp8, cfg) in [
        ("int4 w32", 32, Fp8Hold::default(), cpu(32, false, false)),
        (
            "int4 w32, waiting+sinks fp8",
            32,
            hold(false, false),
            cpu(32, true, false),
        ),
        (
            "int4 w32, window fp8",
            32,
            hold(true, true),
            cpu(32, true, true),
        ),
        (
            "int4 w0, waiting+sinks fp8",
            0,
            hold(false, false),
            cpu(0, true, false),
        ),
        (
            "int4 w0, decode fp8",
            0,
            hold(true, false),
            cpu(0, true, false),
        ),
    ] {
        let g = gpu_logits(KvClass::Int4, window, fp8, label);
        let c = cpu_cache_logits(&model, &seqs, int4, cfg);
        let (d, same, rows) = logit_gap(&g, &c);
        let (d16, ..) = logit_gap(&g, &f16_gpu);
        let (c16, ..) = logit_gap(&c, &f16_cpu);
        eprintln!(
            "fp8 holding {label}: GPU vs CPU cache max |Δlogit| {d:.3e} (top-1 {same}/{rows}); \
             from 16 bits: GPU {d16:.3e}, CPU {c16:.3e}"
        );
        gaps.push((label, d));
    }
    eprintln!("fp8 holding: f16 GPU vs CPU {d_f16:.3e}");
    let base = gaps[0].1.max(d_f16);
    for (label, d) in gaps {
        assert!(
            d < 3.0 * base,
            "{label}: GPU {d:.3e} from the CPU cache, int4 w32 {base:.3e}"
        );
    }
}
