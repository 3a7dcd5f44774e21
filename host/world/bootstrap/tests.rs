//! In-process tests of the bootstrap: ranks as threads over loopback. The same protocol
//! among real processes is tested in tests/world_bootstrap.rs.

use super::*;
use std::io::{Read, Write};
use std::thread;

fn opts(ms: u64) -> BootstrapOptions {
    BootstrapOptions {
        timeout: Duration::from_millis(ms),
        retry_interval: Duration::from_millis(20),
        secret: None,
    }
}

fn secret_opts(ms: u64, secret: &str) -> BootstrapOptions {
    BootstrapOptions {
        secret: Some(Secret::from_text(secret)),
        ..opts(ms)
    }
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn id_of(seed: u8) -> Vec<u8> {
    (0..UNIQUE_ID_BYTES)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn bootstrap_msg(r: Result<Rendezvous>) -> String {
    match r {
        Err(Error::Bootstrap(m)) => m,
        Err(e) => panic!("expected a bootstrap error, got {e}"),
        Ok(rv) => panic!("expected a bootstrap error, got {rv:?}"),
    }
}

#[test]
fn four_ranks_exchange_an_id_and_gather() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let world = 4;
    let id = id_of(0x5A);
    let mut peers = Vec::new();
    for rank in 1..world {
        peers.push(thread::spawn(move || {
            let mut rv = Rendezvous::peer(rank, world, addr, opts(5000)).unwrap();
            let got = rv.broadcast(None).unwrap();
            let all = rv.all_gather(format!("rank{rank}").as_bytes()).unwrap();
            rv.barrier().unwrap();
            (got, all)
        }));
    }
    let mut rv = Rendezvous::master(l, world, opts(5000)).unwrap();
    assert_eq!(rv.broadcast(Some(&id)).unwrap(), id);
    let all0 = rv.all_gather(b"rank0").unwrap();
    rv.barrier().unwrap();
    let expect: Vec<Vec<u8>> = (0..world)
        .map(|r| format!("rank{r}").into_bytes())
        .collect();
    assert_eq!(all0, expect);
    for p in peers {
        let (got, all) = p.join().unwrap();
        assert_eq!(got, id);
        assert_eq!(all, expect);
    }
}

#[test]
fn peers_started_before_the_master_retry_until_it_listens() {
    // Reserve a port, release it, start the peer, then listen on it.
    let port = listener().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer = thread::spawn(move || {
        let mut rv = Rendezvous::peer(1, 2, addr, opts(5000))?;
        rv.broadcast(None)
    });
    thread::sleep(Duration::from_millis(300));
    let l = TcpListener::bind(addr).unwrap();
    let mut rv = Rendezvous::master(l, 2, opts(5000)).unwrap();
    rv.broadcast(Some(&id_of(1))).unwrap();
    assert_eq!(peer.join().unwrap().unwrap(), id_of(1));
}

#[test]
fn a_rank_that_never_joins_is_named_by_rank_0() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let world = 4;
    let peers: Vec<_> = [1usize, 3]
        .into_iter()
        .map(|rank| thread::spawn(move || Rendezvous::peer(rank, world, addr, opts(3000))))
        .collect();
    let start = Instant::now();
    let msg = bootstrap_msg(Rendezvous::master(l, world, opts(700)));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(msg.contains("[2]"), "{msg}");
    assert!(msg.contains("did not join"), "{msg}");
    for p in peers {
        let m = bootstrap_msg(p.join().unwrap());
        assert!(m.contains("aborted because of rank 2"), "{m}");
    }
}

#[test]
fn wrong_world_size_is_refused_to_the_peer_and_logged_by_rank_0() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let peer = thread::spawn(move || Rendezvous::peer(1, 3, addr, opts(3000)));
    let start = Instant::now();
    let msg = bootstrap_msg(Rendezvous::master(l, 2, opts(800)));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(msg.contains("[1]") && msg.contains("did not join"), "{msg}");
    assert!(
        msg.contains("WORLD_SIZE 3") && msg.contains("rank 0 has 2"),
        "{msg}"
    );
    let m = bootstrap_msg(peer.join().unwrap());
    assert!(m.contains("wrong world size (the master's is 2)"), "{m}");
}

#[test]
fn a_duplicate_claim_is_refused_to_the_newcomer_only() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let master = thread::spawn(move || -> Result<Vec<u8>> {
        let mut rv = Rendezvous::master(l, 3, opts(3000))?;
        rv.broadcast(Some(&id_of(3)))
    });
    let first = thread::spawn(move || {
        let mut rv = Rendezvous::peer(1, 3, addr, opts(3000))?;
        rv.broadcast(None)
    });
    thread::sleep(Duration::from_millis(200));
    let b = bootstrap_msg(Rendezvous::peer(1, 3, addr, opts(3000)));
    assert!(b.contains("rank 1 already joined"), "{b}");
    let third = thread::spawn(move || {
        let mut rv = Rendezvous::peer(2, 3, addr, opts(3000))?;
        rv.broadcast(None)
    });
    assert_eq!(master.join().unwrap().unwrap(), id_of(3));
    assert_eq!(first.join().unwrap().unwrap(), id_of(3));
    assert_eq!(third.join().unwrap().unwrap(), id_of(3));
}

