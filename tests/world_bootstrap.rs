//! The world bootstrap among real processes over loopback (CPU only, runs in CI).
//!
//! The multi-process tests start copies of this test binary through the launcher; each
//! copy runs only the ignored test `child_rank`, whose behaviour is chosen by
//! `FLASHMOE_TEST_CHILD`. Only 127.0.0.1 and free ports are used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flashmoe::world::bootstrap::{
    exchange_unique_id, BootstrapOptions, Rendezvous, UNIQUE_ID_BYTES,
};
use flashmoe::world::env::WorldEnv;
use flashmoe::world::launcher::{emit_result, launch_local_with, LaunchOptions, RankReport};
use flashmoe::Error;
use nvshmem_sys::locate::{project_root, wheel_lib_dirs, HOST_LIBRARY};
use nvshmem_sys::{Nvshmem, UniqueId};
use rand::Rng;

const MODE: &str = "FLASHMOE_TEST_CHILD";
const PID_DIR: &str = "FLASHMOE_TEST_PID_DIR";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn wheel_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLASHMOE_NVSHMEM_LIB") {
        return Some(PathBuf::from(p));
    }
    [
        project_root().join(".toolchain"),
        PathBuf::from("/tmp/pipwarm/venv"),
    ]
    .iter()
    .flat_map(|v| wheel_lib_dirs(v))
    .map(|d| d.join(HOST_LIBRARY))
    .next()
}

// ---------------------------------------------------------------- child side

/// One rank: joins, receives rank 0's id, gathers everyone's view of it.
fn child_exchange(env: &WorldEnv, make: &str) -> flashmoe::Result<serde_json::Value> {
    let opts = BootstrapOptions::from_env(env);
    let (id, mut rv) = exchange_unique_id(env, opts, || match make {
        "nvshmem" => {
            let path = std::env::var_os("FLASHMOE_NVSHMEM_LIB").unwrap_or_default();
            let lib = Nvshmem::load_file(Path::new(&path))?;
            Ok(lib.get_uniqueid()?.to_bytes())
        }
        _ => {
            let mut id = [0u8; UNIQUE_ID_BYTES];
            rand::rng().fill(&mut id[..]);
            Ok(id)
        }
    })?;
    let views = rv.all_gather(hex(&id).as_bytes())?;
    rv.barrier()?;
    Ok(serde_json::json!({
        "rank": env.rank,
        "id": hex(&id),
        "views": views.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect::<Vec<_>>(),
    }))
}

fn child_main() -> flashmoe::Result<()> {
    let mode = std::env::var(MODE).unwrap_or_default();
    let env = WorldEnv::from_process()?;
    if let Some(dir) = std::env::var_os(PID_DIR) {
        let path = Path::new(&dir).join(format!("{}.pid", env.rank));
        std::fs::write(&path, std::process::id().to_string())
            .map_err(|source| Error::Io { path, source })?;
    }
    match mode.as_str() {
        "exchange" => emit_result(&child_exchange(&env, "random")?),
        "nvshmem" => emit_result(&child_exchange(&env, "nvshmem")?),
        "fail-rank-1" => {
            if env.rank == 1 {
                eprintln!("rank 1 fails on purpose");
                std::process::exit(3);
            }
            // The others block in the bootstrap, waiting for rank 1 (long deadline).
            emit_result(&child_exchange(&env, "random")?)
        }
        "missing-rank-2" => {
            if env.rank == 2 {
                return emit_result(&serde_json::json!({ "rank": 2, "joined": false }));
            }
            let start = Instant::now();
            let outcome = child_exchange(&env, "random");
            emit_result(&serde_json::json!({
                "rank": env.rank,
                "error": outcome.err().map(|e| e.to_string()),
                "waited_ms": start.elapsed().as_millis() as u64,
            }))
        }
        other => Err(Error::input(
            "FLASHMOE_TEST_CHILD",
            format!("unknown mode `{other}`"),
        )),
    }
}

/// Entry point of the child processes; ignored in normal runs.
#[test]
#[ignore = "entry point of the child processes of the multi-process tests"]
fn child_rank() {
    if let Err(e) = child_main() {
        eprintln!("child error: {e}");
        std::process::exit(2);
    }
}

// ---------------------------------------------------------------- parent side

