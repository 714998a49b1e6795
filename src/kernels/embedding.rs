//! Input embeddings of BERT (word + position + token type, and the deterministic scatter-add
//! backward) and ViT (patch extraction, `[CLS]` + position assembly and its backward):
//! `cuda/embedding.cu` has the formulas, the shapes, the semantics and the variants. CPU
//! references: [`reference_bert_forward`], [`reference_bert_backward`], [`reference_vit_patches`],
//! [`reference_vit_assemble`], [`reference_vit_assemble_backward`] (the model's version is
//! `crate::model` `encode_taped` / `embeddings_backward`).

use super::{Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims, MAX_GRID_YZ};

/// The ∂word scatter's variants, in the order of `cuda/embedding.cu`'s numbered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per (id, column), looping over every row and comparing ids.
    Naive,
    /// One thread per (id, column), summing its id's rows through the CSR [`TokenIndex`].
    Indexed,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[Variant::Naive, Variant::Indexed];

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Indexed => "indexed",
        }
    }
}

/// Threads per block of the flat kernels (`THREADS` in `cuda/embedding.cu`).
pub const THREADS: u32 = 256;
const WARP: u32 = 32;
/// Row-threads per column of `bert_dtype` (`TYPE_ROW_THREADS` in `cuda/embedding.cu`).
pub const TYPE_ROW_THREADS: u32 = 8;
/// `bert_dtype`'s shared memory: f32 `part[8][33]`.
pub const DTYPE_SHARED_BYTES: u32 = 4 * TYPE_ROW_THREADS * (WARP + 1);

/// BERT embeddings: `rows` = B·T token rows of sequences of length `seq` (T); tables word
/// (vocab, hidden), position (positions, hidden), token type (types, hidden).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BertShape {
    pub rows: usize,
    pub seq: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub positions: usize,
    pub types: usize,
}

/// ViT embeddings: `batch` images of `side`×`side` pixels cut into `patch`×`patch` patches:
/// np = (side / patch)² patches per image, T = np + 1 tokens (`[CLS]` first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VitShape {
    pub batch: usize,
    pub side: usize,
    pub patch: usize,
    pub hidden: usize,
}

impl VitShape {
    /// np = (side / patch)².
    pub fn patches(&self) -> usize {
        let grid = self.side / self.patch.max(1);
        grid * grid
    }

    /// T = np + 1.
    pub fn tokens(&self) -> usize {
        self.patches() + 1
    }
}

/// One kernel of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    BertForward,
    BertDword(Variant),
    BertDposition,
    BertDtokenType,
    VitPatches,
    VitAssemble,
    VitAssembleBackward,
}

/// One launch of the BERT backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Dword(Variant),
    Dposition,
    DtokenType,
}

/// The token ids of one batch on the device, with their CSR index: for each vocabulary id v the
/// rows using it, `rows[offsets[v] .. offsets[v + 1]]`, ascending. Built on the host (ids checked
/// against the vocabulary there, so the kernels never index outside it) and uploaded once per
/// batch; the backward's ∂word sums each id's rows in this order.
pub struct TokenIndex<B: Backend> {
    /// (rows) int32: the ids themselves (the naive variant compares them).
    ids: B::Buffer<i32>,
    /// (vocab + 1) int32.
    offsets: B::Buffer<i32>,
    /// (rows) int32.
    rows: B::Buffer<i32>,
    vocab: usize,
    len: usize,
}

