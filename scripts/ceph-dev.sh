#!/bin/bash
# A real single-node Ceph cluster for development and tests, from Debian's packages.
#
#   scripts/ceph-dev.sh start DIR   # prints the CEPH_CONF path on its last line
#   scripts/ceph-dev.sh stop DIR
#
# One monitor, one manager (CEPH_DEV_MGR=0 leaves it out: RBD does not need it), one
# OSD on a file-backed bluestore (bluestore makes a sparse block file of
# CEPH_DEV_OSD_GB, default 10, in the OSD directory), cephx on, everything on 127.0.0.1,
# and a pool `images` (size 1) initialised for RBD. Every file of the cluster, its
# daemons' pid files, logs, sockets and keyrings live in DIR; nothing under /etc/ceph or
# /var/lib/ceph is used. `stop` ends the daemons by the PIDs in DIR/run.
# Two clusters at once need other ports: CEPH_DEV_PORT (msgr v2, default 3300) and
# CEPH_DEV_PORT_V1 (default 6789).
#
# When Ceph's programs are missing and this runs as root on Debian, the packages are
# installed: ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev librados-dev
# (the last two are for building vimport with the cargo feature `rbd`).
#
# The approach of go-ceph's testing/containers/micro-osd.sh (written anew here).
set -euo pipefail

PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev librados-dev)

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
CMD=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
RUN="$DIR/run"
CONF="$DIR/ceph.conf"

log() { echo "ceph-dev: $*" >&2; }

ensure_packages() {
    local need=(ceph-mon ceph-osd ceph-authtool monmaptool ceph rbd) missing=() c
    [ "${CEPH_DEV_MGR:-1}" = 1 ] && need+=(ceph-mgr)
    for c in "${need[@]}"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing: ${missing[*]}; install Debian's Ceph packages with"
        log "  apt-get install --no-install-recommends ${PACKAGES[*]}   (as root)"
        exit 1
    fi
    log "missing: ${missing[*]}; installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# Stops every daemon whose pid file is in DIR/run, waiting until each is gone.
stop() {
    local f pid i
    for f in "$RUN"/*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for i in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

# Runs `ceph`/`rbd` against this cluster as client.admin.
ceph_() { ceph --conf "$CONF" "$@"; }

# Waits (at most $1 seconds) until `$2...` succeeds.
wait_for() {
    local limit=$1 i
    shift
    for i in $(seq $((limit * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "timed out after ${limit}s waiting for: $*"
    return 1
}

start() {
    ensure_packages
    stop
    rm -rf "${DIR:?}"/{mon,osd,mgr,log,run,ceph.conf,*.keyring,monmap}
    mkdir -p "$DIR"/{mon,osd,mgr,log} "$RUN"
    local fsid port port1 mgr osd_gb
    fsid=$(uuidgen)
    port=${CEPH_DEV_PORT:-3300}
    port1=${CEPH_DEV_PORT_V1:-6789}
    mgr=${CEPH_DEV_MGR:-1}
    osd_gb=${CEPH_DEV_OSD_GB:-10}
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port,v1:127.0.0.1:$port1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $RUN
pid file = $RUN/\$name.pid
log file = $DIR/log/\$name.log
chdir = ""
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon allow pool delete = true
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail crit = 0
mon data avail warn = 0

[client]
keyring = $DIR/client.admin.keyring

[mon]
admin socket = $RUN/\$name.asok
mon data = $DIR/mon/\$name
mon cluster log file = $DIR/log/cluster.log

[mgr]
admin socket = $RUN/\$name.asok
mgr data = $DIR/mgr/\$name

[osd]
admin socket = $RUN/\$name.asok
osd data = $DIR/osd/\$name
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $((osd_gb << 30))
bluestore fsck on mount = false
osd memory target = 1073741824
osd class load list = *
osd class default list = *
EOF
    # Keyrings: the monitor's, the admin's (imported into the monitor's), the OSDs'
    # bootstrap.
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$port1]" \
        "$DIR/monmap" >/dev/null
    ceph-mon --conf "$CONF" --id a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
    ceph-mon --conf "$CONF" --id a
    wait_for 30 ceph_ --connect-timeout 2 mon stat

    if [ "$mgr" = 1 ]; then
        mkdir -p "$DIR/mgr/mgr.x"
        ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
            -o "$DIR/mgr/mgr.x/keyring"
        ceph-mgr --conf "$CONF" --id x
    fi

    local uuid osd_id secret
    uuid=$(uuidgen)
    secret=$(ceph-authtool --gen-print-key)
    osd_id=$(echo "{\"cephx_secret\": \"$secret\"}" | ceph_ osd new "$uuid" -i -)
    mkdir -p "$DIR/osd/osd.$osd_id"
    ceph-authtool --create-keyring "$DIR/osd/osd.$osd_id/keyring" --name "osd.$osd_id" \
        --add-key "$secret" >/dev/null
    ceph-osd --conf "$CONF" --id "$osd_id" --mkfs --osd-uuid "$uuid" 2>>"$DIR/log/osd-mkfs.log"
    ceph-osd --conf "$CONF" --id "$osd_id"
    wait_for 60 sh -c "ceph --conf '$CONF' osd stat -f json | grep -q '\"num_up_osds\":1'"

    ceph_ osd pool create images 8 8 >/dev/null 2>&1
    ceph_ osd pool set images size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
    rbd --conf "$CONF" pool init images
    log "cluster up in $DIR (pool images)"
    echo "$CONF"
}

case "$CMD" in
start) start ;;
stop) stop ;;
*) usage ;;
esac