fn launch(
    nproc: usize,
    mode: &str,
    extra: &[(&str, String)],
    timeout: Duration,
) -> flashmoe::Result<Vec<RankReport>> {
    let exe = std::env::current_exe().unwrap();
    let args: Vec<String> = [
        "--exact",
        "child_rank",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut env = vec![(MODE.to_string(), mode.to_string())];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let opts = LaunchOptions {
        timeout,
        env,
        forward_stderr: false,
    };
    launch_local_with(nproc, &exe, &args, &opts)
}

fn check_exchange(reports: &[RankReport], nproc: usize) -> String {
    assert_eq!(reports.len(), nproc);
    let id = reports[0].result["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 2 * UNIQUE_ID_BYTES);
    for (r, rep) in reports.iter().enumerate() {
        assert_eq!(rep.rank, r);
        assert_eq!(rep.result["rank"], r as u64);
        assert_eq!(
            rep.result["id"].as_str().unwrap(),
            id,
            "rank {r} got another id"
        );
        let views: Vec<&str> = rep.result["views"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(views, vec![id.as_str(); nproc], "rank {r}'s gathered views");
    }
    id
}

#[test]
fn four_processes_exchange_a_random_id() {
    let a = check_exchange(
        &launch(4, "exchange", &[], Duration::from_secs(60)).unwrap(),
        4,
    );
    let b = check_exchange(
        &launch(4, "exchange", &[], Duration::from_secs(60)).unwrap(),
        4,
    );
    assert_ne!(a, b, "two runs handed out the same random id");
}

#[test]
fn a_world_of_one_process_needs_no_peer() {
    check_exchange(
        &launch(1, "exchange", &[], Duration::from_secs(30)).unwrap(),
        1,
    );
}

#[test]
fn three_processes_exchange_a_real_nvshmem_unique_id() {
    let Some(lib) = wheel_library() else {
        eprintln!("SKIPPED: no nvidia-nvshmem-cu13 wheel found (set FLASHMOE_NVSHMEM_LIB)");
        return;
    };
    let reports = launch(
        3,
        "nvshmem",
        &[("FLASHMOE_NVSHMEM_LIB", lib.display().to_string())],
        Duration::from_secs(60),
    )
    .unwrap();
    let id = check_exchange(&reports, 3);
    let bytes: Vec<u8> = (0..UNIQUE_ID_BYTES)
        .map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let uid = UniqueId::from_bytes(&bytes.try_into().unwrap());
    assert!(uid.has_expected_version(), "{uid:?}");
}

#[test]
fn a_rank_that_never_joins_is_named_within_the_deadline() {
    let start = Instant::now();
    let reports = launch(
        3,
        "missing-rank-2",
        &[("FLASHMOE_BOOTSTRAP_TIMEOUT_S", "2".to_string())],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(reports[2].result["joined"], false);
    let err0 = reports[0].result["error"]
        .as_str()
        .expect("rank 0 must fail");
    assert!(
        err0.contains("[2]") && err0.contains("did not join"),
        "{err0}"
    );
    let waited = reports[0].result["waited_ms"].as_u64().unwrap();
    assert!((1900..6000).contains(&waited), "rank 0 waited {waited} ms");
    let err1 = reports[1].result["error"]
        .as_str()
        .expect("rank 1 must fail");
    assert!(err1.contains("rank 2") || err1.contains("within"), "{err1}");
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_launcher_kills_the_survivors_when_one_rank_fails() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = launch(
        4,
        "fail-rank-1",
        &[
            (PID_DIR, dir.path().display().to_string()),
            ("FLASHMOE_BOOTSTRAP_TIMEOUT_S", "120".to_string()),
        ],
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    match &err {
        Error::RankFailed {
            rank,
            reason,
            stderr_tail,
        } => {
            assert_eq!(*rank, 1, "{err}");
            assert!(reason.contains("exit status: 3"), "{reason}");
            assert!(
                stderr_tail.contains("rank 1 fails on purpose"),
                "{stderr_tail}"
            );
        }
        e => panic!("expected RankFailed, got {e}"),
    }
    let mut seen = 0;
    for r in 0..4 {
        let Ok(text) = std::fs::read_to_string(dir.path().join(format!("{r}.pid"))) else {
            continue; // killed before it wrote its pid
        };
        let pid: u32 = text.trim().parse().unwrap();
        assert!(
            !pid_alive(pid),
            "rank {r} (pid {pid}) survived the launcher"
        );
        seen += 1;
    }
    assert!(seen >= 1, "no child wrote its pid");
}

#[test]
fn a_bad_environment_in_a_child_is_reported_by_the_launcher() {
    let err = launch(
        2,
        "exchange",
        &[("MASTER_PORT", "0".to_string())],
        Duration::from_secs(30),
    );
    // The launcher sets MASTER_PORT itself; the child must see the launcher's value
    // unless the caller overrides it, as here.
    let err = err.unwrap_err();
    match &err {
        Error::RankFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("MASTER_PORT"), "{stderr_tail}");
            assert!(stderr_tail.contains("1..=65535"), "{stderr_tail}");
        }
        e => panic!("expected RankFailed, got {e}"),
    }
}

#[test]
fn every_bad_environment_names_its_variable() {
    let good: HashMap<&str, &str> = HashMap::from([
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ]);
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("RANK", None, "RANK"),
        ("RANK", Some("x"), "RANK"),
        ("RANK", Some("2"), "RANK"),
        ("WORLD_SIZE", None, "WORLD_SIZE"),
        ("WORLD_SIZE", Some("0"), "WORLD_SIZE"),
        ("WORLD_SIZE", Some("2.5"), "WORLD_SIZE"),
        ("LOCAL_RANK", None, "LOCAL_RANK"),
        ("LOCAL_RANK", Some("2"), "LOCAL_RANK"),
        ("MASTER_ADDR", None, "MASTER_ADDR"),
        ("MASTER_ADDR", Some("host.invalid"), "MASTER_ADDR"),
        ("MASTER_PORT", None, "MASTER_PORT"),
        ("MASTER_PORT", Some("0"), "MASTER_PORT"),
        ("MASTER_PORT", Some("70000"), "MASTER_PORT"),
        ("MASTER_PORT", Some("port"), "MASTER_PORT"),
        (
            "FLASHMOE_BOOTSTRAP_TIMEOUT_S",
            Some("0"),
            "FLASHMOE_BOOTSTRAP_TIMEOUT_S",
        ),
    ];
    for (var, value, named) in cases {
        let mut m = good.clone();
        match value {
            Some(v) => m.insert(var, v),
            None => m.remove(var),
        };
        match WorldEnv::from_lookup(|k| m.get(k).map(|v| v.to_string())) {
            Err(Error::Env { var: got, reason }) => {
                assert_eq!(got, *named, "{var}={value:?}: {reason}")
            }
            other => panic!("{var}={value:?}: expected an Env error, got {other:?}"),
        }
    }
}

#[test]
fn an_unreachable_master_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // released: nobody listens there
    let env = WorldEnv::from_lookup(|k| {
        Some(match k {
            "RANK" | "LOCAL_RANK" => "1".to_string(),
            "WORLD_SIZE" => "2".to_string(),
            "MASTER_ADDR" => "127.0.0.1".to_string(),
            "MASTER_PORT" => port.to_string(),
            _ => return None,
        })
    })
    .unwrap();
    let opts = BootstrapOptions {
        timeout: Duration::from_millis(800),
        retry_interval: Duration::from_millis(50),
        ..BootstrapOptions::default()
    };
    let start = Instant::now();
    let err = Rendezvous::connect(&env, opts).unwrap_err().to_string();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("cannot reach rank 0"), "{err}");
}