impl<B: Backend> TokenIndex<B> {
    /// Builds the index of `ids` (B·T, row-major) over a vocabulary of `vocab` ids and uploads
    /// it; an id ≥ `vocab`, no ids, or more rows or ids than int32 holds are errors.
    pub fn upload(backend: &B, ids: &[u32], vocab: usize) -> Result<Self, KernelError> {
        let error = |message: String| KernelError::Argument {
            kernel: "embedding",
            message,
        };
        if ids.is_empty() || vocab == 0 {
            return Err(error(format!(
                "token index of {} ids over a vocabulary of {vocab}: both must be non-empty",
                ids.len()
            )));
        }
        if ids.len() > i32::MAX as usize || vocab >= i32::MAX as usize {
            return Err(error(format!(
                "{} ids over a vocabulary of {vocab}: must fit int32",
                ids.len()
            )));
        }
        if let Some((r, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(error(format!(
                "token id {id} of row {r} is outside the vocabulary of {vocab}"
            )));
        }
        let (offsets, rows) = csr_index(ids, vocab);
        let as_i32 = |v: &[usize]| -> Vec<i32> { v.iter().map(|&x| x as i32).collect() };
        let ids32: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
        Ok(TokenIndex {
            ids: backend.upload(&ids32)?,
            offsets: backend.upload(&as_i32(&offsets))?,
            rows: backend.upload(&as_i32(&rows))?,
            vocab,
            len: ids.len(),
        })
    }

    /// Rows (B·T) indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The vocabulary size the index was built for.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// The CSR index of `ids` (all below `vocab`): offsets (vocab + 1) and the rows of each id in
/// ascending order (a counting sort, stable).
pub fn csr_index(ids: &[u32], vocab: usize) -> (Vec<usize>, Vec<usize>) {
    let mut offsets = vec![0usize; vocab + 1];
    for &id in ids {
        offsets[id as usize + 1] += 1;
    }
    for v in 0..vocab {
        offsets[v + 1] += offsets[v];
    }
    let mut next = offsets.clone();
    let mut rows = vec![0usize; ids.len()];
    for (r, &id) in ids.iter().enumerate() {
        rows[next[id as usize]] = r;
        next[id as usize] += 1;
    }
    (offsets, rows)
}

fn flat_dims(elements: usize) -> LaunchDims {
    assert!(elements >= 1, "empty embedding launch");
    let blocks = elements.div_ceil(THREADS as usize);
    let dims = LaunchDims {
        grid: [u32::try_from(blocks).expect("grid x fits u32"), 1, 1],
        block: [THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

/// The BERT forward's launch: one thread per element of out (rows, hidden). Pure; panics on an
/// empty shape or one past the grid limits ([`bert_forward`] checks those first).
pub fn bert_forward_config(shape: &BertShape) -> LaunchDims {
    flat_dims(shape.rows * shape.hidden)
}

/// The BERT backward's launches in stream order (each writes its own gradient). Pure; panics
/// like [`bert_forward_config`].
pub fn bert_backward_config(variant: Variant, shape: &BertShape) -> Vec<(Step, LaunchDims)> {
    let types = LaunchDims {
        grid: [
            u32::try_from(shape.hidden.div_ceil(WARP as usize)).expect("grid x fits u32"),
            u32::try_from(shape.types).expect("types fit u32"),
            1,
        ],
        block: [WARP, TYPE_ROW_THREADS, 1],
        dynamic_shared_bytes: 0,
    };
    types.assert_valid(DTYPE_SHARED_BYTES);
    vec![
        (Step::Dword(variant), flat_dims(shape.vocab * shape.hidden)),
        (Step::Dposition, flat_dims(shape.positions * shape.hidden)),
        (Step::DtokenType, types),
    ]
}

/// Patch extraction's launch: one thread per element of patches (B·np, p²).
pub fn vit_patches_config(shape: &VitShape) -> LaunchDims {
    flat_dims(shape.batch * shape.patches() * shape.patch * shape.patch)
}

/// Assembly's launch: one thread per element of h (B·T, hidden).
pub fn vit_assemble_config(shape: &VitShape) -> LaunchDims {
    flat_dims(shape.batch * shape.tokens() * shape.hidden)
}

/// The assembly backward's launch: one thread per element of ∂pos (T, hidden).
pub fn vit_assemble_backward_config(shape: &VitShape) -> LaunchDims {
    flat_dims(shape.tokens() * shape.hidden)
}

/// Useful FLOPs and the fewest bytes of the BERT forward: two adds per element; three table rows
/// read and one row written per token, two int32 ids.
pub fn bert_forward_flops_bytes(shape: &BertShape, dtype: DType) -> (f64, f64) {
    let (rows, d) = (shape.rows as f64, shape.hidden as f64);
    (2.0 * rows * d, 4.0 * rows * d * dtype.size_bytes() as f64 + 8.0 * rows)
}

/// Useful FLOPs and the fewest bytes of the BERT backward: ∂E read once (three adds per
/// element), the three gradient tables written once, ids and the index read once.
pub fn bert_backward_flops_bytes(shape: &BertShape, dtype: DType) -> (f64, f64) {
    let (rows, d) = (shape.rows as f64, shape.hidden as f64);
    let tables = (shape.vocab + shape.positions + shape.types) as f64 * d;
    let index = 4.0 * (2.0 * rows + shape.vocab as f64 + 1.0);
    (3.0 * rows * d, (rows * d + tables) * dtype.size_bytes() as f64 + index)
}

/// Bytes of patch extraction (no FLOPs): pixels read (f32), patches written.
pub fn vit_patches_flops_bytes(shape: &VitShape, dtype: DType) -> (f64, f64) {
    let n = (shape.batch * shape.patches() * shape.patch * shape.patch) as f64;
    (0.0, n * (4.0 + dtype.size_bytes() as f64))
}

/// Useful FLOPs and the fewest bytes of assembly: one add per element of h; pe, cls, pos read
/// once, h written once.
pub fn vit_assemble_flops_bytes(shape: &VitShape, dtype: DType) -> (f64, f64) {
    let (b, np, t, d) = (
        shape.batch as f64,
        shape.patches() as f64,
        shape.tokens() as f64,
        shape.hidden as f64,
    );
    (
        b * t * d,
        (b * np * d + d + t * d + b * t * d) * dtype.size_bytes() as f64,
    )
}

/// Useful FLOPs and the fewest bytes of the assembly backward: ∂h read once (one add per
/// element), ∂pe, ∂cls, ∂pos written once.
pub fn vit_assemble_backward_flops_bytes(shape: &VitShape, dtype: DType) -> (f64, f64) {
    let (b, np, t, d) = (
        shape.batch as f64,
        shape.patches() as f64,
        shape.tokens() as f64,
        shape.hidden as f64,
    );
    (
        b * t * d,
        (b * t * d + b * np * d + d + t * d) * dtype.size_bytes() as f64,
    )
}

/// The compiled kernel of `entry` for storage `dtype` (`embedding_<kernel>_<dtype>`).
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::embedding as e;
    use Variant::{Indexed, Naive};
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::BertForward, DType::F32) => kernel_entry!(e::lc_run_embedding_bert_fwd_f32),
        (Entry::BertForward, DType::BF16) => kernel_entry!(e::lc_run_embedding_bert_fwd_bf16),
        (Entry::BertDword(Naive), DType::F32) => kernel_entry!(e::lc_run_embedding_bert_dword_naive_f32),
        (Entry::BertDword(Naive), DType::BF16) => kernel_entry!(e::lc_run_embedding_bert_dword_naive_bf16),
        (Entry::BertDword(Indexed), DType::F32) => kernel_entry!(e::lc_run_embedding_bert_dword_indexed_f32),
        (Entry::BertDword(Indexed), DType::BF16) => kernel_entry!(e::lc_run_embedding_bert_dword_indexed_bf16),
        (Entry::BertDposition, DType::F32) => kernel_entry!(e::lc_run_embedding_bert_dpos_f32),
        (Entry::BertDposition, DType::BF16) => kernel_entry!(e::lc_run_embedding_bert_dpos_bf16),
        (Entry::BertDtokenType, DType::F32) => kernel_entry!(e::lc_run_embedding_bert_dtype_f32),
        (Entry::BertDtokenType, DType::BF16) => kernel_entry!(e::lc_run_embedding_bert_dtype_bf16),
        (Entry::VitPatches, DType::F32) => kernel_entry!(e::lc_run_embedding_vit_patches_f32),
        (Entry::VitPatches, DType::BF16) => kernel_entry!(e::lc_run_embedding_vit_patches_bf16),
        (Entry::VitAssemble, DType::F32) => kernel_entry!(e::lc_run_embedding_vit_assemble_f32),
        (Entry::VitAssemble, DType::BF16) => kernel_entry!(e::lc_run_embedding_vit_assemble_bf16),
        (Entry::VitAssembleBackward, DType::F32) => kernel_entry!(e::lc_run_embedding_vit_assemble_bwd_f32),
        (Entry::VitAssembleBackward, DType::BF16) => kernel_entry!(e::lc_run_embedding_vit_assemble_bwd_bf16),
        (_, DType::F16) => {
            return Err(KernelError::Argument {
                kernel: "embedding",
                message: "f16 storage is not built (f32 and bf16 are)".into(),
            })
        }
    };
    Ok(Kernel {
        family: "embedding",
        name,
        harness_entry,
        cooperative: false,
    })
}

fn fits_i32(n: Option<usize>) -> bool {
    n.is_some_and(|n| n <= i32::MAX as usize)
}

/// Errors a caller can cause with a BERT shape: empty dimensions, rows not a whole number of
/// sequences, sequences longer than the position table, products past the kernels' int32
/// indices or the grid.
fn check_bert_shape(kernel: &'static str, shape: &BertShape) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument { kernel, message };
    let BertShape {
        rows,
        seq,
        hidden,
        vocab,
        positions,
        types,
    } = *shape;
    if [rows, seq, hidden, vocab, positions, types].contains(&0) {
        return Err(error(format!("empty BERT embedding shape {shape:?}")));
    }
    if rows % seq != 0 {
        return Err(error(format!(
            "{rows} rows are not a whole number of sequences of {seq}"
        )));
    }
    if seq > positions {
        return Err(error(format!(
            "sequences of {seq} tokens exceed the {positions} positions"
        )));
    }
    let fits = [rows, vocab + 1, positions, types]
        .iter()
        .all(|&n| fits_i32(n.checked_mul(hidden)));
    if !fits {
        return Err(error(format!("{shape:?}: table and activation sizes must fit int32")));
    }
    if types > MAX_GRID_YZ as usize {
        return Err(error(format!("{types} token types exceed the ∂token_type grid limit")));
    }
    Ok(())
}

/// Errors a caller can cause with a ViT shape: empty dimensions, a patch larger than the image,
/// sizes past the kernels' int32 indices.
fn check_vit_shape(kernel: &'static str, shape: &VitShape) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument { kernel, message };
    let VitShape {
        batch,
        side,
        patch,
        hidden,
    } = *shape;
    if [batch, side, patch, hidden].contains(&0) {
        return Err(error(format!("empty ViT embedding shape {shape:?}")));
    }
    if patch > side {
        return Err(error(format!(
            "patches of {patch}×{patch} do not fit {side}×{side} images"
        )));
    }
    let (np, t) = (shape.patches(), shape.tokens());
    let fits = fits_i32(batch.checked_mul(side).and_then(|n| n.checked_mul(side)))
        && fits_i32(batch.checked_mul(np).and_then(|n| n.checked_mul(patch * patch)))
        && fits_i32(batch.checked_mul(t).and_then(|n| n.checked_mul(hidden)));
    if !fits {
        return Err(error(format!("{shape:?}: sizes must fit int32")));
    }
    Ok(())
}

/// `out = word[ids] + position[r mod T] + token_type[type_ids]` (rows, hidden), overwritten. ids
/// and type_ids are int32 (rows); an id outside its table gives a NaN row (the host checks ids:
/// `crate::model::batch::Batch::check`).
#[allow(clippy::too_many_arguments)]
pub fn bert_forward<T: Element, B: Backend>(
    backend: &B,
    shape: &BertShape,
    ids: &B::Buffer<i32>,
    type_ids: &B::Buffer<i32>,
    word: &B::Buffer<T>,
    position: &B::Buffer<T>,
    token_type: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::BertForward, T::DTYPE)?;
    check_bert_shape(kernel.name, shape)?;
    let BertShape {
        rows,
        seq,
        hidden: d,
        vocab,
        positions,
        types,
    } = *shape;
    super::check_lens(
        kernel.name,
        &[
            ("ids", backend.buffer_len(ids), rows),
            ("type_ids", backend.buffer_len(type_ids), rows),
            ("word", backend.buffer_len(word), vocab * d),
            ("position", backend.buffer_len(position), positions * d),
            ("token_type", backend.buffer_len(token_type), types * d),
            ("out", backend.buffer_len(out), rows * d),
        ],
    )?;
    let args = [
        backend.arg_in(ids),
        backend.arg_in(type_ids),
        backend.arg_in(word),
        backend.arg_in(position),
        backend.arg_in(token_type),
        backend.arg_out(out),
        KernelArg::I32(rows as i32),
        KernelArg::I32(seq as i32),
        KernelArg::I32(d as i32),
        KernelArg::I32(vocab as i32),
        KernelArg::I32(types as i32),
    ];
    // SAFETY: the arguments follow embedding_bert_fwd's parameter list (ids, type_ids, word,
    // position, token_type, out, rows, seq, D, vocab, types); every buffer's length was checked
    // for this shape, seq ≤ positions bounds the position row, and the kernel reads a table row
    // only for an id inside [0, vocab) / [0, types); out is the one, mutably borrowed, output.
    unsafe { backend.launch(&kernel, &bert_forward_config(shape), &args) }
}

/// The BERT backward with the [`Variant::Indexed`] scatter: see [`bert_backward_variant`].
#[allow(clippy::too_many_arguments)]
pub fn bert_backward<T: Element, B: Backend>(
    backend: &B,
    shape: &BertShape,
    index: &TokenIndex<B>,
    type_ids: &B::Buffer<i32>,
    de: &B::Buffer<T>,
    dword: &mut B::Buffer<T>,
    dposition: &mut B::Buffer<T>,
    dtoken_type: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    bert_backward_variant(
        backend,
        shape,
        Variant::Indexed,
        index,
        type_ids,
        de,
        dword,
        dposition,
        dtoken_type,
    )
}

/// The BERT backward given ∂E (rows, hidden): overwrites ∂word (vocab, hidden), ∂position
/// (positions, hidden; rows ≥ seq zero) and ∂token_type (types, hidden), each a fixed-order sum
/// (deterministic). `index` holds the batch's ids ([`TokenIndex::upload`]); type_ids (rows) int32.
#[allow(clippy::too_many_arguments)]
pub fn bert_backward_variant<T: Element, B: Backend>(
    backend: &B,
    shape: &BertShape,
    variant: Variant,
    index: &TokenIndex<B>,
    type_ids: &B::Buffer<i32>,
    de: &B::Buffer<T>,
    dword: &mut B::Buffer<T>,
    dposition: &mut B::Buffer<T>,
    dtoken_type: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let dword_kernel = kernel(Entry::BertDword(variant), T::DTYPE)?;
    check_bert_shape(dword_kernel.name, shape)?;
    let BertShape {
        rows,
        seq,
        hidden: d,
        vocab,
        positions,
        types,
    } = *shape;
    if index.vocab != vocab {
        return Err(KernelError::Argument {
            kernel: dword_kernel.name,
            message: format!(
                "the token index was built for a vocabulary of {}, the shape has {vocab}",
                index.vocab
            ),
        });
    }
    super::check_lens(
        dword_kernel.name,
        &[
            ("index", index.len, rows),
            ("type_ids", backend.buffer_len(type_ids), rows),
            ("de", backend.buffer_len(de), rows * d),
            ("dword", backend.buffer_len(dword), vocab * d),
            ("dposition", backend.buffer_len(dposition), positions * d),
            ("dtoken_type", backend.buffer_len(dtoken_type), types * d),
        ],
    )?;
    let (rows_arg, d_arg) = (KernelArg::I32(rows as i32), KernelArg::I32(d as i32));
    for (step, dims) in bert_backward_config(variant, shape) {
        let (kernel, args) = match step {
            Step::Dword(Variant::Naive) => (
                dword_kernel,
                vec![
                    backend.arg_in(&index.ids),
                    backend.arg_in(de),
                    backend.arg_out(dword),
                    rows_arg,
                    d_arg,
                    KernelArg::I32(vocab as i32),
                ],
            ),
            Step::Dword(Variant::Indexed) => (
                dword_kernel,
                vec![
                    backend.arg_in(&index.offsets),
                    backend.arg_in(&index.rows),
                    backend.arg_in(de),
                    backend.arg_out(dword),
                    d_arg,
                    KernelArg::I32(vocab as i32),
                ],
            ),
            Step::Dposition => (
                kernel(Entry::BertDposition, T::DTYPE)?,
                vec![
                    backend.arg_in(de),
                    backend.arg_out(dposition),
                    rows_arg,
                    KernelArg::I32(seq as i32),
                    d_arg,
                    KernelArg::I32(positions as i32),
                ],
            ),
            Step::DtokenType => (
                kernel(Entry::BertDtokenType, T::DTYPE)?,
                vec![
                    backend.arg_in(type_ids),
                    backend.arg_in(de),
                    backend.arg_out(dtoken_type),
                    rows_arg,
                    d_arg,
                ],
            ),
        };
        // SAFETY: each argument list follows its entry's parameter list in cuda/embedding.cu
        // (bert_dword_naive, bert_dword_indexed, bert_dpos, bert_dtype); every buffer's length was
        // checked for this shape, and the index was built by TokenIndex::upload for these rows and
        // this vocabulary (offsets (vocab + 1) non-decreasing up to rows, every row index below
        // rows, every id below vocab), so each load stays inside its buffer; type ids are only
        // compared. The outputs are distinct, mutably borrowed and not read by the same launch.
        unsafe { backend.launch(&kernel, &dims, &args)? };
    }
    Ok(())
}

/// Patch extraction: pixels (batch, side, side) f32 → patches (batch·np, patch²), overwritten;
/// patch (gy, gx) row-major, pixels row-major inside it.
pub fn vit_patches<T: Element, B: Backend>(
    backend: &B,
    shape: &VitShape,
    pixels: &B::Buffer<f32>,
    patches: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::VitPatches, T::DTYPE)?;
    check_vit_shape(kernel.name, shape)?;
    let VitShape { batch, side, patch, .. } = *shape;
    super::check_lens(
        kernel.name,
        &[
            ("pixels", backend.buffer_len(pixels), batch * side * side),
            (
                "patches",
                backend.buffer_len(patches),
                batch * shape.patches() * patch * patch,
            ),
        ],
    )?;
    let args = [
        backend.arg_in(pixels),
        backend.arg_out(patches),
        KernelArg::I32(batch as i32),
        KernelArg::I32(side as i32),
        KernelArg::I32(patch as i32),
    ];
    // SAFETY: the arguments follow embedding_vit_patches's parameter list (pixels, patches,
    // batch, side, patch); both lengths were checked for this shape (gy·patch + y < side since
    // grid·patch ≤ side), and patches is the one, mutably borrowed, output.
    unsafe { backend.launch(&kernel, &vit_patches_config(shape), &args) }
}

