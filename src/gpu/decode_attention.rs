//! Launcher of `kernels/decode_attention.cu`: paged decode attention over packed blocks of
//! mixed precision classes (one launch per class present, then the log-sum-exp merge).
//! The blocks are the bytes of `quant::layout` (`docs/KV_LAYOUT.md`); head dim 128.

use super::context::GpuContext;
use super::nvrtc::DECODE_ATTENTION;
use super::{DriverResult, GpuError};
use crate::quant::layout::{BlockGeometry, KvClass, QuantizedBlock};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use std::sync::Arc;

/// The head dimension the kernel is compiled for.
pub const HEAD_DIM: usize = 128;
/// Query heads per KV head the kernel takes (one `m16` mma tile, rows >= gqa zero).
pub const MAX_GQA: usize = 8;
/// Value group sizes with a compiled entry point.
pub const V_GROUPS: [usize; 3] = [32, 64, 128];
const NWARPS: u32 = 4;
pub(super) const NUM_CLASSES: usize = 4;

/// Index of a class in the kernel's order (`CLASS_F16, CLASS_INT4, CLASS_INT2, CLASS_FP8`).
pub fn class_index(c: KvClass) -> usize {
    match c {
        KvClass::F16 => 0,
        KvClass::Int4 => 1,
        KvClass::Int2 => 2,
        KvClass::Fp8 => 3,
    }
}

fn class_name(c: KvClass) -> &'static str {
    match c {
        KvClass::F16 => "f16",
        KvClass::Int4 => "int4",
        KvClass::Int2 => "int2",
        KvClass::Fp8 => "fp8",
    }
}

/// A slab that fits a block of every geometry.
fn widest_slab(geoms: &[BlockGeometry]) -> usize {
    geoms.iter().map(|g| g.slab_bytes()).max().unwrap_or(0)
}

/// Tokens per per-channel key group the kernels take (`PagedLayout::with_k_group`).
pub const K_GROUPS: [usize; 2] = [64, 128];

/// One block-table entry: a block of sequence `seq` in pool slot `slot` with `tokens` valid
/// tokens (the block's class is the table it sits in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    pub seq: usize,
    pub slot: usize,
    pub tokens: usize,
}

/// Shape of a paged cache of one layer: heads, the geometry of each class, the pool's slab
/// size and one block table per class. Slab `(slot, kv_head)` starts at
/// `(slot * kv_heads + kv_head) * slab_bytes`.
#[derive(Debug, Clone)]
pub struct PagedLayout {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seqs: usize,
    /// In `KvClass::ALL` order.
    pub geoms: [BlockGeometry; NUM_CLASSES],
    pub slab_bytes: usize,
    pub slots: usize,
    /// Per class, in `KvClass::ALL` order.
    pub tables: [Vec<BlockRef>; NUM_CLASSES],
}

impl PagedLayout {
    /// Default geometries (`BlockGeometry::default_for`) with value group `v_group`, a slab
    /// that fits every class, and empty tables.
    pub fn new(
        q_heads: usize,
        kv_heads: usize,
        seqs: usize,
        v_group: usize,
    ) -> Result<Self, GpuError> {
        Self::with_head_dim(q_heads, kv_heads, seqs, HEAD_DIM, v_group)
    }

    /// As `new` for another head dim (a multiple of 64): the quantize-append kernel takes
    /// any; decode attention only `HEAD_DIM`.
    pub fn with_head_dim(
        q_heads: usize,
        kv_heads: usize,
        seqs: usize,
        head_dim: usize,
        v_group: usize,
    ) -> Result<Self, GpuError> {
        let mut geoms = Vec::with_capacity(NUM_CLASSES);
        for c in KvClass::ALL {
            let g = BlockGeometry::default_for(c, head_dim)?;
            geoms.push(BlockGeometry::new(c, g.tokens, head_dim, v_group)?);
        }
        let geoms: [BlockGeometry; NUM_CLASSES] = [geoms[0], geoms[1], geoms[2], geoms[3]];
        let slab_bytes = widest_slab(&geoms);
        let layout = PagedLayout {
            q_heads,
            kv_heads,
            seqs,
            geoms,
            slab_bytes,
            slots: 0,
            tables: Default::default(),
        };
        layout.check_heads()?;
        Ok(layout)
    }

    pub fn head_dim(&self) -> usize {
        self.geoms[0].head_dim
    }

