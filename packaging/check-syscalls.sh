#!/usr/bin/env bash
# Trace a command and check every system call it makes against the candidate seccomp filter of
# systemd/sessionizer.service:
#     SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register
# expanded by this machine's systemd-analyze. Run it against the real appliance under load
# (ingest, hand-offs, snapshots, reload, shutdown) before enabling the filter in the unit:
#     packaging/check-syscalls.sh target/release/sessionizer run --config conf/sessionizer.toml
# (stop it with SIGTERM from another shell once the load has run). Exit status 0: every call is
# allowed; 1: the calls outside the filter are listed; 2: usage or tools missing.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
for tool in strace systemd-analyze; do
    command -v "$tool" >/dev/null || { echo "$tool is required (apt-get install -y $tool)" >&2; exit 2; }
done

trace=$(mktemp)
trap 'rm -f "$trace"' EXIT
# The command's own exit status is not the question here.
strace -f -qq -o "$trace" -- "$@" || true

# "PID name(args...) = ret": keep the names; skip signals, exits and "<... resumed>" halves.
used=$(awk '{ s = $2; sub(/\(.*/, "", s); if (s ~ /^[a-z_0-9]+$/) print s }' "$trace" | sort -u)

# Expand a group recursively (groups may name groups).
expand() {
    systemd-analyze syscall-filter "$1" 2>/dev/null | sed -e 's/^ *//' -e '/^#/d' -e '/^$/d' | tail -n +2 |
        while read -r name; do
            case "$name" in
                @*) expand "$name" ;;
                *) echo "$name" ;;
            esac
        done
}
allowed=$( { expand @system-service; printf '%s\n' io_uring_setup io_uring_enter io_uring_register; } | sort -u)

outside=$(comm -23 <(echo "$used") <(echo "$allowed"))
echo "system calls made: $(echo "$used" | wc -l)"
if [ -n "$outside" ]; then
    echo "outside the candidate filter:"
    echo "$outside" | sed 's/^/    /'
    exit 1
fi
echo "all inside @system-service + io_uring_*"
