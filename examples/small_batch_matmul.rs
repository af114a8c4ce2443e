//! Times the serving engine's small-batch product (`runtime::cpu_batch::matmul_small_batch`)
//! against the forward pass's `matmul` on SmolLM2's shapes, for a few rows (decode steps of
//! several sequences). Best of 15 runs each, interleaved.
//!
//!     cargo run --example small_batch_matmul

use std::time::Instant;
use triaxkv::model::llama::matmul;
use triaxkv::model::weights::Matrix;
use triaxkv::runtime::cpu_batch::matmul_small_batch;

type Product = fn(&mut [f32], &[f32], usize, &Matrix);

fn main() {
    println!("threads: {}", rayon::current_num_threads());
    for (rows, cols) in [(1536usize, 576usize), (49152, 576)] {
        let w = Matrix {
            rows,
            cols,
            data: (0..rows * cols).map(|i| (i % 13) as f32 * 0.01).collect(),
        };
        for n in [1usize, 4, 16, 32] {
            let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 * 0.1).collect();
            let mut out = vec![0.0; n * rows];
            let mut best = [f64::MAX; 2];
            let products: [Product; 2] = [matmul, matmul_small_batch];
            for _ in 0..15 {
                for (k, f) in products.iter().enumerate() {
                    let t = Instant::now();
                    f(&mut out, &x, n, &w);
                    best[k] = best[k].min(t.elapsed().as_secs_f64());
                }
            }
            println!(
                "{rows}x{cols} n={n}: matmul {:.2} ms, small batch {:.2} ms",
                best[0] * 1e3,
                best[1] * 1e3
            );
        }
    }
}