    pub fn gqa(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    pub fn v_group(&self) -> usize {
        self.geoms[class_index(KvClass::Int4)].v_group
    }

    /// Tokens per per-channel key scale group of the INT2 blocks.
    pub fn k_group(&self) -> usize {
        self.geoms[class_index(KvClass::Int2)].k_group
    }

    /// The same layout with INT4 and INT2 keys quantized per channel over `k_group` tokens
    /// (64 or 128: a kernel unit of tiles never straddles a group; a class whose blocks are
    /// smaller keeps one group per block), and a slab that fits every class.
    pub fn with_k_group(mut self, k_group: usize) -> Result<Self, GpuError> {
        if !K_GROUPS.contains(&k_group) {
            return Err(GpuError::Shape(format!(
                "key group of {k_group} tokens: the kernels take {K_GROUPS:?}"
            )));
        }
        for g in self.geoms.iter_mut() {
            if matches!(g.class, KvClass::Int4 | KvClass::Int2) {
                *g = g.with_k_group(k_group.min(g.tokens))?;
            }
        }
        self.slab_bytes = widest_slab(&self.geoms);
        Ok(self)
    }

    /// The same layout with room for `fraction` of every INT4/INT2 key group's elements as
    /// kept outliers (`BlockGeometry::with_k_outliers`, rounded up), and a slab that fits
    /// every class.
    pub fn with_k_outliers(mut self, fraction: f64) -> Result<Self, GpuError> {
        if !(0.0..=0.25).contains(&fraction) {
            return Err(GpuError::Shape(format!(
                "key outliers {fraction}: a fraction between 0 and 0.25"
            )));
        }
        for g in self.geoms.iter_mut() {
            if matches!(g.class, KvClass::Int4 | KvClass::Int2) {
                let n = (fraction * (g.k_group * g.head_dim) as f64).ceil() as usize;
                *g = g.with_k_outliers(n)?;
            }
        }
        self.slab_bytes = widest_slab(&self.geoms);
        Ok(self)
    }

    pub fn geom(&self, c: KvClass) -> &BlockGeometry {
        &self.geoms[class_index(c)]
    }

    pub fn table(&self, c: KvClass) -> &[BlockRef] {
        &self.tables[class_index(c)]
    }

    pub fn pool_bytes(&self) -> usize {
        self.slots * self.kv_heads * self.slab_bytes
    }

    pub fn slab_offset(&self, slot: usize, kv_head: usize) -> usize {
        (slot * self.kv_heads + kv_head) * self.slab_bytes
    }

    /// Add a block of `class` to sequence `seq`'s table; grows `slots` to hold `slot`.
    pub fn push(&mut self, class: KvClass, seq: usize, slot: usize, tokens: usize) {
        self.tables[class_index(class)].push(BlockRef { seq, slot, tokens });
        self.slots = self.slots.max(slot + 1);
    }

    /// Valid tokens of sequence `seq` over all classes.
    pub fn seq_tokens(&self, seq: usize) -> usize {
        self.tables
            .iter()
            .flatten()
            .filter(|b| b.seq == seq)
            .map(|b| b.tokens)
            .sum()
    }

    fn check_heads(&self) -> Result<(), GpuError> {
        let bad = |m: String| Err(GpuError::Shape(m));
        if self.kv_heads == 0 || self.q_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return bad(format!(
                "{} query heads cannot share {} KV heads evenly",
                self.q_heads, self.kv_heads
            ));
        }
        if self.gqa() > MAX_GQA {
            return bad(format!(
                "{} query heads per KV head: the decode kernel takes at most {MAX_GQA}",
                self.gqa()
            ));
        }
        if self.kv_heads > 65535 {
            return bad(format!(
                "{} KV heads exceed the grid's y limit",
                self.kv_heads
            ));
        }
        Ok(())
    }

    /// Everything the kernels rely on: one head dim, one value group of 32/64/128 for both
    /// integer classes, a 16-byte slab that holds every class in use, entries inside the pool
    /// and their block, no slot used twice. (Decode attention also needs head dim 128.)
    pub fn validate(&self) -> Result<(), GpuError> {
        self.check_heads()?;
        let bad = |m: String| Err(GpuError::Shape(m));
        let d = self.head_dim();
        if self.geoms.iter().any(|g| g.head_dim != d) {
            return bad("block geometries of different head dims in one pool".into());
        }
        for (i, c) in KvClass::ALL.iter().enumerate() {
            if self.geoms[i].class != *c {
                return bad(format!("geometry {i} is not of class {}", class_name(*c)));
            }
        }
        let vg = self.v_group();
        if !V_GROUPS.contains(&vg) || vg > d || self.geom(KvClass::Int2).v_group != vg {
            return bad(format!(
                "value groups INT4 {vg} / INT2 {}: the kernel needs one of {V_GROUPS:?} for both",
                self.geom(KvClass::Int2).v_group
            ));
        }
        if self.slab_bytes % 16 != 0 {
            return bad(format!(
                "slab of {} bytes is not 16-byte aligned",
                self.slab_bytes
            ));
        }
        let mut used = vec![false; self.slots];
        for (i, table) in self.tables.iter().enumerate() {
            let g = &self.geoms[i];
            if !table.is_empty() && g.slab_bytes() > self.slab_bytes {
                return bad(format!(
                    "{} blocks need {} bytes per slab, the pool has {}",
                    class_name(g.class),
                    g.slab_bytes(),
                    self.slab_bytes
                ));
            }
            for (e, b) in table.iter().enumerate() {
                let what = format!("{} table entry {e}", class_name(g.class));
                if b.seq >= self.seqs {
                    return bad(format!("{what}: sequence {} of {}", b.seq, self.seqs));
                }
                if b.slot >= self.slots {
                    return bad(format!("{what}: slot {} of {}", b.slot, self.slots));
                }
                if b.tokens == 0 || b.tokens > g.tokens {
                    return bad(format!(
                        "{what}: {} tokens in a block of {}",
                        b.tokens, g.tokens
                    ));
                }
                if std::mem::replace(&mut used[b.slot], true) {
                    return bad(format!("{what}: slot {} is used twice", b.slot));
                }
            }
        }
        if self.slots > i32::MAX as usize || self.tables.iter().any(|t| t.len() > i32::MAX as usize)
        {
            return bad("more than 2^31 slots or table entries".into());
        }
        Ok(())
    }