/// Assembly after the patch projection: h (batch·T, hidden) overwritten with `cls + pos[0]` in
/// each image's first row and `pe[b·np + t − 1] + pos[t]` in row t ≥ 1. pe (batch·np, hidden),
/// cls (hidden), position (T, hidden).
pub fn vit_assemble<T: Element, B: Backend>(
    backend: &B,
    shape: &VitShape,
    pe: &B::Buffer<T>,
    cls: &B::Buffer<T>,
    position: &B::Buffer<T>,
    h: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::VitAssemble, T::DTYPE)?;
    check_vit_shape(kernel.name, shape)?;
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    super::check_lens(
        kernel.name,
        &[
            ("pe", backend.buffer_len(pe), b * np * d),
            ("cls", backend.buffer_len(cls), d),
            ("position", backend.buffer_len(position), t * d),
            ("h", backend.buffer_len(h), b * t * d),
        ],
    )?;
    let args = [
        backend.arg_in(pe),
        backend.arg_in(cls),
        backend.arg_in(position),
        backend.arg_out(h),
        KernelArg::I32(b as i32),
        KernelArg::I32(t as i32),
        KernelArg::I32(d as i32),
    ];
    // SAFETY: the arguments follow embedding_vit_assemble's parameter list (pe, cls, position,
    // h, batch, tokens, D); every length was checked for this shape, and h is the one, mutably
    // borrowed, output.
    unsafe { backend.launch(&kernel, &vit_assemble_config(shape), &args) }
}

