#!/usr/bin/env bash
# Test hosts: separate "machines" on this one, as Linux network namespaces on a private bridge. Each host has
# its own interface and address, its own hostname (a UTS namespace) and an /etc/hosts that names every host of
# its set, so multi-node code meets real hostnames, real addresses and a real network that can fail.
#
#   tests/hosts.sh up SET N          create hosts SET1..SETN (idempotent: an existing, complete set is kept)
#   tests/hosts.sh up SET NAME...    the same with hosts named NAME... (1-11 of [a-z0-9-], starting with a letter)
#   tests/hosts.sh down SET          kill every process on them, remove exactly what `up` made (idempotent)
#   tests/hosts.sh exec HOST CMD...  run CMD on HOST: its network, its hostname, its /etc/hosts
#   tests/hosts.sh link HOST down|up take HOST's link down (a partition: its processes live on) or back up
#   tests/hosts.sh kill HOST         SIGKILL every process on HOST (a machine that died)
#   tests/hosts.sh wipe HOST         empty HOST's /dev/shm (its memory: a replaced machine; kill HOST first)
#   tests/hosts.sh pids HOST         the processes on HOST, one pid a line
#   tests/hosts.sh addr HOST         HOST's address
#   tests/hosts.sh status [SET]      the sets, their hosts, links and process counts; exit 1 if SET is not up
#
# Layout of set SET (1-8 of [a-z], so names fit Linux's 15-character interface names) with hosts H1..HN:
#   bridge etb-SET in the root namespace with address 10.213.K.254/24 (named SET-gw), K the first subnet no other
#   set uses; host Hi: namespace Hi, veth etv-Hi (root side, on the bridge) <-> eth0 (inside) with
#   10.213.K.i/24, lo up, no default route. Traffic can reach the set's own subnet only: nothing outside this
#   machine. The root namespace reaches the hosts through the bridge address (SLURM clients run there).
# `exec` enters the host's network and UTS namespaces and a private mount namespace in which the set's hosts
# file is bind-mounted over /etc/hosts, a resolv.conf naming only 127.0.0.1 over /etc/resolv.conf, and the host's
# own memory, $HOSTS_DIR/SET/shm-HOST (mode 1777, kept from one exec to the next), over /dev/shm: node-local
# files are each host's own, as on separate machines (the rest of the file system is shared, as on a cluster
# with one shared file system). What `up` made is recorded in $HOSTS_DIR/SET/ (default /run/elastictrain-hosts: the hosts
# file, the UTS namespaces) and every link carries the alias "elastictrain-hosts:SET"; `down` removes only
# recorded namespaces and links with that alias. Nothing is written outside $HOSTS_DIR. Needs root.
set -euo pipefail

HOSTS_DIR=${HOSTS_DIR:-/run/elastictrain-hosts}
NET=10.213
MARKER="# written by elastictrain tests/hosts.sh"

log() { echo "hosts.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "must run as root (network namespaces)"; }

check_set_name() {
    [[ $1 =~ ^[a-z]{1,8}$ ]] || die "set name '$1' must be 1-8 lowercase letters (interface names are short)"
}

# The set a host belongs to, from the records.
set_of() {
    local host=$1 set
    for set in "$HOSTS_DIR"/*/; do
        set=$(basename "$set")
        [[ -f $HOSTS_DIR/$set/hosts ]] && grep -q "^$host " "$HOSTS_DIR/$set/hosts" && { echo "$set"; return; }
    done
    die "no host '$host' (tests/hosts.sh status lists the hosts)"
}

ours() { [[ $(ip -o link show "$1" 2>/dev/null) == *"alias elastictrain-hosts:$2"* ]]; }

free_subnet() {
    local k used
    used=$(cat "$HOSTS_DIR"/*/subnet 2>/dev/null || true)
    for k in $(seq 1 250); do
        grep -qx "$NET.$k" <<<"$used" && continue
        ip -o addr show | grep -q " $NET.$k\." && continue  # somebody else's addresses
        echo "$NET.$k"
        return
    done
    die "no free subnet $NET.1-250.0/24"
}

