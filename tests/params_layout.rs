//! The kernel ABI: `kernel/include/flashmoe/params.h` against its Rust mirror `host/params.rs`.
//!
//! The header is parsed for its structs' fields and its `#define` constants; a C program
//! generated from that list is compiled with the host C compiler (`$CC`, else `cc`) and
//! prints every struct size, every field's offset and size, and every constant. These are
//! compared with `offset_of!` / `size_of` on the Rust types and with the Rust constants.
//!
//! A field or constant added on one side only fails the test:
//! * a field added to the header only: the parsed header field names differ from the list
//!   of Rust fields in [`rust_structs`];
//! * a field added to the Rust struct only: the list no longer tiles the Rust struct
//!   (offsets must run without gap up to `size_of`; the structs are `Pod`, so no padding);
//! * a `#define` without an entry in [`rust_constants`] (or an entry without a `#define`)
//!   is reported by name.

mod host_cc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flashmoe::config::{Dtype, MlpKind, Router};
use flashmoe::params::{self, KernelParams, LayerParams, RankParams};

/// One field as seen by one side: name, offset, size, type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    offset: usize,
    size: usize,
    ty: String,
}

/// Fields of a Rust struct with their offsets, sizes and type names.
macro_rules! rust_fields {
    ($t:ty; $($f:ident),* $(,)?) => {{
        let v = <$t>::default();
        vec![$(Field {
            name: stringify!($f).to_string(),
            offset: std::mem::offset_of!($t, $f),
            size: std::mem::size_of_val(&v.$f),
            ty: short_type_name(std::any::type_name_of_val(&v.$f)),
        }),*]
    }};
}

/// `flashmoe::params::RankParams` -> `RankParams`; `[flashmoe::params::RankParams; 8]` ->
/// `[RankParams; 8]`.
fn short_type_name(full: &str) -> String {
    full.replace("flashmoe::params::", "")
}

/// The Rust side, one list per struct, keyed by the C struct name.
fn rust_structs() -> BTreeMap<&'static str, (usize, Vec<Field>)> {
    let layer = rust_fields!(LayerParams;
        version, world, tokens_max, hidden, intermediate, experts, top_k, max_local, capacity,
        dtype, mlp, router, renormalize, shared_width, shared_gated, tile_m, tile_n, tile_k,
        routed_scale, fault_silent_rank, pair_capacity, route_slots, row_blocks, pair_blocks,
        timeout_ns,
        heap_stride_row, heap_stride_peer, heap_stride_cell, heap_cells, heap_dispatch_rows,
        heap_combine_rows, heap_meta, heap_meta_stride_peer, heap_meta_stride_cell,
        heap_meta_counts, heap_meta_pairs, heap_meta_rows, heap_dispatch_signals,
        heap_combine_signals, heap_bytes,
        ws_epoch, ws_status, ws_dropped, ws_expert_counts, ws_route_ids, ws_route_weights,
        ws_route_slots, ws_route_rank_slots, ws_rank_counts, ws_gate_hist, ws_rank_hist,
        ws_pair_base, ws_act, ws_act_stride_row, ws_act_stride_source, ws_y, ws_y_stride_row,
        ws_y_stride_source, ws_gemm0_done, ws_gemm1_done, ws_reduce_done, ws_queue_ctl,
        ws_queue, ws_queue_capacity, ws_sync, ws_shared_act, ws_shared_act_stride_row, ws_shared_out,
        ws_shared_out_stride_row, ws_shared_done, ws_bytes,
        expert_owner, router_weight, router_bias, logit_bias, route_k, stop_after, n_group, topk_group, router_f32, router_eps, mlp_alpha, mlp_limit, mlp_up_offset, pad3,
        ws_logits, ws_logits_stride_row, tile_mode, peer_scope, ws_phase_times,
    );
    let rank = rust_fields!(RankParams;
        rank, tokens, local_experts, pad0, heap, peers, workspace, scratch, x, out, w0, w1,
        shared_w0, shared_w1, shared_gate, given_ids, given_weights, b0, b1,
    );
    let kernel = rust_fields!(KernelParams; layer, launch_ranks, pad0, rank);
    BTreeMap::from([
        ("FmLayerParams", (size_of::<LayerParams>(), layer)),
        ("FmRankParams", (size_of::<RankParams>(), rank)),
        ("FmKernelParams", (size_of::<KernelParams>(), kernel)),
    ])
}