/// The assembly backward given ∂h (batch·T, hidden): overwrites ∂pe (batch·np, hidden) with the
/// rows t ≥ 1, ∂cls (hidden) = Σ_b ∂h[b·T] and ∂position (T, hidden) = Σ_b ∂h[b·T + t], both
/// summed over b in order (deterministic).
pub fn vit_assemble_backward<T: Element, B: Backend>(
    backend: &B,
    shape: &VitShape,
    dh: &B::Buffer<T>,
    dpe: &mut B::Buffer<T>,
    dcls: &mut B::Buffer<T>,
    dposition: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::VitAssembleBackward, T::DTYPE)?;
    check_vit_shape(kernel.name, shape)?;
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    super::check_lens(
        kernel.name,
        &[
            ("dh", backend.buffer_len(dh), b * t * d),
            ("dpe", backend.buffer_len(dpe), b * np * d),
            ("dcls", backend.buffer_len(dcls), d),
            ("dposition", backend.buffer_len(dposition), t * d),
        ],
    )?;
    let args = [
        backend.arg_in(dh),
        backend.arg_out(dpe),
        backend.arg_out(dcls),
        backend.arg_out(dposition),
        KernelArg::I32(b as i32),
        KernelArg::I32(t as i32),
        KernelArg::I32(d as i32),
    ];
    // SAFETY: the arguments follow embedding_vit_assemble_bwd's parameter list (dh, dpe, dcls,
    // dposition, batch, tokens, D); every length was checked for this shape, and the three
    // outputs are distinct, mutably borrowed buffers.
    unsafe { backend.launch(&kernel, &vit_assemble_backward_config(shape), &args) }
}

