#!/usr/bin/env bash
# Soak: a bounded run of the real appliance under the bundled load generator, sampling throughput,
# resident memory and drops every few seconds into a CSV, then printing a summary. Not run in CI.
#
#   bench/soak.sh [DURATION_S] [RATE] [INTERVAL_S]     defaults: 180 100k 5
#   bench/soak.sh --summary SAMPLES_CSV                 the summary of an earlier run
#
# Environment: SOAK_DIR (where the config, log and samples.csv go; default a fresh mktemp -d),
# SOAK_CORES (the config's `cores`, default "all"), SOAK_KEYS (distinct keys, default 200k).
# Every address is loopback with port 0; the bound ports come from the READY line, so the run does
# not collide with another appliance on the host.
set -euo pipefail

# The summary of a samples CSV. The last sample is taken after the generator stopped (a partial
# interval, and the records of its final sessions meeting a closed output), so the rates and
# "during load" figures stop one sample earlier.
summary() {
    awk -F, 'NR > 1 { n++; rss[n] = $4; d[n] = $5 + $6 + $7; r[n] = $3; ev = $2 }
    END {
        last = (n > 2) ? n - 1 : n
        m = 0
        for (i = 2; i <= last; i++) v[++m] = r[i]
        for (i = 2; i <= m; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j + 1] = v[j]; j-- } v[j + 1] = x }
        med = (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
        printf "RSS first %d KiB, last under load %d KiB (%+d KiB), after the load %d KiB\n", rss[1], rss[last], rss[last] - rss[1], rss[n]
        printf "rate events/s over %d samples: min %d, median %d, max %d\n", m, v[1], med, v[m]
        printf "events in %d; drops (udp kernel + output + hand-off lost): %d under load, %d in all\n", ev, d[last], d[n]
    }' "$1"
}

if [[ ${1:-} == --summary ]]; then
    summary "$2"
    exit 0
fi

duration_s=${1:-180}
rate=${2:-100k}
interval_s=${3:-5}
cores=${SOAK_CORES:-'"all"'}
keys=${SOAK_KEYS:-200k}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/sessionizer
bench=$root/target/release/sessionizer-bench
dir=${SOAK_DIR:-$(mktemp -d /tmp/sessionizer-soak.XXXXXX)}
mkdir -p "$dir"

[[ -x $bin && -x $bench ]] || (cd "$root" && cargo build --release --bins)

cat >"$dir/soak.toml" <<EOF
cores = $cores

[memory]
arena_bytes = "64MiB"
max_sessions = 500000

[metrics]
address = "127.0.0.1:0"
publish_interval = "1s"

[log]
level = "warn"

[[listener]]
kind = "udp"
address = "127.0.0.1:0"

[[output]]
kind = "tcp"
address = "127.0.0.1:0"

# The bench's clickstream: sessions end on logout or after 1 s of inactivity (bench/README.md).
[[profile]]
name = "web"
key = "user"
idle_timeout = "1s"
ends_when = { field = "type", eq = "logout" }
metadata = ["tenant"]
state = ["page"]
EOF

"$bin" run --config "$dir/soak.toml" 2>"$dir/appliance.log" &
app_pid=$!
load_pid=
cleanup() {
    [[ -n $load_pid ]] && kill "$load_pid" 2>/dev/null || true
    kill -TERM "$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
}
trap cleanup EXIT

ready=
for _ in $(seq 100); do
    ready=$(grep -m1 '^READY ' "$dir/appliance.log" || true)
    [[ -n $ready ]] && break
    kill -0 "$app_pid" 2>/dev/null || { cat "$dir/appliance.log"; exit 1; }
    sleep 0.1
done
[[ -n $ready ]] || { echo "no READY line" >&2; cat "$dir/appliance.log"; exit 1; }
addr() { sed -E "s/.*\"kind\":\"$1\",\"address\":\"([^\"]+)\".*/\1/" <<<"$2"; }
listeners=$(grep -o '"listeners":\[[^]]*\]' <<<"$ready")
outputs=$(grep -o '"outputs":\[[^]]*\]' <<<"$ready")
udp=$(addr udp "$listeners")
out=$(addr tcp "$outputs")
metrics=$(sed -E 's/.*"metrics":"([^"]+)".*/\1/' <<<"$ready")

# Sum of every sample of one metric name in a scrape.
metric() { awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%.0f", s }' <<<"$2"; }

"$bench" run --target "$udp" --output "$out" --metrics "http://$metrics/metrics" \
    --rate "$rate" --duration "${duration_s}s" --keys "$keys" --gap-ms 100 --pause-ms 3000 \
    --no-save --quiet >"$dir/loadgen.txt" 2>&1 &
load_pid=$!

csv=$dir/samples.csv
echo "t_s,events_in,rate_per_s,rss_kib,udp_kernel_drops,output_dropped,handoff_lost,dead_letters,sessions_active" >"$csv"
t0=$(date +%s.%N)
prev_t=$t0
prev_in=0
while kill -0 "$load_pid" 2>/dev/null; do
    sleep "$interval_s"
    now=$(date +%s.%N)
    m=$(curl -s --max-time 2 "http://$metrics/metrics" || true)
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$app_pid/status")
    in=$(metric sessionizer_events_in_total "$m")
    rate_s=$(awk -v a="$in" -v b="$prev_in" -v t="$now" -v p="$prev_t" 'BEGIN { printf "%.0f", (a - b) / (t - p) }')
    printf '%.1f,%s,%s,%s,%s,%s,%s,%s,%s\n' \
        "$(awk -v t="$now" -v z="$t0" 'BEGIN { print t - z }')" "$in" "$rate_s" "$rss" \
        "$(metric sessionizer_udp_kernel_drops_total "$m")" \
        "$(metric sessionizer_output_dropped_total "$m")" \
        "$(metric sessionizer_handoff_lost_events_total "$m")" \
        "$(metric sessionizer_dead_letters_total "$m")" \
        "$(metric sessionizer_sessions_active "$m")" >>"$csv"
    prev_t=$now
    prev_in=$in
done
wait "$load_pid" || true
load_pid=

echo "soak: $duration_s s at $rate offered, samples every $interval_s s: $csv"
summary "$csv"
echo "loadgen summary:"
sed -n '1,40p' "$dir/loadgen.txt"