    /// Bytes the kernel reads: whole 16-token tiles of codes, and every block's scales.
    pub fn bytes_read(&self) -> u64 {
        let mut total = 0u64;
        for (i, table) in self.tables.iter().enumerate() {
            let g = &self.geoms[i];
            for b in table {
                let tiles = b.tokens.div_ceil(16) as u64;
                let mut bytes = tiles * 16 * (g.k_bytes() + g.v_bytes()) as u64 / g.tokens as u64;
                if g.class != KvClass::F16 {
                    bytes += (g.slab_bytes() - g.k_scale_offset()) as u64;
                }
                total += bytes * self.kv_heads as u64;
            }
        }
        total
    }

    /// A copy with every table sorted by sequence (stable), as the work split needs.
    fn sorted(&self) -> Self {
        let mut s = self.clone();
        for t in &mut s.tables {
            t.sort_by_key(|b| b.seq);
        }
        s
    }
}

/// A paged cache on the host: the layout and the pool bytes (packed by `quant::layout`).
#[derive(Debug, Clone)]
pub struct HostCache {
    pub layout: PagedLayout,
    pub pool: Vec<u8>,
}

impl HostCache {
    /// An empty pool of `slots` slots for `layout`'s shape (its tables are cleared).
    pub fn new(mut layout: PagedLayout, slots: usize) -> Self {
        layout.tables = Default::default();
        layout.slots = slots;
        let pool = vec![0u8; layout.pool_bytes()];
        HostCache { layout, pool }
    }