/// The BERT forward reference, plain f64 loops: out (rows, hidden).
pub fn reference_bert_forward(
    shape: &BertShape,
    ids: &[u32],
    type_ids: &[u32],
    word: &[f64],
    position: &[f64],
    token_type: &[f64],
) -> Vec<f64> {
    let BertShape {
        rows, seq, hidden: d, ..
    } = *shape;
    assert!(ids.len() == rows && type_ids.len() == rows);
    let mut out = vec![0.0; rows * d]; // (rows, d)
    for r in 0..rows {
        let (id, tt, pos) = (ids[r] as usize, type_ids[r] as usize, r % seq);
        for j in 0..d {
            out[r * d + j] = word[id * d + j] + position[pos * d + j] + token_type[tt * d + j];
        }
    }
    out
}

/// The BERT backward reference, plain f64 loops (the model's scatter-add): ∂word (vocab,
/// hidden), ∂position (positions, hidden), ∂token_type (types, hidden).
pub fn reference_bert_backward(shape: &BertShape, ids: &[u32], type_ids: &[u32], de: &[f64]) -> [Vec<f64>; 3] {
    let BertShape {
        rows,
        seq,
        hidden: d,
        vocab,
        positions,
        types,
    } = *shape;
    assert!(ids.len() == rows && type_ids.len() == rows && de.len() == rows * d);
    let mut dword = vec![0.0; vocab * d]; // (V, d)
    let mut dpos = vec![0.0; positions * d]; // (P, d)
    let mut dtype = vec![0.0; types * d]; // (types, d)
    for r in 0..rows {
        let (id, tt, pos) = (ids[r] as usize, type_ids[r] as usize, r % seq);
        for j in 0..d {
            let g = de[r * d + j];
            dword[id * d + j] += g;
            dpos[pos * d + j] += g;
            dtype[tt * d + j] += g;
        }
    }
    [dword, dpos, dtype]
}

