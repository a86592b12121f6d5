//! Drop accounting from outside the harness: the appliance's Prometheus endpoint (a plain HTTP
//! GET over a `TcpStream`) and the kernel's UDP counters in `/proc/net/snmp`.
//!
//! Metric names are matched by substring (`drop`, `dead_letter`, `parse_error`) so the harness
//! keeps working while the appliance's names settle; a missing endpoint or series is reported as
//! absent, never as an error of the run. The response is read up to [`RESPONSE_BYTES_MAX`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

pub const RESPONSE_BYTES_MAX: u64 = 32 << 20;
const TIMEOUT: Duration = Duration::from_secs(2);
/// Substrings that make a metric count as a drop.
pub const DROP_PATTERNS: [&str; 3] = ["drop", "dead_letter", "parse_error"];

/// Whether the series `name{labels}` counts drops (matched on the name, case-insensitively).
pub fn is_drop_metric(series: &str) -> bool {
    let name = series
        .split('{')
        .next()
        .unwrap_or(series)
        .to_ascii_lowercase();
    DROP_PATTERNS.iter().any(|p| name.contains(p))
}

/// GETs a Prometheus text endpoint and returns every series whose name counts drops.
pub fn scrape_drops(url: &str) -> Result<BTreeMap<String, f64>, String> {
    let body = http_get(url)?;
    Ok(parse_prometheus(&body)
        .into_iter()
        .filter(|(series, _)| is_drop_metric(series))
        .collect())
}

/// The events the deltas say were dropped. Parse errors are dead-lettered too (the appliance
/// counts a bad line under both), so `parse_error` series count only when no `dead_letter`
/// series exists; everything else that matches is added up.
pub fn counted(deltas: &BTreeMap<String, f64>) -> f64 {
    let name = |series: &str| {
        series
            .split('{')
            .next()
            .unwrap_or(series)
            .to_ascii_lowercase()
    };
    let has_dead_letter = deltas.keys().any(|s| name(s).contains("dead_letter"));
    deltas
        .iter()
        .filter(|(series, _)| {
            let name = name(series);
            let parse_error_only = name.contains("parse_error")
                && !name.contains("drop")
                && !name.contains("dead_letter");
            !(has_dead_letter && parse_error_only)
        })
        .map(|(_, delta)| delta)
        .sum()
}

/// `after - before` per series (a series absent before counts from 0).
pub fn deltas(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(series, value)| {
            (
                series.clone(),
                value - before.get(series).copied().unwrap_or(0.0),
            )
        })
        .collect()
}

pub fn http_get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("metrics URL {url:?}: only http:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let address = authority
        .to_socket_addrs()
        .map_err(|e| format!("metrics address {authority:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("metrics address {authority:?} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)
        .map_err(|e| format!("metrics {address}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("metrics {address}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("metrics {address}: {e}"))?;
    let mut response = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut response)
        .map_err(|e| format!("metrics {address}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("metrics {address}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("metrics {url}: {status}"));
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    Ok(if chunked {
        dechunk(body)
    } else {
        body.to_string()
    })
}

/// Decodes an HTTP/1.1 chunked body (for servers that chunk even an HTTP/1.0 reply).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    out
}

/// Series and values of a Prometheus text exposition (comments and malformed lines skipped).
pub fn parse_prometheus(body: &str) -> Vec<(String, f64)> {
    let mut series = Vec::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The value follows the name and its labels; label values may hold spaces.
        let split_at = match line.rfind('}') {
            Some(close) => close + 1,
            None => line.find(char::is_whitespace).unwrap_or(line.len()),
        };
        let (name, rest) = line.split_at(split_at);
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        series.push((name.trim().to_string(), value));
    }
    series
}

/// The kernel's UDP counters (`Udp:` rows of `/proc/net/snmp`), e.g. `RcvbufErrors`: datagrams
/// dropped because a socket's receive buffer was full. System-wide, not per process.
pub fn udp_kernel_counters() -> Option<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    parse_snmp_udp(&text)
}

fn parse_snmp_udp(text: &str) -> Option<BTreeMap<String, u64>> {
    let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
    let names = rows.next()?.split_whitespace().skip(1);
    let values = rows.next()?.split_whitespace().skip(1);
    Some(
        names
            .zip(values)
            .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// `after - before` of the kernel counters.
pub fn kernel_deltas(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                value.saturating_sub(before.get(name).copied().unwrap_or(0)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const EXPOSITION: &str = "# HELP x\n# TYPE sessionizer_events_dropped_total counter\n\
        sessionizer_events_dropped_total{reason=\"queue full\",shard=\"0\"} 12\n\
        sessionizer_events_total 100\n\
        sessionizer_parse_errors_total 3 1732500000000\n\
        dead_letter_total 2\n";

    #[test]
    fn parses_and_filters_series() {
        let series = parse_prometheus(EXPOSITION);
        assert_eq!(series.len(), 4);
        let drops: Vec<_> = series.iter().filter(|(s, _)| is_drop_metric(s)).collect();
        assert_eq!(drops.len(), 3, "{drops:?}");
        assert_eq!(
            series[0].0,
            "sessionizer_events_dropped_total{reason=\"queue full\",shard=\"0\"}"
        );
        assert_eq!(series[0].1, 12.0);
    }

    #[test]
    fn parse_errors_count_once() {
        let mut deltas = BTreeMap::new();
        deltas.insert(
            "sessionizer_parse_errors_total{reason=\"invalid_json\"}".to_string(),
            3.0,
        );
        assert_eq!(counted(&deltas), 3.0);
        deltas.insert(
            "sessionizer_dead_letters_total{source=\"ingest\"}".to_string(),
            3.0,
        );
        deltas.insert(
            "sessionizer_udp_kernel_drops_total{shard=\"0\"}".to_string(),
            5.0,
        );
        assert_eq!(counted(&deltas), 8.0);
    }

    #[test]
    fn drop_patterns_are_substrings() {
        assert!(is_drop_metric("udp_datagrams_dropped_total"));
        assert!(is_drop_metric("events_dead_letter_total{reason=\"x\"}"));
        assert!(is_drop_metric("sessionizer_parse_error_total"));
        assert!(!is_drop_metric("sessionizer_events_total{note=\"drop\"}"));
    }

    #[test]
    fn scrapes_over_http_and_computes_deltas() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for body in [
                "x_dropped_total 1\n",
                "x_dropped_total 5\ny_dead_letter_total 2\n",
            ] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).unwrap();
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        let url = format!("http://{address}/metrics");
        let before = scrape_drops(&url).unwrap();
        let after = scrape_drops(&url).unwrap();
        server.join().unwrap();
        let delta = deltas(&before, &after);
        assert_eq!(delta["x_dropped_total"], 4.0);
        assert_eq!(delta["y_dead_letter_total"], 2.0);
        assert_eq!(counted(&delta), 6.0);
        assert!(scrape_drops("http://127.0.0.1:1/metrics").is_err());
    }

    #[test]
    fn chunked_bodies_and_snmp() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        let snmp = "Udp: InDatagrams NoPorts InErrors RcvbufErrors\nUdp: 10 1 2 3\nUdpLite: A\nUdpLite: 0\n";
        let counters = parse_snmp_udp(snmp).unwrap();
        assert_eq!(counters["RcvbufErrors"], 3);
        assert_eq!(counters.len(), 4);
    }
}
