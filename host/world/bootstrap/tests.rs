//! In-process tests of the bootstrap: ranks as threads over loopback. The same protocol
//! among real processes is tested in tests/world_bootstrap.rs.

use super::*;
use std::io::{Read, Write};
use std::thread;

fn opts(ms: u64) -> BootstrapOptions {
    BootstrapOptions {
        timeout: Duration::from_millis(ms),
        retry_interval: Duration::from_millis(20),
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
fn wrong_world_size_is_refused_on_both_sides() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let peer = thread::spawn(move || Rendezvous::peer(1, 3, addr, opts(3000)));
    let msg = bootstrap_msg(Rendezvous::master(l, 2, opts(3000)));
    assert!(
        msg.contains("WORLD_SIZE 3") && msg.contains("rank 0 has 2"),
        "{msg}"
    );
    let m = bootstrap_msg(peer.join().unwrap());
    assert!(m.contains("wrong world size (the master's is 2)"), "{m}");
}

#[test]
fn duplicate_rank_is_refused() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let first = thread::spawn(move || Rendezvous::peer(1, 3, addr, opts(3000)));
    thread::sleep(Duration::from_millis(200));
    let second = thread::spawn(move || Rendezvous::peer(1, 3, addr, opts(3000)));
    let msg = bootstrap_msg(Rendezvous::master(l, 3, opts(3000)));
    assert!(msg.contains("rank 1 joined twice"), "{msg}");
    let a = bootstrap_msg(first.join().unwrap());
    let b = bootstrap_msg(second.join().unwrap());
    assert!(a.contains("aborted") || a.contains("already joined"), "{a}");
    assert!(b.contains("aborted") || b.contains("already joined"), "{b}");
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
    assert!(took < HELLO_TIMEOUT + Duration::from_secs(3), "{took:?}");
    peer.join().unwrap().unwrap();
    drop(silent);
}
