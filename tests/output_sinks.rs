//! Integration tests of the output sinks through the library API, on real files (a fresh temp
//! directory each) and real loopback sockets. Every wait is a poll for a readiness condition
//! with a deadline; no sleep stands for a timing assumption. A per-thread counting allocator
//! checks that the shard side (`deliver`, `flush`) allocates nothing in steady state.

use sessionizer::config::{Config, Stream};
use sessionizer::engine::Out;
use sessionizer::output::{OutputStats, Outputs, ShardOutput};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

thread_local! {
    // `const` and `Drop`-free: touching it never allocates, so the allocator may use it.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is exactly `System`'s; counting only touches a thread-local `Cell`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours; the caller upholds it.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours; the caller upholds it.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
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

const PROFILE: &str = "[[profile]]\nname = \"web\"\nkey = \"user\"\nidle_timeout = \"30m\"\n";
const WAIT: Duration = Duration::from_secs(20);

fn config(outputs: &str) -> Config {
    Config::from_toml(&format!("{outputs}\n{PROFILE}")).expect("valid config")
}

/// Poll `ready` until it holds; fail after `WAIT`.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stats(outputs: &Outputs, i: usize) -> OutputStats {
    outputs.stats().swap_remove(i)
}

/// A record body (no newline) of about `len` bytes, unique per (stream, shard, seq).
fn record(stream: Stream, shard: usize, seq: usize, len: usize) -> Vec<u8> {
    let kind = match stream {
        Stream::Events => "event",
        Stream::Markers => "marker",
        Stream::Late => "late",
        Stream::DeadLetter => "dead_letter",
    };
    let head = format!("{{\"kind\":\"{kind}\",\"shard\":{shard},\"seq\":{seq},\"pad\":\"");
    let pad = len.saturating_sub(head.len() + 2);
    let mut r = head.into_bytes();
    r.extend(std::iter::repeat_n(b'x', pad));
    r.extend_from_slice(b"\"}");
    r
}

/// An `Out` holding `bodies` as records, in order.
fn out_of(bodies: &[(Stream, Vec<u8>)]) -> Out {
    let mut out = Out::with_capacity(1 << 16, 1024);
    for (stream, body) in bodies {
        if *stream == Stream::Events {
            out.passthrough(body);
        } else {
            out.buf.extend_from_slice(body);
            out.finish(*stream);
        }
    }
    out
}