    /// Pack one block per KV head (`heads[h]` for head `h`, all of one class and of the
    /// layout's geometry) into `slot` and add it to sequence `seq`'s table.
    pub fn put(
        &mut self,
        seq: usize,
        slot: usize,
        heads: &[QuantizedBlock],
    ) -> Result<(), GpuError> {
        let l = &self.layout;
        let Some(first) = heads.first() else {
            return Err(GpuError::Shape(
                "a block needs one entry per KV head".into(),
            ));
        };
        let class = first.geom.class;
        if heads.len() != l.kv_heads
            || heads
                .iter()
                .any(|b| b.geom != *l.geom(class) || b.len != first.len)
        {
            return Err(GpuError::Shape(format!(
                "slot {slot}: {} blocks for {} KV heads, or their geometry/length differ from \
                 the layout's {:?}",
                heads.len(),
                l.kv_heads,
                l.geom(class)
            )));
        }
        if slot >= l.slots || first.len == 0 {
            return Err(GpuError::Shape(format!(
                "slot {slot} of {} with {} tokens",
                l.slots, first.len
            )));
        }
        for (h, b) in heads.iter().enumerate() {
            let at = l.slab_offset(slot, h);
            let bytes = b.pack();
            self.pool[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let slots = self.layout.slots;
        self.layout.push(class, seq, slot, first.len);
        self.layout.slots = slots;
        Ok(())
    }
}

/// A paged cache on the device: the pool and one block table (slot, tokens) per class.
pub struct DeviceCache {
    /// Tables sorted by sequence: the order the work items index.
    pub layout: PagedLayout,
    pub pool: CudaSlice<u8>,
    slot: Vec<CudaSlice<i32>>,
    ntok: Vec<CudaSlice<i32>>,
}

impl DeviceCache {
    pub fn upload(gpu: &GpuContext, host: &HostCache) -> Result<Self, GpuError> {
        host.layout.validate()?;
        if host.pool.len() != host.layout.pool_bytes() {
            return Err(GpuError::Shape(format!(
                "pool of {} bytes, the layout needs {}",
                host.pool.len(),
                host.layout.pool_bytes()
            )));
        }
        let pool = gpu.upload(&host.pool)?;
        Self::with_pool(gpu, &host.layout, pool)
    }

    /// Allocate the pool for `layout` (left unfilled); `None` when it does not fit.
    pub fn allocate(gpu: &GpuContext, layout: &PagedLayout) -> Result<Option<Self>, GpuError> {
        layout.validate()?;
        match gpu.try_alloc_bytes(layout.pool_bytes())? {
            Some(pool) => Ok(Some(Self::with_pool(gpu, layout, pool)?)),
            None => Ok(None),
        }
    }

    /// A zeroed pool of `layers` consecutive layer pools of `layout`'s size (layer `l` at byte
    /// `l * layout.pool_bytes()`), all read through `layout`'s block tables.
    pub fn allocate_layers(
        gpu: &GpuContext,
        layout: &PagedLayout,
        layers: usize,
    ) -> Result<Self, GpuError> {
        layout.validate()?;
        let pool = gpu.zeros::<u8>(layout.pool_bytes() * layers.max(1))?;
        Self::with_pool(gpu, layout, pool)
    }

    /// The device copies of class `c`'s table: slot ids and valid token counts, in the order
    /// of `layout.tables[c]` (sorted by sequence).
    pub fn device_table(&self, c: usize) -> Option<(&CudaSlice<i32>, &CudaSlice<i32>)> {
        Some((self.slot.get(c)?, self.ntok.get(c)?))
    }

    /// Replace the block tables (the pool stays): `layout` must have this cache's heads,
    /// slots and geometry (the number of sequences may change).
    pub fn set_tables(&mut self, gpu: &GpuContext, layout: &PagedLayout) -> Result<(), GpuError> {
        layout.validate()?;
        let same = layout.q_heads == self.layout.q_heads
            && layout.kv_heads == self.layout.kv_heads
            && layout.slots == self.layout.slots
            && layout.slab_bytes == self.layout.slab_bytes
            && layout.geoms == self.layout.geoms;
        if !same {
            return Err(GpuError::Shape(
                "new block tables for a cache of another shape".into(),
            ));
        }
        let pool = std::mem::replace(&mut self.pool, gpu.zeros::<u8>(0)?);
        *self = Self::with_pool(gpu, layout, pool)?;
        Ok(())
    }

    fn with_pool(
        gpu: &GpuContext,
        layout: &PagedLayout,
        pool: CudaSlice<u8>,
    ) -> Result<Self, GpuError> {
        let layout = layout.sorted();
        let mut slot = Vec::with_capacity(NUM_CLASSES);
        let mut ntok = Vec::with_capacity(NUM_CLASSES);
        for t in &layout.tables {
            let s: Vec<i32> = t.iter().map(|b| b.slot as i32).collect();
            let n: Vec<i32> = t.iter().map(|b| b.tokens as i32).collect();
            slot.push(gpu.upload(&s)?);
            ntok.push(gpu.upload(&n)?);
        }
        Ok(DeviceCache {
            layout,
            pool,
            slot,
            ntok,
        })
    }
}

/// Work items of a call, grouped by class: `(seq, class, first entry, end entry)`, and for
/// the merge the work items of each sequence (`work_index[seq_begin[s]..seq_begin[s + 1]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkSplit {
    pub work: Vec<[i32; 4]>,
    pub work_base: [usize; NUM_CLASSES + 1],
    pub seq_begin: Vec<i32>,
    pub work_index: Vec<i32>,
}

/// Split each sequence's blocks of each class into runs of at most `bpw` blocks. The tables
/// must be sorted by sequence (`DeviceCache` keeps them so).
pub fn split_work(l: &PagedLayout, bpw: usize) -> WorkSplit {
    let bpw = bpw.max(1);
    let mut work: Vec<[i32; 4]> = Vec::new();
    let mut work_base = [0usize; NUM_CLASSES + 1];
    for (c, table) in l.tables.iter().enumerate() {
        work_base[c] = work.len();
        let mut i = 0;
        while i < table.len() {
            let seq = table[i].seq;
            let mut j = i;
            while j < table.len() && table[j].seq == seq {
                j += 1;
            }
            let mut b = i;
            while b < j {
                let e = (b + bpw).min(j);
                work.push([seq as i32, c as i32, b as i32, e as i32]);
                b = e;
            }
            i = j;
        }
    }
    work_base[NUM_CLASSES] = work.len();
    let mut per_seq: Vec<Vec<i32>> = vec![Vec::new(); l.seqs];
    for (w, item) in work.iter().enumerate() {
        per_seq[item[0] as usize].push(w as i32);
    }
    let mut seq_begin = Vec::with_capacity(l.seqs + 1);
    let mut work_index = Vec::with_capacity(work.len());
    seq_begin.push(0i32);
    for s in &per_seq {
        work_index.extend_from_slice(s);
        seq_begin.push(work_index.len() as i32);
    }
    WorkSplit {
        work,
        work_base,
        seq_begin,
        work_index,
    }
}

/// `l` restricted to its first `seqs` sequences, whose entries must lead every class table
/// (the entry indices stay those of `l`).
pub fn prefix_layout(l: &PagedLayout, seqs: usize) -> Result<PagedLayout, GpuError> {
    if seqs > l.seqs {
        return Err(GpuError::Shape(format!(
            "a prefix of {seqs} sequences of a layout of {}",
            l.seqs
        )));
    }
    let mut p = l.clone();
    p.seqs = seqs;
    for (c, t) in p.tables.iter_mut().enumerate() {
        let n = t.iter().take_while(|b| b.seq < seqs).count();
        if t[n..].iter().any(|b| b.seq < seqs) {
            return Err(GpuError::Shape(format!(
                "class table {c}: the first {seqs} sequences' entries do not lead it"
            )));
        }
        t.truncate(n);
    }
    Ok(p)
}

/// The work of one decode call: work items (a run of at most `blocks_per_work` blocks of one
/// class of one sequence), grouped by class, and the buffers for partials and the output.
pub struct DecodePlan {
    pub blocks_per_work: usize,
    /// `(seq, class, first entry, end entry)` per work item.
    pub work: Vec<[i32; 4]>,
    /// Work items of class `c` are `work_base[c]..work_base[c + 1]`.
    pub work_base: [usize; NUM_CLASSES + 1],
    seqs: usize,
    q_heads: usize,
    d_work: CudaSlice<i32>,
    d_seq_begin: CudaSlice<i32>,
    d_work_index: CudaSlice<i32>,
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    /// `[seq][q_head][HEAD_DIM]` after a launch.
    pub out: CudaSlice<f32>,
}

impl DecodePlan {
    /// Blocks per work item for a call, from a wave model fitted on an H100 sweep
    /// (`docs/KERNEL_BENCH.md`): the class launches run together, so with `slots` CTAs
    /// resident per SM for the tightest class, a call takes about
    /// `ceil(CTAs / (SMs × slots)) × (blocks per CTA + o)`, `o` the per-CTA chain (block
    /// table, K fold, ring fill, combine, merge row) in blocks of the class with the most
    /// blocks: 2 for INT4/INT2 (cp.async ring), 12 for F16/FP8 (register path, whose blocks
    /// are handed whole to warps: short work items leave warps idle). Candidates 1, 2, 3, 4, 6,
    /// 8, 12, 16, 24, 32; a split with fewer than 1.5 CTAs per SM is skipped (the SMs idle,
    /// latency-bound); for INT4/INT2 work items under 8 blocks cost as 8 (they switch to
    /// interleaved tile groups, which fold every block in every warp). Ties go to the larger.
    /// `ctas_per_sm` is per class in `KvClass::ALL` order (`DecodeAttention::ctas_per_sm`).
    pub fn default_blocks_per_work(
        layout: &PagedLayout,
        multiprocessors: usize,
        ctas_per_sm: [usize; NUM_CLASSES],
    ) -> usize {
        let sms = multiprocessors.max(1);
        let per_seq: Vec<Vec<usize>> = layout
            .tables
            .iter()
            .map(|t| {
                let mut n = vec![0usize; layout.seqs];
                for b in t {
                    if let Some(x) = n.get_mut(b.seq) {
                        *x += 1;
                    }
                }
                n
            })
            .collect();
        let present: Vec<usize> = (0..NUM_CLASSES)
            .filter(|&c| !layout.tables[c].is_empty())
            .collect();
        let Some(&dominant) = present.iter().max_by_key(|&&c| layout.tables[c].len()) else {
            return 1;
        };
        let slots = present
            .iter()
            .map(|&c| ctas_per_sm[c].max(1))
            .min()
            .unwrap_or(1)
            * sms;
        let pipelined = matches!(KvClass::ALL[dominant], KvClass::Int4 | KvClass::Int2);
        let overhead = if pipelined { 2 } else { 12 };
        let longest = per_seq[dominant].iter().copied().max().unwrap_or(0);
        let mut best: Option<(usize, usize)> = None; // (cost, bpw)
        for bpw in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32] {
            let ctas: usize = present
                .iter()
                .map(|&c| per_seq[c].iter().map(|n| n.div_ceil(bpw)).sum::<usize>())
                .sum::<usize>()
                * layout.kv_heads;
            if bpw > 1 && 2 * ctas < 3 * sms {
                continue;
            }
            let eff = if pipelined && bpw < 8 && longest >= 8 {
                8
            } else {
                bpw
            };
            let cost = ctas.div_ceil(slots) * (eff + overhead);
            if best.is_none_or(|(c, _)| cost <= c) {
                best = Some((cost, bpw));
            }
        }
        best.map_or(1, |(_, bpw)| bpw)
    }

