//! Proves the decoder's data path does not allocate: `Decoder::decode`, every `Event`/`Field`
//! accessor and `write_enriched` (into a `Vec` with capacity) run under a counting global
//! allocator. This lives in its own integration-test binary because a `#[global_allocator]`
//! cannot be confined to one unit test of the library.
//!
//! The count is per thread, so the test harness's own threads cannot disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use sessionizer::decode::{DecodeError, Decoder, FieldId, FieldTable};

thread_local! {
    // `const` and `Drop`-free: accessing it never allocates or registers a destructor, so it is
    // safe to touch from inside the allocator.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: during thread teardown the slot may be gone; those calls do not matter here.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is exactly `System`'s; counting only touches a thread-local `Cell`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours; the caller upholds it.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours; the caller upholds it.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from `System` through this allocator; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_get_and_enrich_do_not_allocate() {
    let paths: Vec<String> = [
        "user",
        "ts",
        "type",
        "ctx.device.id",
        "ctx",
        "tags",
        "price",
        "missing",
        "_session",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let table = FieldTable::new(&paths).expect("valid paths");
    let mut decoder = Decoder::new(table, 32, 4096);
    let long = format!("{{\"user\":\"{}\"}}", "x".repeat(5000));
    let lines: Vec<&[u8]> = vec![
        br#"{"user":"u1","ts":1700000000123,"type":"click","ctx":{"device":{"id":"d-1"}},"price":9.5}"#,
        br#"{"us\u0065r":"\u00e9\ud83d\ude00 \"q\"","ts":-1e400,"tags":[1,{"a":null}],"_session":{"id":"old"}}"#,
        "{\"type\":\"é€😀\",\"ctx\":{\"device\":{\"id\":true}},\"x\":[[[]]]}\r".as_bytes(),
        b"  {}  ",
        br#"{"a":1,"_session":2,"b":3}"#,
        // Rejections allocate nothing either.
        b"",
        br#"[1]"#,
        br#"{"user":1,"user":2}"#,
        br#"{"a":"\uD800"}"#,
        b"{\"a\":\"\xff\"}",
        br#"{"a":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
        br#"{"a":1} x"#,
        br#"{"a":01}"#,
        long.as_bytes(),
    ];
    let mut out = Vec::with_capacity(64 * 1024);
    let member = br#""_session":{"id":"s-1","start_ms":1700000000000}"#;

    // Warm up once so that anything lazily initialised by std (none is expected) is not counted.
    for line in &lines {
        let _ = black_box(decoder.decode(line).map(|e| e.raw().len()));
    }

    let before = allocations();
    let mut accepted = 0;
    let mut rejected = 0;
    for _ in 0..100 {
        for line in &lines {
            match decoder.decode(line) {
                Ok(event) => {
                    accepted += 1;
                    for id in 0..paths.len() as FieldId {
                        let f = event.get(id);
                        black_box((
                            f.is_missing(),
                            f.as_f64(),
                            f.as_i64(),
                            f.raw_json(),
                            f.key_bytes(),
                        ));
                    }
                    out.clear();
                    event.write_enriched(member, &mut out);
                    black_box(&out);
                }
                Err(e) => {
                    rejected += 1;
                    black_box(e.label());
                }
            }
        }
    }
    let after = allocations();
    assert_eq!(
        after - before,
        0,
        "the decoder allocated {} times",
        after - before
    );
    assert_eq!(accepted, 500);
    assert_eq!(rejected, 900);
    // The counter works at all (guards against a vacuous pass).
    let v: Vec<u8> = black_box(Vec::with_capacity(16));
    drop(v);
    assert!(allocations() > after);
    assert_eq!(DecodeError::TooDeep.label(), "too_deep");
}
