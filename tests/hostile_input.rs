//! Hostile input against the real appliance: a corpus of bad records (`corpus()`), each sent
//! between good events over UDP and over TCP. Every bad record must come out on the dead-letter
//! stream with its reason and be counted under that reason (the shutdown `shard stats` and
//! `/metrics`); every good event around it must be enriched into a session whose markers are
//! right. Input the appliance accepts on purpose (huge numbers, duplicate members no rule reads,
//! a numeric key, a timestamp from a fast clock) is checked as good; a far-past timestamp is late.

mod util;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use util::*;

const T: Duration = Duration::from_secs(10);
const SHARDS: u32 = 2;
const LINE_BYTES_MAX: usize = 1024;
const DATAGRAM_BYTES_MAX: usize = 2048;
const KEY_BYTES_MAX: usize = 16;
const DEPTH_MAX: usize = 8;

fn hostile_config(_dir: &std::path::Path) -> String {
    format!(
        r#"cores = [0, 1]

[memory]
arena_bytes = "2MiB"
max_sessions = 20000

[limits]
line_bytes_max = {LINE_BYTES_MAX}
datagram_bytes_max = {DATAGRAM_BYTES_MAX}
key_bytes_max = {KEY_BYTES_MAX}
json_depth_max = {DEPTH_MAX}
future_skew_max = "1h"

[metrics]
address = "127.0.0.1:0"
publish_interval = "100ms"

[log]
level = "info"

[[listener]]
kind = "udp"
address = "127.0.0.1:0"

[[listener]]
kind = "tcp"
address = "127.0.0.1:0"

[[output]]
kind = "tcp"
address = "127.0.0.1:0"

[[profile]]
name = "web"
match = {{ field = "kind", eq = "web" }}
key = "user"
idle_timeout = "30m"
ends_when = {{ field = "type", eq = "logout" }}

[[profile.aggregate]]
name = "total"
field = "n"
op = "sum"

[[profile]]
name = "iot"
match = {{ field = "kind", eq = "iot" }}
key = "dev"
time = "event"
timestamp = {{ field = "ts", format = "epoch_ms" }}
allowed_lateness = "1m"
idle_timeout = "10m"
ends_when = {{ field = "type", eq = "off" }}
"#
    )
}