    pub fn new(
        gpu: &GpuContext,
        cache: &DeviceCache,
        blocks_per_work: usize,
    ) -> Result<Self, GpuError> {
        Self::for_layout(gpu, &cache.layout, blocks_per_work)
    }

    /// A plan over the first `seqs` sequences of the cache only (a step whose later rows are
    /// prefill chunks): their entries must lead every class table, so the plan's entry indices
    /// are the cache's.
    pub fn new_prefix(
        gpu: &GpuContext,
        cache: &DeviceCache,
        blocks_per_work: usize,
        seqs: usize,
    ) -> Result<Self, GpuError> {
        let l = prefix_layout(&cache.layout, seqs)?;
        Self::for_layout(gpu, &l, blocks_per_work)
    }

    fn for_layout(
        gpu: &GpuContext,
        l: &PagedLayout,
        blocks_per_work: usize,
    ) -> Result<Self, GpuError> {
        let bpw = blocks_per_work.max(1);
        let split = split_work(l, bpw);
        if split.work.len() > i32::MAX as usize / l.q_heads.max(1) {
            return Err(GpuError::Shape(format!(
                "{} work items is too many",
                split.work.len()
            )));
        }
        let WorkSplit {
            work,
            work_base,
            seq_begin,
            work_index,
        } = split;
        let flat: Vec<i32> = work.iter().flatten().copied().collect();
        let rows = work.len() * l.q_heads;
        Ok(DecodePlan {
            blocks_per_work: bpw,
            d_work: gpu.upload(&flat)?,
            d_seq_begin: gpu.upload(&seq_begin)?,
            d_work_index: gpu.upload(&work_index)?,
            part_o: gpu.zeros(rows * HEAD_DIM)?,
            part_lse: gpu.zeros(rows)?,
            out: gpu.zeros(l.seqs * l.q_heads * HEAD_DIM)?,
            work,
            work_base,
            seqs: l.seqs,
            q_heads: l.q_heads,
        })
    }

    /// Sequences (decode rows) the plan covers.
    pub fn seqs(&self) -> usize {
        self.seqs
    }

    /// Fill the output with NaN, so a test sees any element a launch did not write.
    pub fn poison_output(&mut self, gpu: &GpuContext) -> Result<(), GpuError> {
        let stream = gpu.stream();
        let bytes = self.out.num_bytes();
        let (ptr, _sync) = self.out.device_ptr(stream);
        // SAFETY: `ptr` spans `bytes` bytes of a live allocation, ordered on `stream`.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
            .during("poisoning the output")
    }
}

/// `#[repr(C)]` mirror of `tkv::ClassInfo` (48 bytes, checked by a static_assert in the .cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ClassInfo {
    slot: u64,
    ntok: u64,
    tokens: i32,
    v_off: i32,
    ks_off: i32,
    kz_off: i32,
    vs_off: i32,
    vz_off: i32,
    k_group: i32,
    _pad: i32,
}