/// The Rust value of every `#define` of params.h.
fn rust_constants() -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("FM_PARAMS_VERSION", params::PARAMS_VERSION as u64),
        ("FM_MAX_LAUNCH_RANKS", params::MAX_LAUNCH_RANKS as u64),
        ("FM_NO_FAULT", params::NO_FAULT as u64),
        ("FM_TILES_AUTO", params::TILES_AUTO as u64),
        ("FM_TILES_CLASSIC", params::TILES_CLASSIC as u64),
        ("FM_TILES_NARROW", params::TILES_NARROW as u64),
        ("FM_TILES_AUTO_SERIAL", params::TILES_AUTO_SERIAL as u64),
        ("FM_DECODE_MAX_ROWS", params::DECODE_MAX_ROWS as u64),
        ("FM_SCOPE_SYSTEM", params::SCOPE_SYSTEM as u64),
        ("FM_SCOPE_GPU", params::SCOPE_GPU as u64),
        ("FM_PHASE_WORDS", params::PHASE_WORDS as u64),
        ("FM_PHASE_MAX_BLOCKS", params::PHASE_MAX_BLOCKS as u64),
        ("FM_STOP_NONE", params::STOP_NONE as u64),
        ("FM_MAX_GROUPS", flashmoe::config::MAX_GROUPS as u64),
        ("FM_STOP_GATE", flashmoe::stages::Stage::Gate.code() as u64),
        (
            "FM_STOP_DISPATCH",
            flashmoe::stages::Stage::Dispatch.code() as u64,
        ),
        (
            "FM_STOP_GEMM0",
            flashmoe::stages::Stage::Gemm0.code() as u64,
        ),
        (
            "FM_STOP_GEMM1",
            flashmoe::stages::Stage::Gemm1.code() as u64,
        ),
        (
            "FM_STOP_COMBINE",
            flashmoe::stages::Stage::Combine.code() as u64,
        ),
        (
            "FM_CONSEQUENCE_WAIT_FACTOR",
            params::CONSEQUENCE_WAIT_FACTOR as u64,
        ),
        ("FM_BLOCK_THREADS", params::BLOCK_THREADS as u64),
        ("FM_MIN_BLOCKS_PER_RANK", params::MIN_BLOCKS_PER_RANK as u64),
        ("FM_SMEM_BYTES_BF16", params::SMEM_BYTES_BF16 as u64),
        ("FM_SMEM_BYTES_F16", params::SMEM_BYTES_F16 as u64),
        ("FM_SMEM_BYTES_F32", params::SMEM_BYTES_F32 as u64),
        ("FM_GATE_CHUNK", params::GATE_CHUNK as u64),
        ("FM_STATUS_CODE", params::status_word::CODE as u64),
        ("FM_STATUS_STAGE", params::status_word::STAGE as u64),
        ("FM_STATUS_WHERE", params::status_word::WHERE as u64),
        ("FM_STATUS_EXPECTED", params::status_word::EXPECTED as u64),
        ("FM_STATUS_OBSERVED", params::status_word::OBSERVED as u64),
        ("FM_STATUS_WAITED", params::status_word::WAITED as u64),
        ("FM_STATUS_ABORT", params::status_word::ABORT as u64),
        ("FM_DTYPE_BF16", params::dtype_code(Dtype::Bf16) as u64),
        ("FM_DTYPE_F16", params::dtype_code(Dtype::F16) as u64),
        ("FM_DTYPE_F32", params::dtype_code(Dtype::F32) as u64),
        ("FM_MLP_SWIGLU", params::mlp_code(MlpKind::SwiGlu) as u64),
        ("FM_MLP_GEGLU", params::mlp_code(MlpKind::GeGlu) as u64),
        ("FM_MLP_GELU", params::mlp_code(MlpKind::Gelu) as u64),
        ("FM_MLP_RELU", params::mlp_code(MlpKind::Relu) as u64),
        (
            "FM_MLP_CLAMPED_SWIGLU",
            params::mlp_code(MlpKind::clamped_swiglu(1.702, 7.0)) as u64,
        ),
        (
            "FM_ROUTER_SOFTMAX",
            params::router_code(Router::Softmax { renormalize: true }).0 as u64,
        ),
        (
            "FM_ROUTER_SIGMOID_BIAS",
            params::router_code(Router::SigmoidBias { renormalize: true }).0 as u64,
        ),
        (
            "FM_ROUTER_GIVEN",
            params::router_code(Router::Given).0 as u64,
        ),
        (
            "FM_ROUTER_SIGMOID_INPUT",
            params::router_code(Router::SigmoidInput).0 as u64,
        ),
        (
            "FM_ROUTER_SPARSEMIXER",
            params::router_code(Router::sparse_mixer(0.01)).0 as u64,
        ),
        (
            "FM_ROUTER_TOPK_SOFTMAX",
            params::router_code(Router::TopkSoftmax).0 as u64,
        ),
        (
            "FM_ROUTER_SQRTSOFTPLUS_BIAS",
            params::router_code(Router::SqrtSoftplusBias { renormalize: true }).0 as u64,
        ),
        (
            "FM_ROUTER_HASH_SQRTSOFTPLUS",
            params::router_code(Router::HashSqrtSoftplus).0 as u64,
        ),
        ("FM_STATUS_OK", params::status::OK),
        ("FM_STATUS_TIMEOUT", params::status::TIMEOUT),
        ("FM_STATUS_BAD_PARAMS", params::status::BAD_PARAMS),
        ("FM_STATUS_BAD_ROUTING", params::status::BAD_ROUTING),
        ("FM_STATUS_BAD_SIGNAL", params::status::BAD_SIGNAL),
        ("FM_STATUS_QUEUE_OVERFLOW", params::status::QUEUE_OVERFLOW),
        ("FM_STAGE_SETUP", params::stage::SETUP),
        ("FM_STAGE_GATE", params::stage::GATE),
        ("FM_STAGE_DISPATCH", params::stage::DISPATCH),
        ("FM_STAGE_EXPERT", params::stage::EXPERT),
        ("FM_STAGE_COMBINE", params::stage::COMBINE),
    ])
}