/// What the appliance must do with one corpus record.
#[derive(Clone, Debug)]
enum Expect {
    /// Dead-lettered with this reason.
    Dead(&'static str),
    /// A good event of this (profile, key).
    Good(&'static str, String),
    /// Behind the watermark: a `late_event` record.
    Late,
    /// Not a record at all (a zero-length line).
    Ignored,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
    /// Sent only over this transport (`None`: both).
    only: Option<&'static str>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        expect,
        only: None,
    }
}

/// The bad-input corpus. `dev` is the event-time key the good iot events use, `fast` another
/// key on the same shard (so its timestamps meet the same watermark).
fn corpus(now: i64, dev: &str, fast: &str) -> Vec<Case> {
    use Expect::*;
    let web = |k: &str| Good("web", k.to_string());
    let deep = format!(
        r#"{{"kind":"web","user":"alice","x":{}1{}}}"#,
        "[".repeat(DEPTH_MAX + 4),
        "]".repeat(DEPTH_MAX + 4)
    );
    let at_depth_limit = format!(
        r#"{{"kind":"web","user":"alice","x":{}1{}}}"#,
        "[".repeat(DEPTH_MAX - 1),
        "]".repeat(DEPTH_MAX - 1)
    );
    let long_line = format!(
        r#"{{"kind":"web","user":"alice","pad":"{}"}}"#,
        "p".repeat(LINE_BYTES_MAX)
    );
    let huge_digits = "9".repeat(400);
    let mut c = vec![
        case(
            "invalid json",
            r#"{"kind":"web","user":"alice","#,
            Dead("invalid_json"),
        ),
        case("bare word", "hello", Dead("not_object")),
        case(
            "raw control character in a string",
            b"{\"kind\":\"web\",\"user\":\"al\x01ice\"}".to_vec(),
            Dead("invalid_json"),
        ),
        case(
            "invalid utf-8 in a value",
            b"{\"kind\":\"web\",\"user\":\"alice\",\"p\":\"\xff\xfe\"}".to_vec(),
            Dead("invalid_utf8"),
        ),
        case(
            "invalid utf-8 in the key",
            b"{\"kind\":\"web\",\"user\":\"\xc3\x28\"}".to_vec(),
            Dead("invalid_utf8"),
        ),
        case(
            "invalid escape",
            r#"{"kind":"web","user":"a\qb"}"#,
            Dead("invalid_escape"),
        ),
        case("array", "[1,2,3]", Dead("not_object")),
        case("number", "42", Dead("not_object")),
        case(
            "trailing bytes",
            r#"{"kind":"web","user":"alice"} x"#,
            Dead("trailing_bytes"),
        ),
        case("nested beyond json_depth_max", deep, Dead("too_deep")),
        case("nested at json_depth_max", at_depth_limit, web("alice")),
        case(
            "duplicate key member",
            r#"{"kind":"web","user":"alice","user":"bob"}"#,
            Dead("duplicate_field"),
        ),
        case(
            "duplicate member no rule reads",
            r#"{"kind":"web","user":"bob","x":1,"x":2}"#,
            web("bob"),
        ),
        case("whitespace-only line", " \t ", Dead("empty_line")),
        case("zero-length line", "", Ignored),
        case("line over line_bytes_max", long_line, Dead("line_too_long")),
        case(
            "missing key",
            r#"{"kind":"web","type":"click"}"#,
            Dead("missing_key"),
        ),
        case(
            "null key",
            r#"{"kind":"web","user":null}"#,
            Dead("missing_key"),
        ),
        case(
            "object key",
            r#"{"kind":"web","user":{"id":"alice"}}"#,
            Dead("missing_key"),
        ),
        case(
            "array key",
            r#"{"kind":"web","user":["alice"]}"#,
            Dead("missing_key"),
        ),
        case(
            "key over key_bytes_max",
            format!(
                r#"{{"kind":"web","user":"{}"}}"#,
                "k".repeat(KEY_BYTES_MAX + 1)
            ),
            Dead("key_too_long"),
        ),
        case(
            "numeric key",
            r#"{"kind":"web","user":12345,"type":"logout"}"#,
            web("12345"),
        ),
        case(
            "huge numbers",
            format!(r#"{{"kind":"web","user":"alice","n":1e999999,"m":{huge_digits}}}"#),
            web("alice"),
        ),
        case(
            "number beyond f64 in an aggregate",
            r#"{"kind":"web","user":"bob","n":-1e400}"#,
            web("bob"),
        ),
        case(
            "missing timestamp",
            format!(r#"{{"kind":"iot","dev":"{dev}"}}"#),
            Dead("bad_timestamp"),
        ),
        case(
            "malformed timestamp",
            format!(r#"{{"kind":"iot","dev":"{dev}","ts":"yesterday"}}"#),
            Dead("bad_timestamp"),
        ),
        case(
            "negative timestamp",
            format!(r#"{{"kind":"iot","dev":"{dev}","ts":-5}}"#),
            Dead("bad_timestamp"),
        ),
        case(
            "huge timestamp",
            format!(r#"{{"kind":"iot","dev":"{dev}","ts":1e400}}"#),
            Dead("bad_timestamp"),
        ),
        case(
            "far-future timestamp (beyond future_skew_max)",
            format!(
                r#"{{"kind":"iot","dev":"{dev}","ts":{}}}"#,
                now + 10 * 86_400_000
            ),
            Dead("bad_timestamp"),
        ),
        case(
            "far-past timestamp (behind the watermark)",
            format!(r#"{{"kind":"iot","dev":"{dev}","ts":1000}}"#),
            Late,
        ),
        case(
            "fast clock (within future_skew_max)",
            format!(
                r#"{{"kind":"iot","dev":"{fast}","ts":{}}}"#,
                now + 30 * 60_000
            ),
            Good("iot", fast.to_string()),
        ),
    ];
    c.push(Case {
        name: "datagram over datagram_bytes_max",
        bytes: format!(
            r#"{{"kind":"web","user":"alice","pad":"{}"}}"#,
            "d".repeat(DATAGRAM_BYTES_MAX)
        )
        .into_bytes(),
        expect: Dead("datagram_too_long"),
        only: Some("udp"),
    });
    c
}

/// Good traffic around the corpus: web keys `alice` and `bob` (processing time) and the
/// event-time key `dev`, whose timestamps advance by 1 ms per event from `now`.
struct Good {
    now: i64,
    dev: String,
    n: usize,
    /// Sum of `n` over bob's events.
    bob_sum: u64,
    sent: BTreeMap<(&'static str, String), u64>,
}

impl Good {
    fn next(&mut self) -> Vec<Vec<u8>> {
        self.n += 1;
        let i = self.n;
        let user = if i.is_multiple_of(2) { "alice" } else { "bob" };
        if user == "bob" {
            self.bob_sum += 1;
        }
        *self.sent.entry(("web", user.into())).or_default() += 1;
        *self.sent.entry(("iot", self.dev.clone())).or_default() += 1;
        vec![
            format!(r#"{{"kind":"web","user":"{user}","type":"click","i":{i},"n":1}}"#)
                .into_bytes(),
            format!(
                r#"{{"kind":"iot","dev":"{}","ts":{},"i":{i}}}"#,
                self.dev,
                self.now + i as i64
            )
            .into_bytes(),
        ]
    }

    fn last(&mut self) -> Vec<Vec<u8>> {
        self.n += 1;
        let i = self.n;
        for k in [("web", "alice"), ("web", "bob")] {
            *self.sent.entry((k.0, k.1.into())).or_default() += 1;
        }
        *self.sent.entry(("iot", self.dev.clone())).or_default() += 1;
        vec![
            br#"{"kind":"web","user":"alice","type":"logout"}"#.to_vec(),
            br#"{"kind":"web","user":"bob","type":"logout"}"#.to_vec(),
            format!(
                r#"{{"kind":"iot","dev":"{}","ts":{},"type":"off"}}"#,
                self.dev,
                self.now + i as i64
            )
            .into_bytes(),
        ]
    }
}

enum Sender {
    Udp(std::net::UdpSocket, SocketAddr),
    Tcp(std::net::TcpStream),
}

impl Sender {
    /// One record: a datagram of its own (UDP) or a line (TCP).
    fn send(&mut self, rec: &[u8]) {
        match self {
            Sender::Udp(s, to) => {
                s.send_to(rec, *to).expect("udp send");
                // Loopback never drops at this pace; the pause keeps the kernel queue short.
                std::thread::sleep(Duration::from_micros(200));
            }
            Sender::Tcp(s) => {
                s.write_all(rec).expect("tcp write");
                s.write_all(b"\n").expect("tcp write");
            }
        }
    }
}

/// Numbers in the corpus that are valid JSON but beyond what `serde_json` reads (without its
/// `arbitrary_precision` feature), longest first so none is a part of a later one.
fn huge_numbers() -> [String; 4] {
    [
        "9".repeat(400),
        "-1e400".into(),
        "1e999999".into(),
        "1e400".into(),
    ]
}

/// A line with each huge number replaced by a string naming it, so `serde_json` can read the
/// rest; the test checks the exact bytes of huge numbers separately.
fn tame(line: &str) -> String {
    let mut s = line.to_string();
    for (i, h) in huge_numbers().iter().enumerate() {
        s = s.replace(h.as_str(), &format!("\"huge#{i}\""));
    }
    s
}

fn records(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(&tame(l)).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn dead_letters(lines: &[String]) -> Vec<Value> {
    records(lines)
        .into_iter()
        .filter(|v| v["kind"] == "dead_letter")
        .collect()
}

/// What a dead letter of `bytes` must carry: the raw text (lossy for invalid UTF-8, the first
/// 1 KiB of an oversize record) or, for a decoded event the engine refused, the event object.
fn dead_payload(reason: &str, bytes: &[u8]) -> Value {
    match reason {
        "missing_key" | "key_too_long" | "bad_timestamp" | "session_table_full" => {
            serde_json::from_str(&tame(std::str::from_utf8(bytes).unwrap()))
                .expect("a decoded event is JSON")
        }
        "line_too_long" | "datagram_too_long" => {
            Value::String(String::from_utf8_lossy(&bytes[..bytes.len().min(1024)]).into_owned())
        }
        _ => Value::String(String::from_utf8_lossy(bytes).into_owned()),
    }
}

fn run(transport: &'static str) {
    let mut app = Appliance::start(hostile_config);
    let mut out = app.consumer();
    let now = now_ms();
    let dev = key_on_shard("dev-", 1, SHARDS);
    let fast = key_on_shard("fast-", 1, SHARDS);
    let cases: Vec<Case> = corpus(now, &dev, &fast)
        .into_iter()
        .filter(|c| c.only.is_none_or(|t| t == transport))
        .collect();
    let mut sender = match transport {
        "udp" => Sender::Udp(udp_sender(), app.udp_addr()),
        _ => Sender::Tcp(tcp_send(app.tcp_addr(), b"")),
    };
    let mut good = Good {
        now,
        dev: dev.clone(),
        n: 0,
        bob_sum: 0,
        sent: BTreeMap::new(),
    };
    for c in &cases {
        for g in good.next() {
            sender.send(&g);
        }
        sender.send(&c.bytes);
        if let Expect::Good(p, k) = &c.expect {
            *good.sent.entry((p, k.clone())).or_default() += 1;
        }
    }
    // One datagram / write of several lines, good and bad mixed: each line stands alone.
    let mixed = [
        br#"{"kind":"web","user":"alice","type":"click"}"#.as_slice(),
        b"{oops",
        br#"{"kind":"web","user":"bob","type":"click"}"#,
    ]
    .join(&b'\n');
    sender.send(&mixed);
    *good.sent.entry(("web", "alice".into())).or_default() += 1;
    *good.sent.entry(("web", "bob".into())).or_default() += 1;
    for g in good.last() {
        sender.send(&g);
    }

    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &cases {
        if let Expect::Dead(r) = c.expect {
            *want.entry(r).or_default() += 1;
        }
    }
    *want.entry("invalid_json").or_default() += 1; // "{oops" of the mixed record
    let dead_total: u64 = want.values().sum();
    let ended_keys = 4; // alice, bob, 12345, dev
    let lines = out
        .read_until(T, |l| {
            count_kind(l, "session_end") == ended_keys
                && count_kind(l, "dead_letter") as u64 == dead_total
                && count_kind(l, "late_event") == 1
        })
        .to_vec();

    // Every bad record is on the dead-letter stream with its reason and its bytes.
    let dead = dead_letters(&lines);
    for c in &cases {
        let Expect::Dead(reason) = c.expect else {
            continue;
        };
        let payload = dead_payload(reason, &c.bytes);
        let found = dead.iter().any(|d| {
            d["reason"] == reason
                && (d["raw"] == payload || d["event"] == payload)
                && (d.get("raw").is_none() || d["transport"] == transport)
        });
        let same: Vec<&Value> = dead
            .iter()
            .filter(|d| d["raw"] == payload || d["event"] == payload)
            .collect();
        assert!(
            found,
            "{}: no dead letter {reason} carrying {payload}; with that payload: {same:?}",
            c.name
        );
    }
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for d in &dead {
        *got.entry(d["reason"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let want_s: BTreeMap<String, u64> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(got, want_s, "dead letters by reason");

    // The far-past event is reported late, with the watermark it missed.
    let late: Vec<Value> = records(&lines)
        .into_iter()
        .filter(|v| v["kind"] == "late_event")
        .collect();
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["key"], dev.as_str());
    assert_eq!(late[0]["ts"], 1000);
    assert!(
        late[0]["watermark"].as_i64().unwrap() > now - 120_000,
        "{}",
        late[0]
    );

    // Every good event is enriched into one session per key, in order, with right markers.
    let records = records(&lines);
    for ((profile, key), &n) in &good.sent {
        let key_field = if *profile == "web" { "user" } else { "dev" };
        let starts: Vec<&Value> = records
            .iter()
            .filter(|v| v["kind"] == "session_start" && v["profile"] == *profile)
            .filter(|v| v["key"] == key.as_str())
            .collect();
        assert_eq!(starts.len(), 1, "{profile}/{key}: starts {starts:?}");
        let id = starts[0]["session_id"].as_str().unwrap();
        let events: Vec<&Value> = records
            .iter()
            .filter(|v| v["_session"]["profile"] == *profile)
            .filter(|v| match &v[key_field] {
                Value::String(s) => s == key,
                Value::Number(x) => x.to_string() == *key,
                _ => false,
            })
            .collect();
        assert_eq!(events.len() as u64, n, "{profile}/{key}: enriched events");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["_session"]["id"], id, "{profile}/{key}: {e}");
            assert_eq!(e["_session"]["seq"], i as u64 + 1, "{profile}/{key}: {e}");
        }
        let ends: Vec<&Value> = records
            .iter()
            .filter(|v| v["kind"] == "session_end" && v["session_id"] == id)
            .collect();
        if key.as_str() == fast {
            // A 30-minute idle timeout: still open, and it started at its own (future) time.
            assert!(ends.is_empty(), "{ends:?}");
            assert_eq!(starts[0]["start_ts"], now + 30 * 60_000);
            continue;
        }
        assert_eq!(ends.len(), 1, "{profile}/{key}: {ends:?}");
        assert_eq!(ends[0]["count"], n, "{}", ends[0]);
        assert_eq!(ends[0]["reason"], "ends_when", "{}", ends[0]);
        if key.as_str() == "bob" {
            // -1e400 is not a finite number, so the sum skips it.
            assert_eq!(ends[0]["aggregates"]["total"], good.bob_sum, "{}", ends[0]);
        }
    }
    // A huge number is copied through byte for byte.
    assert!(
        lines.iter().any(|l| l.contains(&"9".repeat(400))),
        "the 400-digit number did not pass through"
    );

    // Counted by reason: /metrics while running...
    let text = wait_metrics(&app, T, |m| {
        metric_sum(m, "sessionizer_dead_letters_by_reason_total", &[]) as u64 == dead_total
    });
    for (reason, n) in &want {
        let v = metric_sum(
            &text,
            "sessionizer_dead_letters_by_reason_total",
            &[("reason", reason)],
        );
        assert_eq!(
            v as u64, *n,
            "dead_letters_by_reason_total{{reason={reason}}}"
        );
        if !matches!(
            *reason,
            "missing_key" | "key_too_long" | "bad_timestamp" | "datagram_too_long"
        ) {
            let v = metric_sum(
                &text,
                "sessionizer_parse_errors_total",
                &[("reason", reason)],
            );
            assert_eq!(v as u64, *n, "parse_errors_total{{reason={reason}}}");
        }
    }
    assert_eq!(
        metric_sum(&text, "sessionizer_dead_letters_total", &[]) as u64,
        dead_total
    );
    assert_eq!(metric_sum(&text, "sessionizer_late_events_total", &[]), 1.0);

    // ...and the per-shard counters logged at shutdown.
    let (status, _) = app.terminate(T);
    assert!(status.success());
    let stats = app.shard_stats();
    assert_eq!(stats.len(), SHARDS as usize);
    let sum = |f: &dyn Fn(&Value) -> u64| stats.iter().map(f).sum::<u64>();
    for (reason, n) in &want {
        let counted = match *reason {
            "line_too_long" => sum(&|s| s["lines_too_long"].as_u64().unwrap()),
            "datagram_too_long" => sum(&|s| s["udp_too_long"].as_u64().unwrap()),
            "missing_key" => sum(&|s| s["route_missing_key"].as_u64().unwrap()),
            "key_too_long" => sum(&|s| s["route_key_too_long"].as_u64().unwrap()),
            "bad_timestamp" => continue, // an engine reason: /metrics above
            r => sum(&|s| s["decode_errors"][r].as_u64().unwrap()),
        };
        assert_eq!(counted, *n, "shard stats for {reason}: {stats:?}");
    }
    let records_sent = cases
        .iter()
        .filter(|c| !matches!(c.expect, Expect::Ignored))
        .filter(|c| !matches!(c.expect, Expect::Dead("datagram_too_long")))
        .count() as u64
        + 3 // the mixed record's lines
        + good.n as u64 * 2
        + 1; // last(): three events instead of two
    let field = format!("{transport}_events");
    assert_eq!(
        sum(&|s| s[&field].as_u64().unwrap()),
        records_sent,
        "{stats:?}"
    );
}

#[test]
fn bad_records_over_udp_are_dead_lettered_and_counted_and_good_ones_flow() {
    run("udp");
}

#[test]
fn bad_records_over_tcp_are_dead_lettered_and_counted_and_good_ones_flow() {
    run("tcp");
}