/// `#[repr(C)]` mirror of `tkv::DecodeParams` (264 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DecodeParams {
    pool: u64,
    slab_bytes: i64,
    kv_heads: i32,
    q_heads: i32,
    gqa: i32,
    _pad0: i32,
    q: u64,
    scale_log2: f32,
    _pad1: i32,
    cls: [ClassInfo; NUM_CLASSES],
    work: u64,
    part_o: u64,
    part_lse: u64,
}

const _: () = assert!(std::mem::size_of::<ClassInfo>() == 48);
const _: () = assert!(std::mem::size_of::<DecodeParams>() == 264);

// SAFETY: plain old data with the exact C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for DecodeParams {}

/// Registers and memory of one compiled kernel, from the driver.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: i32,
    pub local_bytes: i32,
    pub shared_bytes: i32,
}

/// The decode kernels of one value group, loaded on a device, with the streams and events
/// that let the class launches overlap.
pub struct DecodeAttention {
    pub v_group: usize,
    names: Vec<String>,
    decode: Vec<CudaFunction>,
    merge: CudaFunction,
    class_streams: Vec<Arc<CudaStream>>,
    fork: CudaEvent,
    joins: Vec<CudaEvent>,
}

impl DecodeAttention {
    pub fn load(gpu: &GpuContext, v_group: usize) -> Result<Self, GpuError> {
        if !V_GROUPS.contains(&v_group) {
            return Err(GpuError::Shape(format!(
                "value group {v_group}: compiled for {V_GROUPS:?}"
            )));
        }
        let mut names = Vec::new();
        let mut decode = Vec::new();
        for c in KvClass::ALL {
            let name = format!("tkv_decode_{}_vg{v_group}", class_name(c));
            decode.push(gpu.function(&DECODE_ATTENTION, &[], &name)?);
            names.push(name);
        }
        let merge = gpu.function(&DECODE_ATTENTION, &[], "tkv_merge_partials")?;
        let ctx = gpu.context();
        let mut class_streams = Vec::new();
        let mut joins = Vec::new();
        for _ in 0..NUM_CLASSES {
            class_streams.push(ctx.new_stream().during("creating a class stream")?);
            joins.push(
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .during("creating an event")?,
            );
        }
        let fork = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .during("creating an event")?;
        Ok(DecodeAttention {
            v_group,
            names,
            decode,
            merge,
            class_streams,
            fork,
            joins,
        })
    }

    /// CTAs of each class's kernel that fit on one SM (the driver's occupancy calculator).
    pub fn ctas_per_sm(&self) -> Result<[usize; NUM_CLASSES], GpuError> {
        let mut out = [1usize; NUM_CLASSES];
        for (o, f) in out.iter_mut().zip(&self.decode) {
            *o = f
                .occupancy_max_active_blocks_per_multiprocessor(NWARPS * 32, 0, None)
                .during("reading kernel occupancy")? as usize;
        }
        Ok(out)
    }

    pub fn resources(&self) -> Result<Vec<KernelResources>, GpuError> {
        let mut out = Vec::new();
        for (name, f) in self
            .names
            .iter()
            .chain(std::iter::once(&"tkv_merge_partials".to_string()))
            .zip(self.decode.iter().chain(std::iter::once(&self.merge)))
        {
            out.push(KernelResources {
                kernel: name.clone(),
                registers: f.num_regs().during("reading kernel registers")?,
                local_bytes: f.local_size_bytes().during("reading kernel local memory")?,
                shared_bytes: f
                    .shared_size_bytes()
                    .during("reading kernel shared memory")?,
            });
        }
        Ok(out)
    }

    /// Queue one decode call on `gpu.stream()`: `q` is fp16 bits `[seq][q_head][128]`; the
    /// result lands in `plan.out`. Several classes run on their own streams, joined before
    /// the merge.
    pub fn launch(
        &self,
        gpu: &GpuContext,
        cache: &DeviceCache,
        plan: &mut DecodePlan,
        q: &CudaSlice<u16>,
        sm_scale: f32,
    ) -> Result<(), GpuError> {
        self.launch_at(gpu, cache, 0, plan, q, sm_scale)
    }