/// The patch extraction reference: patches (batch·np, patch²) from pixels (batch, side, side).
pub fn reference_vit_patches(shape: &VitShape, pixels: &[f64]) -> Vec<f64> {
    let VitShape {
        batch, side, patch: p, ..
    } = *shape;
    let (np, grid) = (shape.patches(), side / p);
    assert_eq!(pixels.len(), batch * side * side);
    let mut patches = vec![0.0; batch * np * p * p]; // (B·np, p²)
    for (pi, out) in patches.chunks_mut(p * p).enumerate() {
        let (img, k) = (pi / np, pi % np);
        let (gy, gx) = (k / grid, k % grid);
        for y in 0..p {
            for x in 0..p {
                out[y * p + x] = pixels[img * side * side + (gy * p + y) * side + gx * p + x];
            }
        }
    }
    patches
}

/// The assembly reference: h (batch·T, hidden) from pe (batch·np, hidden), cls (hidden) and
/// position (T, hidden).
pub fn reference_vit_assemble(shape: &VitShape, pe: &[f64], cls: &[f64], position: &[f64]) -> Vec<f64> {
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    assert!(pe.len() == b * np * d && cls.len() == d && position.len() == t * d);
    let mut h = vec![0.0; b * t * d]; // (B·T, d)
    for img in 0..b {
        for tok in 0..t {
            let src = if tok == 0 {
                cls
            } else {
                &pe[(img * np + tok - 1) * d..][..d]
            };
            for j in 0..d {
                h[(img * t + tok) * d + j] = src[j] + position[tok * d + j];
            }
        }
    }
    h
}