#[test]
fn unreachable_master_is_named_after_the_deadline() {
    let addr = listener().local_addr().unwrap(); // closed again: nobody listens
    let start = Instant::now();
    let msg = bootstrap_msg(Rendezvous::peer(2, 3, addr, opts(600)));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("MASTER_ADDR"),
        "{msg}"
    );
    assert!(msg.contains("rank 2"), "{msg}");
}

#[test]
fn a_foreign_connection_is_refused_without_stopping_the_rendezvous() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    // The stranger connects and writes first, so rank 0 meets it before the real peer.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    let stranger = thread::spawn(move || {
        let mut challenge = [0u8; 16 + 32];
        s.read_exact(&mut challenge).unwrap();
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).unwrap();
        Header::decode(&reply)
    });
    thread::sleep(Duration::from_millis(100));
    let peer = thread::spawn(move || Rendezvous::peer(1, 2, addr, opts(3000)).map(|_| ()));
    let rv = Rendezvous::master(l, 2, opts(3000));
    assert!(rv.is_ok(), "{rv:?}");
    let h = stranger.join().unwrap();
    assert_eq!(h.kind, Kind::Reject as u16);
    assert_eq!(h.a, Reject::BadProtocol as u32);
    peer.join().unwrap().unwrap();
}

#[test]
fn a_peer_that_dies_before_the_gather_is_named() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let quitter = thread::spawn(move || {
        let rv = Rendezvous::peer(1, 3, addr, opts(3000)).unwrap();
        drop(rv); // closes its connection
    });
    let stayer = thread::spawn(move || {
        let mut rv = Rendezvous::peer(2, 3, addr, opts(3000)).unwrap();
        rv.all_gather(b"x")
    });
    let mut rv = Rendezvous::master(l, 3, opts(3000)).unwrap();
    quitter.join().unwrap();
    let err = rv.all_gather(b"y").unwrap_err().to_string();
    assert!(err.contains("rank 1"), "{err}");
    let m = stayer.join().unwrap().unwrap_err().to_string();
    assert!(m.contains("aborted because of rank 1"), "{m}");
}

#[test]
fn exchange_unique_id_in_a_world_of_one_opens_no_socket() {
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
    let id: [u8; UNIQUE_ID_BYTES] = id_of(9).try_into().unwrap();
    let (got, mut rv) = exchange_unique_id(&env, opts(100), || Ok(id)).unwrap();
    assert_eq!(got, id);
    assert_eq!(rv.all_gather(b"me").unwrap(), vec![b"me".to_vec()]);
}

#[test]
fn a_silent_connection_does_not_hold_up_the_rendezvous_past_the_hello_timeout() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let silent = TcpStream::connect(addr).unwrap(); // connects, never speaks
    thread::sleep(Duration::from_millis(50));
    let peer = thread::spawn(move || Rendezvous::peer(1, 2, addr, opts(20_000)).map(|_| ()));
    let start = Instant::now();
    let rv = Rendezvous::master(l, 2, opts(20_000));
    let took = start.elapsed();
    assert!(rv.is_ok(), "{rv:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    peer.join().unwrap().unwrap();
    drop(silent);
}

/// Sends `bytes` one at a time, `gap` apart, until done or the other end closed.
fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) {
    for b in bytes {
        if s.write_all(&[*b]).is_err() {
            return;
        }
        thread::sleep(gap);
    }
}

#[test]
fn impostors_and_bad_hellos_are_ignored_and_the_real_ranks_join() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let secret = "the job's secret";
    // An impostor with another secret claims rank 1 before the real one.
    let impostor = thread::spawn(move || Rendezvous::peer(1, 3, addr, secret_opts(3000, "guess")));
    thread::sleep(Duration::from_millis(50));
    // A peer without any secret, and raw hellos for a bad rank and a foreign magic.
    let unsecured = thread::spawn(move || Rendezvous::peer(2, 3, addr, opts(3000)));
    let mut raw = Vec::new();
    for bytes in [
        wire::Hello {
            rank: 7,
            world: 3,
            tag: [0; 8],
            nonce: [0; 32],
            proof: [0; 32],
        }
        .encode(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&bytes).unwrap();
        raw.push(s);
    }
    thread::sleep(Duration::from_millis(50));
    let real: Vec<_> = [1usize, 2]
        .into_iter()
        .map(|rank| {
            thread::spawn(move || {
                let mut rv = Rendezvous::peer(rank, 3, addr, secret_opts(3000, secret))?;
                rv.broadcast(None)
            })
        })
        .collect();
    let start = Instant::now();
    let mut rv = Rendezvous::master(l, 3, secret_opts(3000, secret)).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    rv.broadcast(Some(&id_of(7))).unwrap();
    for r in real {
        assert_eq!(r.join().unwrap().unwrap(), id_of(7));
    }
    for p in [impostor, unsecured] {
        let m = bootstrap_msg(p.join().unwrap());
        assert!(m.contains("not authenticated"), "{m}");
    }
}