    /// [`launch`](Self::launch) over the layout's pool starting `pool_offset` bytes into
    /// `cache.pool` (a pool of several layers that share one block table).
    pub fn launch_at(
        &self,
        gpu: &GpuContext,
        cache: &DeviceCache,
        pool_offset: usize,
        plan: &mut DecodePlan,
        q: &CudaSlice<u16>,
        sm_scale: f32,
    ) -> Result<(), GpuError> {
        let l = &cache.layout;
        if pool_offset % 16 != 0 || pool_offset + l.pool_bytes() > cache.pool.len() {
            return Err(GpuError::Shape(format!(
                "a pool of {} bytes at offset {pool_offset} in a buffer of {}",
                l.pool_bytes(),
                cache.pool.len()
            )));
        }
        if l.head_dim() != HEAD_DIM {
            return Err(GpuError::Shape(format!(
                "head dim {}: the decode kernel is compiled for {HEAD_DIM}",
                l.head_dim()
            )));
        }
        if l.v_group() != self.v_group {
            return Err(GpuError::Shape(format!(
                "cache has value group {}, kernels loaded for {}",
                l.v_group(),
                self.v_group
            )));
        }
        // A plan may cover a prefix of the sequences (`DecodePlan::new_prefix`).
        if plan.seqs > l.seqs || plan.q_heads != l.q_heads {
            return Err(GpuError::Shape(
                "the plan was made for another cache".into(),
            ));
        }
        if q.len() < plan.seqs * l.q_heads * HEAD_DIM {
            return Err(GpuError::Shape(format!(
                "q has {} values, {} sequences × {} heads × {HEAD_DIM} needed",
                q.len(),
                plan.seqs,
                l.q_heads
            )));
        }
        let main = gpu.stream();
        let ptr = |s: &CudaSlice<i32>| s.device_ptr(main).0;
        let mut p = DecodeParams {
            pool: cache.pool.device_ptr(main).0 + pool_offset as u64,
            slab_bytes: l.slab_bytes as i64,
            kv_heads: l.kv_heads as i32,
            q_heads: l.q_heads as i32,
            gqa: l.gqa() as i32,
            q: q.device_ptr(main).0,
            scale_log2: sm_scale * std::f32::consts::LOG2_E,
            work: ptr(&plan.d_work),
            part_o: plan.part_o.device_ptr(main).0,
            part_lse: plan.part_lse.device_ptr(main).0,
            ..Default::default()
        };
        for (c, g) in l.geoms.iter().enumerate() {
            let (ks, kz, vs, vz) = match g.class {
                // FP8: K scale f32 at ks_off, V scale at +4; no zeros.
                KvClass::Fp8 | KvClass::F16 => {
                    let at = g.k_scale_offset() as i32;
                    (at, at, at, at)
                }
                _ => (
                    g.k_scale_offset() as i32,
                    g.k_zero_offset() as i32,
                    g.v_scale_offset() as i32,
                    g.v_zero_offset() as i32,
                ),
            };
            p.cls[c] = ClassInfo {
                slot: ptr(&cache.slot[c]),
                ntok: ptr(&cache.ntok[c]),
                tokens: g.tokens as i32,
                v_off: g.v_offset() as i32,
                ks_off: ks,
                kz_off: kz,
                vs_off: vs,
                vz_off: vz,
                k_group: g.k_group as i32,
                _pad: 0,
            };
        }
        let present: Vec<usize> = (0..NUM_CLASSES)
            .filter(|&c| plan.work_base[c + 1] > plan.work_base[c])
            .collect();
        let fork = present.len() > 1;
        if fork {
            self.fork.record(main).during("recording the fork event")?;
        }
        for &c in &present {
            let n = (plan.work_base[c + 1] - plan.work_base[c]) as u32;
            let stream: &Arc<CudaStream> = if fork { &self.class_streams[c] } else { main };
            if fork {
                stream
                    .wait(&self.fork)
                    .during("waiting for the fork event")?;
            }
            let base = plan.work_base[c] as i32;
            let cfg = LaunchConfig {
                grid_dim: (n, l.kv_heads as u32, 1),
                block_dim: (NWARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&self.decode[c]);
            b.arg(&p).arg(&base);
            // SAFETY: the parameters point into live buffers of this cache and plan, sized by
            // the validated layout; the kernel reads only the entries the work items name.
            unsafe { b.launch(cfg) }.during(&format!("launching {}", self.names[c]))?;
            if fork {
                self.joins[c]
                    .record(stream)
                    .during("recording a join event")?;
                main.wait(&self.joins[c]).during("joining a class stream")?;
            }
        }
        let q_heads = l.q_heads as i32;
        let cfg = LaunchConfig {
            grid_dim: (plan.seqs as u32, l.q_heads as u32, 1),
            block_dim: (HEAD_DIM as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = main.launch_builder(&self.merge);
        b.arg(&plan.part_o)
            .arg(&plan.part_lse)
            .arg(&plan.d_seq_begin)
            .arg(&plan.d_work_index)
            .arg(&q_heads)
            .arg(&mut plan.out);
        // SAFETY: partials sized work × q_heads (× 128), output seqs × q_heads × 128.
        unsafe { b.launch(cfg) }.during("launching tkv_merge_partials")?;
        Ok(())
    }
}

/// fp16 bits of `x` (the kernel reads q as fp16).
pub fn to_f16_bits(x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect()
}

/// Upload `host`, run one decode call with `blocks_per_work` blocks per work item over a
/// NaN-poisoned output, and return `[seq][q_head][128]`.
pub fn decode_host(
    gpu: &GpuContext,
    kernels: &DecodeAttention,
    host: &HostCache,
    q: &[f32],
    sm_scale: f32,
    blocks_per_work: usize,
) -> Result<Vec<f32>, GpuError> {
    let cache = DeviceCache::upload(gpu, host)?;
    let mut plan = DecodePlan::new(gpu, &cache, blocks_per_work)?;
    let dq = gpu.upload(&to_f16_bits(q))?;
    plan.poison_output(gpu)?;
    kernels.launch(gpu, &cache, &mut plan, &dq, sm_scale)?;
    gpu.synchronize()?;
    gpu.download(&plan.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> PagedLayout {
        PagedLayout::new(32, 8, 2, 64).unwrap()
    }

    #[test]
    fn shipped_geometries_fit_one_slab() {
        let l = layout();
        assert_eq!(l.slab_bytes, 9728);
        assert_eq!(l.gqa(), 4);
        assert!(PagedLayout::new(36, 4, 1, 64).is_err(), "GQA 9 > 8");
        assert!(PagedLayout::new(30, 4, 1, 64).is_err(), "uneven GQA");
        assert!(PagedLayout::new(32, 8, 1, 48).is_err(), "value group 48");
    }

    #[test]
    fn validate_names_the_bad_entry() {
        let mut l = layout();
        l.push(KvClass::Int2, 0, 0, 128);
        l.push(KvClass::Int4, 1, 1, 64);
        assert!(l.validate().is_ok());
        let mut over = l.clone();
        over.push(KvClass::Int4, 1, 2, 65);
        let e = over.validate().unwrap_err().to_string();
        assert!(
            e.contains("int4 table entry 1") && e.contains("65 tokens"),
            "{e}"
        );
        let mut twice = l.clone();
        twice.push(KvClass::F16, 0, 1, 3);
        assert!(twice
            .validate()
            .unwrap_err()
            .to_string()
            .contains("used twice"));
        let mut seq = l.clone();
        seq.push(KvClass::Fp8, 2, 5, 3);
        assert!(seq
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sequence 2 of 2"));
        let mut slab = l;
        slab.slab_bytes = 8192;
        let e = slab.validate().unwrap_err().to_string();
        assert!(e.contains("int4 blocks need 9216 bytes per slab"), "{e}");
    }

    #[test]
    fn bytes_read_counts_whole_tiles_and_scales() {
        let mut l = layout();
        l.push(KvClass::Int2, 0, 0, 17); // 2 tiles of 512 + 512 bytes of codes, 1536 scales
        let g = *l.geom(KvClass::Int2);
        let per_head = 2 * 16 * (g.k_bytes() + g.v_bytes()) / 128 + (9728 - 8192);
        assert_eq!(l.bytes_read(), 8 * per_head as u64);
        let mut f = layout();
        f.push(KvClass::F16, 0, 0, 16);
        assert_eq!(f.bytes_read(), 8 * 8192);
    }

    #[test]
    fn work_split_groups_by_class_then_sequence() {
        let mut l = layout();
        // seq 1: 5 INT2 blocks, seq 0: 2 INT2 blocks and 1 F16 block (table sorted by seq).
        for (i, s) in [0, 0, 1, 1, 1, 1, 1].iter().enumerate() {
            l.push(KvClass::Int2, *s, i, 128);
        }
        l.push(KvClass::F16, 0, 7, 4);
        let w = split_work(&l, 2);
        assert_eq!(
            w.work,
            vec![
                [0, 0, 0, 1],
                [0, 2, 0, 2],
                [1, 2, 2, 4],
                [1, 2, 4, 6],
                [1, 2, 6, 7]
            ]
        );
        assert_eq!(w.work_base, [0, 1, 1, 5, 5]);
        assert_eq!(w.seq_begin, vec![0, 2, 5]);
        assert_eq!(w.work_index, vec![0, 1, 2, 3, 4]);
        // Every block is in exactly one work item.
        let covered: usize = w.work.iter().map(|x| (x[3] - x[2]) as usize).sum();
        assert_eq!(covered, 8);
    }

    #[test]
    fn default_split_follows_the_wave_model() {
        let slots = [4, 4, 4, 3];
        let seqs_of = |seqs: usize, blocks: usize| {
            let mut l = PagedLayout::new(32, 8, seqs, 64).unwrap();
            for s in 0..seqs * blocks {
                l.push(KvClass::Int2, s % seqs, s, 128);
            }
            l
        };
        let bpw = |l: &PagedLayout| DecodePlan::default_blocks_per_work(l, 132, slots);
        // Best in the H100 sweep: 1 × 32k INT2 (256 blocks) 8; 8 × 32k 32; 32 × 4k
        // (32 blocks each) 16; 1 × 128k 16.
        assert_eq!(bpw(&seqs_of(1, 256)), 8);
        assert_eq!(bpw(&seqs_of(8, 256)), 32);
        assert_eq!(bpw(&seqs_of(32, 32)), 16);
        assert_eq!(bpw(&seqs_of(1, 1024)), 16);
        // Too little work for 1.5 CTAs per SM at any split: one block per work item.
        assert_eq!(bpw(&seqs_of(1, 3)), 1);
        let empty = PagedLayout::new(32, 8, 1, 64).unwrap();
        assert_eq!(bpw(&empty), 1);
        // Mixed 8 × 32k (75% INT2, 25% INT4, 16-bit sinks and window): all classes' CTAs
        // share the waves, so the split is shorter than INT2 alone would take.
        let mut m = PagedLayout::new(32, 8, 8, 64).unwrap();
        let mut slot = 0;
        for s in 0..8 {
            for (c, n) in [
                (KvClass::Int2, 192),
                (KvClass::Int4, 127),
                (KvClass::F16, 5),
            ] {
                for _ in 0..n {
                    m.push(c, s, slot, 16);
                    slot += 1;
                }
            }
        }
        assert!(bpw(&m) < 32, "{}", bpw(&m));
        // FP8 1 × 128k (4096 blocks of 32 tokens): long work items (sweep: 32 best, 12 is
        // 1.3x slower).
        let mut f = PagedLayout::new(32, 8, 1, 64).unwrap();
        for s in 0..4096 {
            f.push(KvClass::Fp8, 0, s, 32);
        }
        assert_eq!(bpw(&f), 32);
    }
}