/// C type of a header field -> the Rust type the mirror must use.
fn rust_type_for(c_type: &str, dims: &[String], c_consts: &BTreeMap<String, u64>) -> String {
    let base = match c_type {
        "uint8_t" => "u8".to_string(),
        "uint16_t" => "u16".to_string(),
        "uint32_t" => "u32".to_string(),
        "uint64_t" => "u64".to_string(),
        "int32_t" => "i32".to_string(),
        "int64_t" => "i64".to_string(),
        "float" => "f32".to_string(),
        "double" => "f64".to_string(),
        s if s.starts_with("Fm") => s["Fm".len()..].to_string(),
        other => panic!("params.h uses a type this test does not know: {other}"),
    };
    dims.iter().rev().fold(base, |inner, d| {
        let n = d
            .parse::<u64>()
            .ok()
            .or_else(|| c_consts.get(d).copied())
            .unwrap_or_else(|| panic!("array dimension {d} is neither a number nor a #define"));
        format!("[{inner}; {n}]")
    })
}

/// A field as declared in the header.
#[derive(Debug, Clone)]
struct HeaderField {
    name: String,
    c_type: String,
    dims: Vec<String>,
}

/// What the header declares.
#[derive(Debug, Default)]
struct Header {
    /// Struct name -> fields in declaration order.
    structs: BTreeMap<String, Vec<HeaderField>>,
    /// Object-like `#define NAME value` names (not the include guard).
    defines: Vec<String>,
}

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
            out.push(' ');
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn parse_header(src: &str) -> Header {
    let src = strip_comments(src);
    let mut h = Header::default();
    for line in src.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("#define") {
            let name = words.next().expect("#define without a name");
            let has_value = words.next().is_some();
            if has_value && !name.contains('(') {
                h.defines.push(name.to_string());
            }
        }
    }
    let mut rest = src.as_str();
    while let Some(start) = rest.find("typedef struct") {
        let body_start = start + rest[start..].find('{').expect("struct without {");
        let body_end = body_start + rest[body_start..].find('}').expect("struct without }");
        let tail = &rest[body_end + 1..];
        let name_end = tail.find(';').expect("typedef without ;");
        let name = tail[..name_end].trim().to_string();
        let mut fields = Vec::new();
        for decl in rest[body_start + 1..body_end].split(';') {
            let decl = decl.trim();
            if decl.is_empty() {
                continue;
            }
            let (c_type, declarator) = decl
                .rsplit_once(char::is_whitespace)
                .unwrap_or_else(|| panic!("cannot parse field `{decl}` of {name}"));
            let mut parts = declarator.split('[');
            let field = parts.next().unwrap().trim().to_string();
            let dims = parts
                .map(|d| d.trim_end_matches(']').trim().to_string())
                .collect();
            fields.push(HeaderField {
                name: field,
                c_type: c_type.trim().to_string(),
                dims,
            });
        }
        assert!(!fields.is_empty(), "{name} has no fields");
        h.structs.insert(name, fields);
        rest = &tail[name_end..];
    }
    h
}

