//! The UDP steering header (`ingest::steering`) and the routing of a datagram's events, against
//! the documented format: 4 magic bytes `SZH1`, then a big-endian u32 `fnv1a32(key)`, then
//! '\n'-separated JSON events.
//!
//! The first byte picks the shard count (1..=64) and the mode: arbitrary datagram bytes, or a
//! correctly steered datagram built from the input (a key, then events of that key with
//! fuzzer-chosen extra content). Checked:
//! - `strip_header` returns the hash exactly when the datagram starts with the magic and has the
//!   full 8 bytes, and then the payload is everything after them; otherwise the whole datagram;
//! - the kernel-side CBPF program (run in an interpreter, `run_bpf`) picks socket `hash % shards`
//!   for a header and `shards` (the kernel's own hash) without one: the kernel and the runtime
//!   read the same header;
//! - every event of the payload, split as the shard splits it, routes per profile to
//!   `fnv1a32(key) % shards` (or is a missing / too-long key exactly when the key is), and an
//!   event whose key hashes to the header's value lands on the socket of its owner: a correctly
//!   steered event never needs a cross-core hand-off. In the built mode every event must decode
//!   and route that way.

#![no_main]

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sessionizer::config::Config;
use sessionizer::decode::{write_json_string, Decoder};
use sessionizer::engine::rules::Rules;
use sessionizer::engine::{fnv1a32, route, Route};
use sessionizer::ingest::lines::for_each_line;
use sessionizer::ingest::steering::{header_for_key, program, strip_header, HEADER_BYTES, MAGIC};
use sessionizer_fuzz::{run_bpf, Bytes, ENGINE_CONFIG};

struct Fixture {
    cfg: Config,
    rules: Arc<Rules>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let cfg = Config::from_toml(ENGINE_CONFIG).expect("the fuzz config is valid");
        let rules = Arc::new(Rules::compile(&cfg).expect("the fuzz rules compile"));
        Fixture { cfg, rules }
    })
}

thread_local! {
    /// The shard's decoder, with the config's limits, built once.
    static DECODER: RefCell<Decoder> = RefCell::new({
        let f = fixture();
        Decoder::new(
            f.rules.field_table(),
            f.cfg.limits.json_depth_max,
            f.cfg.limits.line_bytes_max as usize,
        )
    });
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let sel = b.u8();
    let shards = u32::from(sel % 64) + 1;
    if sel & 0x80 == 0 {
        check(b.rest(), shards, false);
    } else {
        let datagram = steered(&mut b);
        check(&datagram, shards, true);
    }
});

/// A datagram as a client that knows its key sends it: header, then 1..=8 events of that key
/// (as a string or as a number), each with a fuzzer-chosen page and type, '\n' or "\r\n"
/// separated, with or without a final newline.
fn steered(b: &mut Bytes<'_>) -> Vec<u8> {
    let as_number = b.u8() % 4 == 0;
    let key: Vec<u8> = if as_number {
        // Number keys are routed by their literal text.
        let n = b.u64() as i64;
        n.to_string().into_bytes()
    } else {
        String::from_utf8_lossy(b.take(80))
            .into_owned()
            .into_bytes()
    };
    let events = 1 + b.below(8);
    let mut d = header_for_key(&key).to_vec();
    for i in 0..events {
        d.extend_from_slice(b"{\"user\":");
        if as_number {
            d.extend_from_slice(&key);
        } else {
            write_json_string(&key, &mut d);
        }
        d.extend_from_slice(b",\"page\":");
        write_json_string(b.take(24), &mut d);
        d.extend_from_slice(b",\"type\":");
        write_json_string(b.take(8), &mut d);
        d.extend_from_slice(b",\"ts\":");
        d.extend_from_slice(
            (1_700_000_000_000u64 + u64::from(b.u16()))
                .to_string()
                .as_bytes(),
        );
        d.push(b'}');
        if i + 1 < events || b.bool() {
            if b.bool() {
                d.push(b'\r');
            }
            d.push(b'\n');
        }
    }
    d
}

fn check(datagram: &[u8], shards: u32, built: bool) {
    // The header, as documented.
    let (hash, payload) = strip_header(datagram);
    let has_header = datagram.len() >= HEADER_BYTES && datagram[..4] == MAGIC;
    if has_header {
        let want = u32::from_be_bytes(datagram[4..8].try_into().expect("4 bytes"));
        assert_eq!(hash, Some(want));
        assert_eq!(payload, &datagram[HEADER_BYTES..]);
    } else {
        assert_eq!(hash, None);
        assert_eq!(payload, datagram);
    }
    // The kernel's choice of socket reads the same header.
    let socket = run_bpf(&program(shards), datagram);
    match hash {
        Some(h) => assert_eq!(socket, h % shards),
        None => assert_eq!(socket, shards, "no header: the kernel's hash decides"),
    }
    if built {
        assert!(hash.is_some(), "a built datagram carries its header");
    }

    // The events, split and routed as a shard does.
    DECODER.with_borrow_mut(|dec| route_lines(dec, payload, hash, socket, shards, built));
}

fn route_lines(
    dec: &mut Decoder,
    payload: &[u8],
    hash: Option<u32>,
    socket: u32,
    shards: u32,
    built: bool,
) {
    let f = fixture();
    let mut lines = 0usize;
    for_each_line(payload, |line| {
        lines += 1;
        // One '\r' is taken off, as the shard does; a second one stays (and fails to decode).
        assert!(!line.is_empty() && !line.contains(&b'\n'));
        let ev = match dec.decode(line) {
            Ok(ev) => ev,
            Err(e) => {
                assert!(
                    !built,
                    "a built event does not decode ({e:?}): {:?}",
                    String::from_utf8_lossy(line)
                );
                return;
            }
        };
        let mut web_routed = false;
        for p in f.rules.matching(&ev) {
            let key_field = f.rules.profiles[p as usize].key;
            let key = ev.get(key_field).key_bytes();
            let r = route(&f.rules, p, &ev, shards);
            match (r, key) {
                (Route::MissingKey, None) => {}
                (Route::KeyTooLong, Some(k)) => assert!(k.len() > f.rules.key_bytes_max as usize),
                (Route::Owner(o), Some(k)) => {
                    assert!(k.len() <= f.rules.key_bytes_max as usize);
                    assert!(o < shards);
                    assert_eq!(o, fnv1a32(k) % shards);
                    if hash == Some(fnv1a32(k)) {
                        assert_eq!(socket, o, "a correctly steered event needs a hand-off");
                    }
                    web_routed |= p == 0;
                }
                (r, k) => panic!("route {r:?} for key {k:?}"),
            }
        }
        if built {
            // The key fits: at most 80 bytes of input, 3 bytes per replaced invalid byte.
            assert!(web_routed, "a built event is not routed to an owner");
        }
    });
    if built {
        assert!(lines >= 1);
    }
}