#[test]
fn nvshmem_world_refuses_cleanly_before_touching_a_gpu() {
    use flashmoe::world::nvshmem::{NvshmemOptions, NvshmemWorld};
    let env = WorldEnv::from_lookup(|k| {
        Some(
            match k {
                "RANK" | "LOCAL_RANK" => "0",
                "WORLD_SIZE" => "1",
                "MASTER_ADDR" => "127.0.0.1",
                "MASTER_PORT" => "1",
                _ => return None,
            }
            .to_string(),
        )
    })
    .unwrap();
    // A missing library is a load error naming the file, and leaves NVSHMEM unclaimed.
    let missing = NvshmemOptions {
        library: Some(PathBuf::from("/nonexistent/libnvshmem_host.so.3")),
        ..NvshmemOptions::default()
    };
    for _ in 0..2 {
        match NvshmemWorld::init(&env, &[], "flashmoe_layer_f32", &missing) {
            Err(Error::Nvshmem(nvshmem_sys::Error::Load(m))) => {
                assert!(m.contains("/nonexistent/libnvshmem_host.so.3"), "{m}")
            }
            other => panic!("expected a load error, got {other:?}"),
        }
    }
    let Some(lib) = wheel_library() else {
        eprintln!("SKIPPED (rest): no nvidia-nvshmem-cu13 wheel found");
        return;
    };
    // SAFETY: only asks whether libcuda can be dlopened.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("SKIPPED (rest): a CUDA driver is present; this checks the GPU-less path");
        return;
    }
    let opts = NvshmemOptions {
        library: Some(lib),
        ..NvshmemOptions::default()
    };
    // The version check passes, then the missing driver is reported (twice: the claim on
    // NVSHMEM was released by the first failure).
    for _ in 0..2 {
        match NvshmemWorld::init(&env, &[], "flashmoe_layer_f32", &opts) {
            Err(Error::NoGpu(m)) => assert!(m.contains("libcuda"), "{m}"),
            other => panic!("expected NoGpu, got {other:?}"),
        }
    }
}
