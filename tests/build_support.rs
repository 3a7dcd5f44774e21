//! Tests of the pure helpers of `build.rs` (`build/support.rs`): the nvcc search order, the
//! command lines, the spill detector and the generated `kernels.rs`.

#[path = "../build/support.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use support::*;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn nvcc_search_order_is_the_documented_one() {
    let sites = vec![PathBuf::from(
        "/repo/.toolchain/lib/python3.11/site-packages",
    )];
    let c = nvcc_candidates(
        env(&[
            ("FLASHMOE_NVCC", "/x/nvcc"),
            ("CUDA_HOME", "/home-cuda"),
            ("CUDA_PATH", "/path-cuda"),
            ("PATH", "/p1:/p2"),
        ]),
        &sites,
    );
    let want: Vec<PathBuf> = [
        "/x/nvcc",
        "/home-cuda/bin/nvcc",
        "/path-cuda/bin/nvcc",
        "/p1/nvcc",
        "/p2/nvcc",
        "/usr/local/cuda/bin/nvcc",
        "/repo/.toolchain/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(c, want);
    // Unset or empty variables add nothing.
    let c = nvcc_candidates(env(&[("CUDA_HOME", " ")]), &[]);
    assert_eq!(c, vec![PathBuf::from("/usr/local/cuda/bin/nvcc")]);
}

#[test]
fn nvshmem_is_found_next_to_a_wheel_nvcc() {
    let nvcc = Path::new("/v/site-packages/nvidia/cu13/bin/nvcc");
    let sites = vec![PathBuf::from("/t/site-packages")];
    assert_eq!(
        nvshmem_candidates(Some("/opt/nvshmem"), nvcc, &sites),
        vec![
            PathBuf::from("/opt/nvshmem"),
            PathBuf::from("/v/site-packages/nvidia/nvshmem"),
            PathBuf::from("/t/site-packages/nvidia/nvshmem"),
        ]
    );
    assert_eq!(nvshmem_candidates(Some(""), nvcc, &[]).len(), 1);
}

#[test]
fn arch_accepts_the_usual_spellings() {
    assert_eq!(normalize_arch("").unwrap(), DEFAULT_ARCH);
    assert_eq!(normalize_arch(" sm_90a ").unwrap(), "90a");
    assert_eq!(normalize_arch("compute_100a").unwrap(), "100a");
    assert_eq!(normalize_arch("80").unwrap(), "80");
    for bad in ["sm_", "a90", "90a,100a", "sm_90 a", "-O0"] {
        let e = normalize_arch(bad).unwrap_err();
        assert!(e.contains("FLASHMOE_CUDA_ARCH"), "{bad}: {e}");
    }
}

#[test]
fn flags_and_names() {
    assert!(flag_value(Some("1")) && flag_value(Some("yes")) && flag_value(Some("true")));
    for off in [
        None,
        Some(""),
        Some("0"),
        Some("false"),
        Some("no"),
        Some(" 0 "),
    ] {
        assert!(!flag_value(off), "{off:?}");
    }
    assert!(valid_kernel_name("flashmoe_nvshmem") && valid_kernel_name("abi_probe2"));
    assert!(!valid_kernel_name("") && !valid_kernel_name("a-b") && !valid_kernel_name("a\"b"));
    assert!(is_nvshmem_kernel("flashmoe_nvshmem") && !is_nvshmem_kernel("nvshmem_flashmoe"));
}

#[test]
fn plain_kernels_compile_to_an_sm90a_cubin_in_one_step() {
    let common = common_flags("90a", Path::new("/r/kernel/include"), " -lineinfo  -DX=1 ");
    let args = cubin_args(
        &common,
        Path::new("/r/kernel/k.cu"),
        Path::new("/o/k.cubin"),
    );
    let want = [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-O3",
        "-std=c++17",
        "-I/r/kernel/include",
        "-Xptxas",
        "-v",
        "-lineinfo",
        "-DX=1",
        "-cubin",
        "/r/kernel/k.cu",
        "-o",
        "/o/k.cubin",
    ];
    assert_eq!(args, want);
}

#[test]
fn nvshmem_kernels_are_relocatable_then_device_linked() {
    let common = common_flags("90a", Path::new("/r/kernel/include"), "");
    let (compile, link) = nvshmem_args(
        "90a",
        &common,
        Path::new("/n"),
        Path::new("/r/kernel/k_nvshmem.cu"),
        Path::new("/o/k.o"),
        Path::new("/o/k.cubin"),
    );
    assert_eq!(compile[0], "-rdc=true");
    assert_eq!(&compile[1..=common.len()], &common[..]);
    assert_eq!(
        &compile[common.len() + 1..],
        [
            "-I/n/include",
            "-c",
            "/r/kernel/k_nvshmem.cu",
            "-o",
            "/o/k.o"
        ]
    );
    assert_eq!(
        link,
        [
            "-gencode=arch=compute_90a,code=sm_90a",
            "-dlink",
            "-cubin",
            "/o/k.o",
            "-L/n/lib",
            "-lnvshmem_device",
            "-o",
            "/o/k.cubin"
        ]
    );
}

#[test]
fn spills_are_attributed_to_their_function() {
    let log = "\
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for helper
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers
";
    let s = spill_lines(log);
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(s[0].starts_with("helper: 8 bytes stack frame"), "{}", s[0]);
    assert!(s[1].starts_with("other: "), "{}", s[1]);
    assert!(
        spill_lines("    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
            .is_empty()
    );
}

#[test]
fn generated_kernels_rs_lists_every_kernel() {
    let a = PathBuf::from("/o/abi_probe.cubin");
    let f = PathBuf::from("/o/flashmoe.cubin");
    let src = kernels_rs(
        &[
            Embedded {
                name: "abi_probe",
                cubin: &a,
                bytes: 10,
            },
            Embedded {
                name: "flashmoe",
                cubin: &f,
                bytes: 20,
            },
        ],
        &[("flashmoe_nvshmem".into(), "no \"nvshmem\"".into())],
        "sm_90a",
        "",
    );
    assert!(
        src.contains(
            "static CUBIN_0: Aligned<[u8; 10]> = Aligned(*include_bytes!(\"/o/abi_probe.cubin\"));"
        ),
        "{src}"
    );
    assert!(src.contains("static CUBIN_1: Aligned<[u8; 20]>"), "{src}");
    assert!(src.contains("(\"abi_probe\", &CUBIN_0.0),"), "{src}");
    assert!(src.contains("(\"flashmoe\", &CUBIN_1.0),"), "{src}");
    assert!(
        src.contains("(\"flashmoe_nvshmem\", \"no \\\"nvshmem\\\"\"),"),
        "{src}"
    );
    assert!(src.contains("static ARCH: &str = \"sm_90a\";"), "{src}");
    assert!(src.contains("static BUILD_NOTE: &str = \"\";"), "{src}");

    let empty = kernels_rs(&[], &[], "", "nvcc not found");
    assert!(!empty.contains("CUBIN_0"));
    assert!(
        empty.contains("static CUBINS: &[(&str, &[u8])] = &[\n];"),
        "{empty}"
    );
    assert!(empty.contains("static BUILD_NOTE: &str = \"nvcc not found\";"));
}