do_up() {
    local set=$1 dir=$HOSTS_DIR/$1 subnet i host br=etb-$1 names=()
    shift
    check_set_name "$set"
    if [[ $# == 1 && $1 =~ ^[0-9]+$ ]]; then
        (($1 >= 1 && $1 <= 99)) || die "number of hosts '$1' must be 1-99"
        for i in $(seq "$1"); do names+=("$set$i"); done
    else
        names=("$@")
    fi
    ((${#names[@]})) || die "usage: tests/hosts.sh up SET N|NAME..."
    for host in "${names[@]}"; do
        [[ $host =~ ^[a-z][a-z0-9-]{0,10}$ ]] || die "host name '$host' must be 1-11 of [a-z0-9-], starting with a letter"
    done
    [[ $(printf '%s\n' "${names[@]}" | sort | uniq -d) == "" ]] || die "host names must differ: ${names[*]}"
    if [[ -f $dir/hosts ]]; then
        [[ $(cut -d' ' -f1 "$dir/hosts" | tr '\n' ' ') == "${names[*]} " ]] \
            || die "set $set has hosts $(cut -d' ' -f1 "$dir/hosts" | tr '\n' ' ')not ${names[*]}: run  tests/hosts.sh down $set  first"
        subnet=$(<"$dir/subnet")
    else
        for host in "${names[@]}"; do
            ! ip netns list | grep -q "^$host\b" || die "namespace $host exists but is not ours: not touching it"
            ! ip link show "etv-$host" >/dev/null 2>&1 || die "link etv-$host exists but is not ours"
        done
        ! ip link show "$br" >/dev/null 2>&1 || ours "$br" "$set" || die "link $br exists but is not ours"
        mkdir -p "$dir"
        subnet=$(free_subnet)
        echo "$subnet" >"$dir/subnet"
        i=0
        for host in "${names[@]}"; do i=$((i + 1)); echo "$host $subnet.$i"; done >"$dir/hosts.tmp"
        mv "$dir/hosts.tmp" "$dir/hosts"  # recorded before anything exists: `down` can always undo a partial `up`
    fi
    if ! ip link show "$br" >/dev/null 2>&1; then
        ip link add "$br" type bridge
        ip link set "$br" alias "elastictrain-hosts:$set"
        ip addr add "$subnet.254/24" dev "$br"
    fi
    ip link set "$br" up
    { echo "$MARKER"; echo "127.0.0.1 localhost"; echo "$subnet.254 $set-gw"
      while read -r host addr; do echo "$addr $host"; done <"$dir/hosts"; } >"$dir/etc-hosts"
    # No name server: names are the hosts file's, and a lookup never tries to leave the set's network.
    printf '%s\nnameserver 127.0.0.1\n' "$MARKER" >"$dir/resolv.conf"
    while read -r host addr; do
        if ! ip netns list | grep -q "^$host\b"; then
            ip netns add "$host"
        fi
        if ! ip link show "etv-$host" >/dev/null 2>&1; then
            ip link add "etv-$host" type veth peer name eth0 netns "$host"
            ip link set "etv-$host" alias "elastictrain-hosts:$set"
            ip link set "etv-$host" master "$br"
            ip -n "$host" addr add "$addr/24" dev eth0
        fi
        # IPv4 only: the hosts' one network is the set's subnet (no IPv6 link-local detours either).
        nsenter --net="/run/netns/$host" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$host" link set lo up
        ip -n "$host" link set eth0 up
        ip link set "etv-$host" up
        mkdir -p "$dir/shm-$host"
        chmod 1777 "$dir/shm-$host"
        if [[ ! -f $dir/$host.uts ]]; then
            touch "$dir/$host.uts"
            unshare --uts="$dir/$host.uts" hostname "$host"
        fi
    done <"$dir/hosts"
    wait_reachable "$set"
    log "set $set up: $(tr '\n' ' ' <"$dir/hosts")(gateway $subnet.254)"
}

# Callers get hosts that can already talk to each other: every bridge port forwarding, every link up.
wait_reachable() {
    local set=$1 host addr _
    while read -r host addr; do
        for _ in $(seq 100); do
            [[ $(bridge link show dev "etv-$host" 2>/dev/null) == *"state forwarding"* ]] && break
            sleep 0.1
        done
        [[ $(bridge link show dev "etv-$host" 2>/dev/null) == *"state forwarding"* ]] \
            || die "host $host: port etv-$host of bridge etb-$set does not forward"
    done <"$HOSTS_DIR/$set/hosts"
}

kill_host() {
    local host=$1 pids _
    ip netns list | grep -q "^$host\b" || return 0
    for _ in $(seq 50); do  # processes may fork while we kill: until none is left
        mapfile -t pids < <(ip netns pids "$host" 2>/dev/null)
        ((${#pids[@]})) || return 0
        kill -KILL "${pids[@]}" 2>/dev/null || true
        sleep 0.1
    done
    die "processes on $host survive SIGKILL: ${pids[*]}"
}

do_down() {
    local set=$1 dir=$HOSTS_DIR/$1 host addr _
    check_set_name "$set"
    [[ -f $dir/hosts ]] || { log "set $set is not up"; return 0; }
    while read -r host addr; do
        kill_host "$host"
        ours "etv-$host" "$set" && ip link del "etv-$host"
        ip netns list | grep -q "^$host\b" && ip netns del "$host"
        if [[ -e $dir/$host.uts ]]; then
            umount "$dir/$host.uts" 2>/dev/null || true
            rm -f "$dir/$host.uts"
        fi
    done <"$dir/hosts"
    ours "etb-$set" "$set" && ip link del "etb-$set"
    # A namespace's links go away asynchronously once it is deleted.
    for _ in $(seq 50); do
        [[ -z $(ip -o link show | grep "elastictrain-hosts:$set\$" || true) ]] && break
        sleep 0.1
    done
    rm -rf "$dir"
    log "set $set removed"
}

do_exec() {
    local host=$1 set
    shift
    (($#)) || die "usage: tests/hosts.sh exec HOST CMD..."
    set=$(set_of "$host")
    # Every step execs the next, so the caller's pid ends up being CMD's (daemons' pidfiles stay true).
    exec nsenter --net="/run/netns/$host" --uts="$HOSTS_DIR/$set/$host.uts" -- \
        unshare --mount --propagation slave -- \
        /bin/sh -c 'mount --bind "$0/etc-hosts" /etc/hosts && mount --bind "$0/resolv.conf" /etc/resolv.conf &&
                    mount --bind "$0/shm-$1" /dev/shm && shift && exec "$@"' "$HOSTS_DIR/$set" "$host" "$@"
}

do_wipe() {
    local host=$1 set
    set=$(set_of "$host")
    [[ -z $(ip netns pids "$host" 2>/dev/null) ]] || die "host $host still runs processes: tests/hosts.sh kill $host first"
    find "$HOSTS_DIR/$set/shm-$host" -mindepth 1 -delete
}

do_link() {
    local host=$1 state=${2:-} set
    set=$(set_of "$host")
    [[ $state == up || $state == down ]] || die "usage: tests/hosts.sh link HOST down|up"
    ip link set "etv-$host" "$state"
}

do_status() {
    local set host addr ok=0 want=${1:-}
    for set in "$HOSTS_DIR"/*/; do
        [[ -f $set/hosts ]] || continue
        set=$(basename "$set")
        [[ -z $want || $want == "$set" ]] || continue
        echo "set $set: bridge etb-$set $(<"$HOSTS_DIR/$set/subnet").254"
        while read -r host addr; do
            echo "  $host $addr link $(ip -o link show "etv-$host" 2>/dev/null | grep -o 'state [A-Z]*' || echo missing)," \
                 "$(ip netns pids "$host" 2>/dev/null | wc -l) processes"
        done <"$HOSTS_DIR/$set/hosts"
    done
    [[ -z $want || -f $HOSTS_DIR/$want/hosts ]] || ok=1
    return $ok
}

ACTION=${1:-}
shift || true
case $ACTION in
    up|down)
        need_root
        mkdir -p "$HOSTS_DIR"
        exec 8>"$HOSTS_DIR/.lock"
        flock -w 60 8 || die "another hosts.sh holds $HOSTS_DIR/.lock"
        if [[ $ACTION == up ]]; then
            do_up "${1:?usage: up SET N|NAME...}" "${@:2}"
        else
            do_down "${1:?usage: down SET}"
        fi
        ;;
    exec) need_root; do_exec "${1:?usage: exec HOST CMD...}" "${@:2}" ;;
    link) need_root; do_link "${1:?usage: link HOST down|up}" "${2:-}" ;;
    kill) need_root; set_of "${1:?usage: kill HOST}" >/dev/null; kill_host "$1" ;;
    wipe) need_root; do_wipe "${1:?usage: wipe HOST}" ;;
    pids) set_of "${1:?usage: pids HOST}" >/dev/null; ip netns pids "$1" ;;
    addr) set=$(set_of "${1:?usage: addr HOST}"); grep "^$1 " "$HOSTS_DIR/$set/hosts" | cut -d' ' -f2 ;;
    status) do_status "${1:-}" ;;
    *) sed -n '2,/^set -e/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