#[test]
fn a_rank_0_without_the_secret_is_not_trusted_by_a_peer() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let peer = thread::spawn(move || Rendezvous::peer(1, 2, addr, secret_opts(2000, "ours")));
    // A rank 0 with another secret refuses the peer; the peer says why.
    let msg = bootstrap_msg(Rendezvous::master(l, 2, secret_opts(500, "theirs")));
    assert!(
        msg.contains("proof does not match") || msg.contains("job tag"),
        "{msg}"
    );
    let m = bootstrap_msg(peer.join().unwrap());
    assert!(m.contains("not authenticated"), "{m}");
}

#[test]
fn a_trickled_hello_cannot_stretch_rank_0s_deadline() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let slow = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let hello = wire::Hello {
            rank: 1,
            world: 2,
            tag: [0; 8],
            nonce: [0; 32],
            proof: [0; 32],
        };
        trickle(&mut s, &hello.encode(), Duration::from_millis(100));
    });
    let start = Instant::now();
    let msg = bootstrap_msg(Rendezvous::master(l, 2, opts(800)));
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(msg.contains("[1]") && msg.contains("did not join"), "{msg}");
    slow.join().unwrap();
}

#[test]
fn many_silent_connections_do_not_hold_up_the_rendezvous() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let peer = thread::spawn(move || Rendezvous::peer(1, 2, addr, opts(3000)).map(|_| ()));
    let start = Instant::now();
    Rendezvous::master(l, 2, opts(3000)).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    peer.join().unwrap().unwrap();
    drop(silent);
}

#[test]
fn a_joined_peer_trickling_its_gather_cannot_stretch_the_deadline() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let peer = thread::spawn(move || {
        let mut rv = Rendezvous::peer(1, 2, addr, opts(3000)).unwrap();
        if let Role::Peer { stream } = &mut rv.role {
            let mut frame = Header::new(Kind::Data, 8, 0).encode().to_vec();
            frame.extend_from_slice(b"12345678");
            trickle(stream, &frame, Duration::from_millis(100));
        }
    });
    let mut rv = Rendezvous::master(l, 2, opts(700)).unwrap();
    let start = Instant::now();
    let err = rv.all_gather(b"x").unwrap_err().to_string();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1200), "{took:?}");
    assert!(err.contains("rank 1"), "{err}");
    peer.join().unwrap();
}

#[test]
fn unrepresentable_deadlines_and_empty_worlds_are_typed_errors() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    for timeout in [Duration::MAX, Duration::ZERO] {
        let o = BootstrapOptions { timeout, ..opts(0) };
        let e = Rendezvous::master(listener(), 2, o).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    field: "bootstrap.timeout",
                    ..
                }
            ),
            "{e}"
        );
        let e = Rendezvous::peer(1, 2, addr, o).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    field: "bootstrap.timeout",
                    ..
                }
            ),
            "{e}"
        );
    }
    let o = BootstrapOptions {
        retry_interval: Duration::MAX,
        ..opts(100)
    };
    let e = Rendezvous::peer(1, 2, addr, o).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidConfig {
                field: "bootstrap.retry_interval",
                ..
            }
        ),
        "{e}"
    );
    for world in [0, MAX_WORLD + 1] {
        let e = Rendezvous::master(listener(), world, opts(100)).unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { field: "world", .. }),
            "{e}"
        );
    }
    drop(l);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

    /// Arbitrary bytes sent to rank 0 are refused or dropped, never fatal: the real
    /// peer still joins, within the deadline.
    #[test]
    fn arbitrary_bytes_on_the_port_never_stop_the_rendezvous(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)
    ) {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let mut junk = TcpStream::connect(addr).unwrap();
        let _ = junk.write_all(&bytes);
        let peer = thread::spawn(move || Rendezvous::peer(1, 2, addr, opts(3000)).map(|_| ()));
        let start = Instant::now();
        let rv = Rendezvous::master(l, 2, opts(3000));
        proptest::prop_assert!(rv.is_ok(), "{:?}", rv);
        proptest::prop_assert!(start.elapsed() < Duration::from_secs(2));
        proptest::prop_assert!(peer.join().unwrap().is_ok());
    }
}