fn line(body: &[u8]) -> String {
    String::from_utf8(body.to_vec()).expect("utf-8")
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn flush_all(shards: &mut [ShardOutput]) {
    for s in shards.iter_mut() {
        assert!(s.flush(), "a drop sink never makes flush return false");
        assert!(s.is_idle());
    }
}

#[test]
fn file_sink_writes_per_shard_files_and_filters_streams() {
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all");
    let markers = dir.path().join("markers-only");
    let cfg = config(&format!(
        "[[output]]\nkind = \"file\"\npath = \"{}\"\n\n[[output]]\nkind = \"file\"\npath = \"{}\"\nstreams = [\"markers\"]\n",
        all.display(),
        markers.display()
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    assert_eq!(
        outputs.bound(),
        vec![
            ("file", all.display().to_string()),
            ("file", markers.display().to_string())
        ]
    );
    let mut expect_all = [Vec::new(), Vec::new()];
    let mut expect_markers = [Vec::new(), Vec::new()];
    for (shard, so) in shards.iter_mut().enumerate() {
        for round in 0..5 {
            let bodies: Vec<_> = (0..40)
                .map(|i| {
                    let stream = [
                        Stream::Events,
                        Stream::Markers,
                        Stream::Late,
                        Stream::DeadLetter,
                    ][i % 4];
                    (stream, record(stream, shard, round * 40 + i, 80))
                })
                .collect();
            for (stream, body) in &bodies {
                expect_all[shard].push(line(body));
                if *stream == Stream::Markers {
                    expect_markers[shard].push(line(body));
                }
            }
            so.deliver(&out_of(&bodies));
            assert!(so.flush());
        }
    }
    for shard in 0..2 {
        let f = all.join(format!("shard-{shard}.jsonl"));
        wait_until("the all-streams file", || {
            read_lines(&f).len() >= expect_all[shard].len()
        });
        assert_eq!(read_lines(&f), expect_all[shard]);
        let f = markers.join(format!("shard-{shard}.jsonl"));
        wait_until("the markers file", || {
            read_lines(&f).len() >= expect_markers[shard].len()
        });
        assert_eq!(
            read_lines(&f),
            expect_markers[shard],
            "only markers, in order"
        );
    }
    let s = outputs.stats();
    assert_eq!((s[0].kind, s[0].records, s[0].dropped), ("file", 400, 0));
    assert_eq!((s[1].records, s[1].dropped), (100, 0));
    assert_eq!(s[0].name, format!("file:{}", all.display()));
    drop(shards);
    outputs.shutdown(Duration::from_secs(5));
    assert_eq!(read_lines(&all.join("shard-1.jsonl")), expect_all[1]);
}

#[test]
fn file_sink_cuts_off_a_torn_last_record_before_appending() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Shard 0's file as an unclean stop left it: two records and part of a third.
    let f0 = out.join("shard-0.jsonl");
    std::fs::write(&f0, "{\"a\":1}\n{\"a\":2}\n{\"a\":3,\"tor").unwrap();
    // Shard 1's file holds only a piece of a record.
    let f1 = out.join("shard-1.jsonl");
    std::fs::write(&f1, "{\"b\":").unwrap();
    let cfg = config(&format!(
        "[[output]]\nkind = \"file\"\npath = \"{}\"\n",
        out.display()
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    let next = record(Stream::Events, 0, 4, 40);
    shards[0].deliver(&out_of(&[(Stream::Events, next.clone())]));
    flush_all(&mut shards);
    drop(shards);
    outputs.shutdown(Duration::from_secs(5));
    assert_eq!(
        read_lines(&f0),
        vec![
            "{\"a\":1}".to_string(),
            "{\"a\":2}".to_string(),
            line(&next)
        ]
    );
    assert_eq!(std::fs::read(&f1).unwrap(), b"");
}

/// Rotated files of `shard` in write order, then the current file.
fn shard_files(dir: &Path, shard: usize) -> Vec<PathBuf> {
    let prefix = format!("shard-{shard}.");
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let ms = name
                .strip_prefix(&prefix)?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((ms, p))
        })
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    files.push(dir.join(format!("shard-{shard}.jsonl")));
    files
}

#[test]
fn file_sink_rotates_at_the_size_limit_on_record_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(
        "[[output]]\nkind = \"file\"\npath = \"{}\"\nrotate_bytes = 4096\n",
        dir.path().display()
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    let mut expect = Vec::new();
    let mut bodies: Vec<_> = (0..300)
        .map(|i| (Stream::Markers, record(Stream::Markers, 0, i, 100)))
        .collect();
    // A record longer than rotate_bytes gets a file of its own.
    let big = record(Stream::Markers, 0, 300, 5000);
    bodies.insert(150, (Stream::Markers, big.clone()));
    for chunk in bodies.chunks(37) {
        shards[0].deliver(&out_of(chunk));
        assert!(shards[0].flush());
        expect.extend(chunk.iter().map(|(_, b)| line(b)));
    }
    let small: Vec<_> = (0..5)
        .map(|i| (Stream::Events, record(Stream::Events, 1, i, 100)))
        .collect();
    shards[1].deliver(&out_of(&small));
    flush_all(&mut shards);
    wait_until("every record written", || stats(&outputs, 0).records == 306);
    outputs.shutdown(Duration::from_secs(5));

    let files = shard_files(dir.path(), 0);
    assert!(files.len() >= 8, "{files:?}");
    let mut got = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        if lines.iter().any(|l| l.len() > 4096) {
            assert_eq!(lines.len(), 1, "the oversized record is alone in {f:?}");
        } else {
            assert!(text.len() <= 4096, "{f:?} is {} bytes", text.len());
            if f != files.last().unwrap() {
                // Rotated only when the next record (<= 101 bytes, or the big one) did not fit.
                assert!(
                    text.len() > 4096 - 101 || got.len() + lines.len() == 150,
                    "{f:?} is {} bytes",
                    text.len()
                );
            }
        }
        assert!(text.ends_with('\n'));
        got.extend(lines.into_iter().map(str::to_string));
    }
    assert_eq!(
        got, expect,
        "rotated files hold every record once, in order"
    );
    assert_eq!(
        shard_files(dir.path(), 1).len(),
        1,
        "shard 1 did not rotate"
    );
    assert_eq!(read_lines(&dir.path().join("shard-1.jsonl")).len(), 5);
}

/// Reads lines from `stream` in a thread until `n` lines arrived or the stream ends.
fn collect_lines(
    stream: TcpStream,
    n: usize,
    seen: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut r = BufReader::new(stream);
        let mut lines = Vec::new();
        let mut buf = String::new();
        while lines.len() < n {
            buf.clear();
            match r.read_line(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    assert!(buf.ends_with('\n'), "a partial line: {buf:?}");
                    lines.push(buf.trim_end().to_string());
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        lines
    })
}

fn tcp_address(outputs: &Outputs, i: usize) -> SocketAddr {
    let (kind, addr) = &outputs.bound()[i];
    assert_eq!(*kind, "tcp");
    let addr: SocketAddr = addr.parse().unwrap();
    assert_ne!(addr.port(), 0, "the bound port is reported");
    addr
}

/// Per shard, the records of that shard appear in production order.
fn assert_shard_order(lines: &[String], expect: &[Vec<String>]) {
    for (shard, exp) in expect.iter().enumerate() {
        let tag = format!("\"shard\":{shard},");
        let got: Vec<&String> = lines.iter().filter(|l| l.contains(&tag)).collect();
        assert_eq!(got.len(), exp.len(), "shard {shard}");
        assert!(
            got.iter().zip(exp).all(|(g, e)| *g == e),
            "shard {shard} order"
        );
    }
}

#[test]
fn tcp_sink_delivers_every_line_to_every_consumer() {
    let cfg =
        config("[[output]]\nkind = \"tcp\"\naddress = \"127.0.0.1:0\"\nqueue_bytes = \"4MiB\"\n");
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    let addr = tcp_address(&outputs, 0);
    assert_eq!(stats(&outputs, 0).name, format!("tcp:{addr}"));
    let a = TcpStream::connect(addr).unwrap();
    let b = TcpStream::connect(addr).unwrap();
    wait_until("two consumers", || stats(&outputs, 0).consumers == 2);

    let n = 600;
    let seen = Arc::new(AtomicU64::new(0));
    let ra = collect_lines(a, n, seen.clone());
    let rb = collect_lines(b, n, seen.clone());
    let mut expect = [Vec::new(), Vec::new()];
    for round in 0..3 {
        for (shard, so) in shards.iter_mut().enumerate() {
            let bodies: Vec<_> = (0..100)
                .map(|i| {
                    let stream = if i % 3 == 0 {
                        Stream::Markers
                    } else {
                        Stream::Events
                    };
                    (stream, record(stream, shard, round * 100 + i, 60 + i * 7))
                })
                .collect();
            expect[shard].extend(bodies.iter().map(|(_, b)| line(b)));
            so.deliver(&out_of(&bodies));
            assert!(so.flush());
        }
    }
    for lines in [ra.join().unwrap(), rb.join().unwrap()] {
        assert_eq!(lines.len(), n);
        assert_shard_order(&lines, &expect);
    }
    let s = stats(&outputs, 0);
    assert_eq!((s.records, s.dropped, s.consumers), (2 * n as u64, 0, 2));
    outputs.shutdown(Duration::from_secs(5));
}

#[test]
fn tcp_slow_consumer_loses_records_without_stalling_the_other() {
    // Consumer buffers of 64 KiB; block at the queue so only the slow consumer can lose records.
    let cfg = config(
        "[[output]]\nkind = \"tcp\"\naddress = \"127.0.0.1:0\"\nqueue_bytes = \"64KiB\"\nwhen_full = \"block\"\nstreams = [\"markers\"]\n",
    );
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    let addr = tcp_address(&outputs, 0);
    let fast = TcpStream::connect(addr).unwrap();
    let slow = {
        // A small receive window, so the kernel holds little on the slow consumer's behalf.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        TcpStream::from(s)
    };
    wait_until("two consumers", || stats(&outputs, 0).consumers == 2);

    let seen = Arc::new(AtomicU64::new(0));
    let reader = collect_lines(fast, usize::MAX, seen.clone());
    let mut expect = [Vec::new(), Vec::new()];
    let mut sent = 0u64;
    let mut round = 0;
    // Rounds of 40 KB, each read by the fast consumer before the next, so its 64 KiB buffer
    // never overflows; go on until the slow one has lost records, then a few rounds more.
    let mut extra = 5;
    while extra > 0 {
        assert!(sent < 200_000, "the slow consumer never lost a record");
        let shard = round % 2;
        let bodies: Vec<_> = (0..40)
            .map(|i| {
                (
                    Stream::Markers,
                    record(Stream::Markers, shard, round * 40 + i, 1000),
                )
            })
            .collect();
        // Events are not subscribed: they must not reach any consumer.
        let mut with_events = bodies.clone();
        with_events.push((Stream::Events, record(Stream::Events, shard, round, 50)));
        expect[shard].extend(bodies.iter().map(|(_, b)| line(b)));
        shards[shard].deliver(&out_of(&with_events));
        wait_until("the queue to take the batch", || shards[shard].flush());
        sent += bodies.len() as u64;
        wait_until("the fast consumer", || seen.load(Ordering::Relaxed) == sent);
        if stats(&outputs, 0).dropped > 0 {
            extra -= 1;
        }
        round += 1;
    }
    let before = stats(&outputs, 0);
    assert_eq!(before.consumers, 2, "a slow consumer is kept");
    assert!(before.dropped > 0);

    // Now let the slow consumer read what it was given; shutdown writes out its buffer.
    let slow_reader = collect_lines(slow, usize::MAX, Arc::new(AtomicU64::new(0)));
    outputs.shutdown(Duration::from_secs(10));
    let fast_lines = reader.join().unwrap();
    assert_shard_order(&fast_lines, &expect);
    let slow_lines = slow_reader.join().unwrap();
    assert_eq!(
        sent - slow_lines.len() as u64,
        before.dropped,
        "every record the slow consumer missed is counted once"
    );
    let expected: HashSet<&String> = expect.iter().flatten().collect();
    assert!(
        slow_lines.iter().all(|l| expected.contains(l)),
        "the slow consumer gets whole lines only"
    );
}

#[test]
fn tcp_sink_removes_gone_consumers_and_refuses_beyond_the_limit() {
    let cfg = config("[[output]]\nkind = \"tcp\"\naddress = \"127.0.0.1:0\"\n");
    let (outputs, mut shards) = Outputs::start(&cfg, 1).unwrap();
    let addr = tcp_address(&outputs, 0);
    let mut conns: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_until("64 consumers", || stats(&outputs, 0).consumers == 64);
    let mut extra = TcpStream::connect(addr).unwrap();
    extra.set_read_timeout(Some(WAIT)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        extra.read(&mut byte).unwrap_or(0),
        0,
        "the 65th connection is closed"
    );

    drop(conns.drain(..32));
    let mut seq = 0;
    wait_until("gone consumers removed", || {
        seq += 1;
        shards[0].deliver(&out_of(&[(
            Stream::Markers,
            record(Stream::Markers, 0, seq, 50),
        )]));
        assert!(shards[0].flush());
        stats(&outputs, 0).consumers == 32
    });
    outputs.shutdown(Duration::from_secs(5));
}

#[test]
fn udp_sink_sends_whole_lines_in_bounded_datagrams() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let dest = rx.local_addr().unwrap();
    let cfg = config(&format!(
        "[[output]]\nkind = \"udp\"\naddress = \"{dest}\"\n"
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    assert_eq!(outputs.bound(), vec![("udp", dest.to_string())]);

    let mut expect = [Vec::new(), Vec::new()];
    let mut bodies: Vec<_> = (0..100)
        .map(|i| (Stream::Markers, record(Stream::Markers, 0, i, 90 + i)))
        .collect();
    bodies.insert(
        50,
        (Stream::Markers, record(Stream::Markers, 0, 1000, 2000)),
    ); // alone
    bodies.insert(
        70,
        (Stream::Markers, record(Stream::Markers, 0, 1001, 70_000)),
    ); // too long
    expect[0].extend(
        bodies
            .iter()
            .filter(|(_, b)| b.len() < 65_507)
            .map(|(_, b)| line(b)),
    );
    shards[0].deliver(&out_of(&bodies));
    let other: Vec<_> = (0..50)
        .map(|i| (Stream::Events, record(Stream::Events, 1, i, 120)))
        .collect();
    expect[1].extend(other.iter().map(|(_, b)| line(b)));
    shards[1].deliver(&out_of(&other));
    flush_all(&mut shards);

    let total = expect[0].len() + expect[1].len();
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while lines.len() < total {
        let (n, _) = rx
            .recv_from(&mut buf)
            .expect("a datagram before the deadline");
        let d = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(d.ends_with('\n'), "whole lines only: {d:?}");
        let in_datagram: Vec<&str> = d.lines().collect();
        assert!(
            n <= 1472 || in_datagram.len() == 1,
            "{n} bytes, {} lines",
            in_datagram.len()
        );
        lines.extend(in_datagram.into_iter().map(str::to_string));
    }
    assert_shard_order(&lines, &expect);
    wait_until("counters", || stats(&outputs, 0).records == total as u64);
    assert_eq!(stats(&outputs, 0).dropped, 1, "the 70 KB record");
    outputs.shutdown(Duration::from_secs(5));
}

#[test]
fn block_policy_makes_flush_wait_for_room_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Shard 0's file is a FIFO nobody reads yet: the sink thread blocks on it and the queue fills.
    let fifo = dir.path().join("shard-0.jsonl");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo does not retain it.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Open the read end first (nonblocking, so this does not wait for a writer), so the sink's
    // open for writing does not block either; then make reads blocking.
    let reader = {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        (f, AsRawFd::as_raw_fd)
    };
    let cfg = config(&format!(
        "[[output]]\nkind = \"file\"\npath = \"{}\"\nqueue_bytes = 4096\nwhen_full = \"block\"\nfsync_interval = \"1h\"\n",
        dir.path().display()
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    let (file, raw_fd) = reader;
    let fd = raw_fd(&file);
    // SAFETY: `fd` is open (owned by `file`); F_SETFL with 0 clears O_NONBLOCK.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) }, 0);

    let mut expect = Vec::new();
    let mut seq = 0;
    let mut blocked = false;
    while !blocked {
        assert!(seq < 1_000_000, "flush never reported a full queue");
        let bodies: Vec<_> = (0..10)
            .map(|i| (Stream::Markers, record(Stream::Markers, 0, seq + i, 200)))
            .collect();
        seq += 10;
        expect.extend(bodies.iter().map(|(_, b)| line(b)));
        shards[0].deliver(&out_of(&bodies));
        blocked = !shards[0].flush();
    }
    assert!(!shards[0].is_idle(), "the batch is kept, not dropped");
    assert_eq!(stats(&outputs, 0).dropped, 0);
    // Records delivered while blocked are kept too (the pending batch grows, up to queue_bytes).
    let bodies: Vec<_> = (0..5)
        .map(|i| (Stream::Markers, record(Stream::Markers, 0, seq + i, 200)))
        .collect();
    expect.extend(bodies.iter().map(|(_, b)| line(b)));
    shards[0].deliver(&out_of(&bodies));

    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        BufReader::new(file).read_to_string(&mut text).unwrap();
        text
    });
    wait_until("flush to find room once the FIFO is read", || {
        shards[0].flush()
    });
    assert!(shards[0].is_idle());
    wait_until("every record written", || {
        stats(&outputs, 0).records == expect.len() as u64
    });
    assert_eq!(stats(&outputs, 0).dropped, 0, "block never drops");
    drop(shards);
    outputs.shutdown(Duration::from_secs(5));
    let got: Vec<String> = drain.join().unwrap().lines().map(str::to_string).collect();
    assert_eq!(got, expect);
}

#[test]
fn shutdown_writes_out_queued_and_pending_records() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(
        "[[output]]\nkind = \"file\"\npath = \"{}\"\nfsync_interval = \"1h\"\n",
        dir.path().display()
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    let mut expect = [Vec::new(), Vec::new()];
    for (shard, so) in shards.iter_mut().enumerate() {
        let bodies: Vec<_> = (0..2000)
            .map(|i| (Stream::Late, record(Stream::Late, shard, i, 150)))
            .collect();
        expect[shard].extend(bodies.iter().map(|(_, b)| line(b)));
        so.deliver(&out_of(&bodies));
    }
    // Shard 0 flushes; shard 1 leaves a partial batch pending, handed over when it is dropped.
    assert!(shards[0].flush());
    assert!(!shards[1].is_idle());
    drop(shards);
    outputs.shutdown(Duration::from_secs(10));
    for (shard, exp) in expect.iter().enumerate() {
        assert_eq!(
            &read_lines(&dir.path().join(format!("shard-{shard}.jsonl"))),
            exp,
            "shard {shard}"
        );
    }
}

#[test]
fn deliver_and_flush_allocate_nothing_in_steady_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(
        "[[output]]\nkind = \"file\"\npath = \"{}\"\n\n[[output]]\nkind = \"file\"\npath = \"{}/m\"\nstreams = [\"markers\"]\nqueue_bytes = \"256KiB\"\n",
        dir.path().display(),
        dir.path().display()
    ));
    let (outputs, mut shards) = Outputs::start(&cfg, 2).unwrap();
    // Several full batches per round on the first sink, partial ones handed over by flush.
    let outs: Vec<Out> = (0..2)
        .map(|shard| {
            let bodies: Vec<_> = (0..1000)
                .map(|i| {
                    let stream = if i % 2 == 0 {
                        Stream::Events
                    } else {
                        Stream::Markers
                    };
                    (stream, record(stream, shard, i, 150))
                })
                .collect();
            out_of(&bodies)
        })
        .collect();
    let mut written = [0u64; 2];
    for round in 0..60 {
        let before = allocations();
        for (so, out) in shards.iter_mut().zip(&outs) {
            so.deliver(out);
            assert!(so.flush());
        }
        let allocated = allocations() - before;
        // Buffers come from the pool filled at start, so not even the first round allocates.
        assert_eq!(allocated, 0, "round {round}: deliver/flush allocated");
        written[0] += 2000;
        written[1] += 1000;
        wait_until("the sinks to catch up", || {
            let s = outputs.stats();
            s[0].records + s[0].dropped == written[0] && s[1].records + s[1].dropped == written[1]
        });
    }
    assert_eq!(outputs.stats()[0].dropped, 0);
    drop(shards);
    outputs.shutdown(Duration::from_secs(5));
}