fn header_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/include/flashmoe/params.h")
}

/// Output of the generated C program: struct sizes, fields, constants.
struct CLayout {
    sizes: BTreeMap<String, usize>,
    fields: BTreeMap<String, Vec<(String, usize, usize)>>,
    consts: BTreeMap<String, u64>,
}

fn c_layout(h: &Header) -> CLayout {
    let mut prog = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"flashmoe/params.h\"\n\
         int main(void) {\n",
    );
    for (s, fields) in &h.structs {
        prog += &format!("  printf(\"S {s} %zu\\n\", sizeof({s}));\n");
        for f in fields {
            let n = &f.name;
            prog += &format!(
                "  printf(\"F {s} {n} %zu %zu\\n\", offsetof({s}, {n}), sizeof((({s}*)0)->{n}));\n"
            );
        }
    }
    for d in &h.defines {
        prog += &format!("  printf(\"D {d} %llu\\n\", (unsigned long long)({d}));\n");
    }
    prog += "  return 0;\n}\n";

    let stdout = host_cc::build_and_run(host_cc::Lang::C, &prog);
    let mut l = CLayout {
        sizes: BTreeMap::new(),
        fields: BTreeMap::new(),
        consts: BTreeMap::new(),
    };
    for line in stdout.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "S" => {
                l.sizes.insert(w[1].into(), w[2].parse().unwrap());
            }
            "F" => l.fields.entry(w[1].into()).or_default().push((
                w[2].into(),
                w[3].parse().unwrap(),
                w[4].parse().unwrap(),
            )),
            "D" => {
                l.consts.insert(w[1].into(), w[2].parse().unwrap());
            }
            other => panic!("unexpected line kind {other}"),
        }
    }
    l
}

/// The fields must tile `[0, size)` with no gap and no overlap.
fn assert_tiles(what: &str, size: usize, fields: &[(String, usize, usize)]) {
    let mut sorted = fields.to_vec();
    sorted.sort_by_key(|f| f.1);
    let mut end = 0;
    for (name, off, sz) in &sorted {
        assert_eq!(
            *off, end,
            "{what}: field `{name}` at offset {off}, expected {end}: a field is missing from \
             the list or there is padding"
        );
        end = off + sz;
    }
    assert_eq!(end, size, "{what}: fields end at {end}, struct size {size}");
}

#[test]
fn header_parser_sees_every_struct() {
    let h = parse_header(&std::fs::read_to_string(header_path()).unwrap());
    let names: Vec<&str> = h.structs.keys().map(String::as_str).collect();
    let rust = rust_structs();
    let expected: Vec<&str> = rust.keys().copied().collect();
    assert_eq!(names, expected, "structs of params.h vs host/params.rs");
    // The parser must agree with the C compiler about the field lists.
    let c = c_layout(&h);
    for (s, fields) in &h.structs {
        let c_names: Vec<&str> = c.fields[s].iter().map(|f| f.0.as_str()).collect();
        let h_names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(c_names, h_names);
        assert_tiles(&format!("C {s}"), c.sizes[s], &c.fields[s]);
    }
}