/// The assembly backward reference: ∂pe (batch·np, hidden), ∂cls (hidden), ∂position (T,
/// hidden) from ∂h (batch·T, hidden).
pub fn reference_vit_assemble_backward(shape: &VitShape, dh: &[f64]) -> [Vec<f64>; 3] {
    let (b, np, t, d) = (shape.batch, shape.patches(), shape.tokens(), shape.hidden);
    assert_eq!(dh.len(), b * t * d);
    let mut dpe = vec![0.0; b * np * d]; // (B·np, d)
    let mut dcls = vec![0.0; d]; // (d)
    let mut dpos = vec![0.0; t * d]; // (T, d)
    for img in 0..b {
        for tok in 0..t {
            for j in 0..d {
                let g = dh[(img * t + tok) * d + j];
                dpos[tok * d + j] += g;
                if tok == 0 {
                    dcls[j] += g;
                } else {
                    dpe[(img * np + tok - 1) * d + j] = g;
                }
            }
        }
    }
    [dpe, dcls, dpos]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        let k = kernel(Entry::BertDword(Variant::Indexed), DType::BF16).unwrap();
        assert_eq!(k.name, "embedding_bert_dword_indexed_bf16");
        assert!(kernel(Entry::VitPatches, DType::F16).is_err());
    }

    #[test]
    fn csr_index_lists_each_ids_rows_in_order() {
        let (offsets, rows) = csr_index(&[3, 0, 3, 1, 3, 0], 5);
        assert_eq!(offsets, [0, 2, 3, 3, 6, 6]);
        assert_eq!(rows, [1, 5, 3, 0, 2, 4]);
    }

    #[test]
    fn grids_cover_every_element() {
        let shape = BertShape {
            rows: 3 * 17,
            seq: 17,
            hidden: 40,
            vocab: 1001,
            positions: 20,
            types: 3,
        };
        let covers = |dims: LaunchDims, n: usize| dims.blocks() as usize * THREADS as usize >= n;
        assert!(covers(bert_forward_config(&shape), 51 * 40));
        for &variant in ALL {
            let steps = bert_backward_config(variant, &shape);
            assert!(covers(steps[0].1, 1001 * 40) && covers(steps[1].1, 20 * 40));
            assert_eq!(steps[2].1.grid, [2, 3, 1]);
            assert!(steps.iter().all(|(_, dims)| dims.threads_per_block() == 256));
        }
        let vit = VitShape {
            batch: 2,
            side: 28,
            patch: 7,
            hidden: 100,
        };
        assert_eq!((vit.patches(), vit.tokens()), (16, 17));
        assert!(covers(vit_patches_config(&vit), 2 * 16 * 49));
        assert!(covers(vit_assemble_config(&vit), 2 * 17 * 100));
        assert!(covers(vit_assemble_backward_config(&vit), 17 * 100));
    }
}