#[test]
fn every_field_has_the_same_offset_size_and_type() {
    let h = parse_header(&std::fs::read_to_string(header_path()).unwrap());
    let c = c_layout(&h);
    let structs = rust_structs();
    // Names first, for every struct, so that a field added on one side is named.
    for (s, (_, rust)) in &structs {
        let h_names: Vec<&str> = h.structs[*s].iter().map(|f| f.name.as_str()).collect();
        let r_names: Vec<&str> = rust.iter().map(|f| f.name.as_str()).collect();
        let only_h: Vec<&&str> = h_names.iter().filter(|n| !r_names.contains(n)).collect();
        let only_r: Vec<&&str> = r_names.iter().filter(|n| !h_names.contains(n)).collect();
        assert!(
            only_h.is_empty() && only_r.is_empty(),
            "{s}: fields only in params.h: {only_h:?}; only in the Rust list: {only_r:?}"
        );
        assert_eq!(h_names, r_names, "{s}: field order, header vs Rust");
    }
    for (s, (rust_size, rust)) in structs {
        let as_tuples: Vec<(String, usize, usize)> = rust
            .iter()
            .map(|f| (f.name.clone(), f.offset, f.size))
            .collect();
        let header = &h.structs[s];
        assert_tiles(&format!("Rust {s}"), rust_size, &as_tuples);
        assert_eq!(c.sizes[s], rust_size, "sizeof({s})");

        for ((hf, (_, c_off, c_size)), rf) in header.iter().zip(&c.fields[s]).zip(&rust) {
            assert_eq!(*c_off, rf.offset, "offsetof({s}, {})", hf.name);
            assert_eq!(*c_size, rf.size, "sizeof({s}.{})", hf.name);
            let want = rust_type_for(&hf.c_type, &hf.dims, &c.consts);
            assert_eq!(rf.ty, want, "type of {s}.{} ({})", hf.name, hf.c_type);
        }
    }
}

#[test]
fn every_define_matches_a_rust_constant() {
    let h = parse_header(&std::fs::read_to_string(header_path()).unwrap());
    let c = c_layout(&h);
    let rust = rust_constants();
    let missing: Vec<&String> = c
        .consts
        .keys()
        .filter(|k| !rust.contains_key(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "#defines of params.h with no Rust counterpart in this test's table: {missing:?}"
    );
    let stale: Vec<&&str> = rust
        .keys()
        .filter(|k| !c.consts.contains_key(**k))
        .collect();
    assert!(
        stale.is_empty(),
        "Rust constants with no #define: {stale:?}"
    );
    for (name, value) in &rust {
        assert_eq!(c.consts[*name], *value, "{name}: header vs Rust");
    }
}

#[test]
fn params_fit_the_kernel_parameter_limit() {
    // The header static_asserts 4 KiB under C++; the Rust side must agree.
    assert!(size_of::<KernelParams>() <= 4096);
    assert_eq!(size_of::<KernelParams>() % 8, 0);
}

#[test]
fn parser_reads_arrays_comments_and_defines() {
    let h = parse_header(
        "#define A 3u // three\n#define F(x) x\n/* typedef struct Nope { int a; } Nope; */\n\
         typedef struct FmT {\n uint32_t a; // c\n uint64_t b[A][2];\n} FmT;\n",
    );
    assert_eq!(h.defines, vec!["A"]);
    let t = &h.structs["FmT"];
    assert_eq!(t.len(), 2);
    assert_eq!(t[1].name, "b");
    assert_eq!(t[1].dims, vec!["A", "2"]);
    let consts = BTreeMap::from([("A".to_string(), 3)]);
    assert_eq!(
        rust_type_for(&t[1].c_type, &t[1].dims, &consts),
        "[[u64; 2]; 3]"
    );
}
