#!/bin/sh
# A qcow2 chain's life as a cloud's scripts drive it: build a base and an overlay,
# snapshot, write, resize, stack another overlay, rebase it past the middle image,
# commit it into the base, go back to the snapshot and delete it, shrink and grow
# (preallocated) the base, amend it to compat=0.10. Run it with IMG=qemu-img and with
# IMG=vconvert (nothing else changes): the images must read the same.
# Usage: IMG=PROGRAM qemu_img_chain.sh DIR   (guest writes use qemu-io)
set -eu
IMG=${IMG:-qemu-img}
cd "$1"

$IMG create -q -f qcow2 base.qcow2 24M
qemu-io -f qcow2 -c "write -P 0x11 0 3M" -c "write -P 0x12 10M 1M" base.qcow2 >/dev/null

$IMG create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-io -f qcow2 -c "write -P 0x21 1M 2M" -c "write -z 10M 256k" mid.qcow2 >/dev/null
$IMG snapshot -c before-resize mid.qcow2
qemu-io -f qcow2 -c "write -P 0x22 2M 64k" mid.qcow2 >/dev/null
$IMG resize -q mid.qcow2 +8M
qemu-io -f qcow2 -c "write -P 0x23 30M 1M" mid.qcow2 >/dev/null
$IMG snapshot -l mid.qcow2 >/dev/null

$IMG create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c "write -P 0x31 5M 512k" -c "discard 1M 64k" top.qcow2 >/dev/null
$IMG info --backing-chain top.qcow2 >/dev/null
$IMG map --output=json top.qcow2 >map-before.json

# Skip the middle image: what it held moves into the top image.
$IMG rebase -b base.qcow2 -F qcow2 top.qcow2
# Fold the top image into the base (which grows to the top's size).
$IMG commit -q top.qcow2
# Back to the snapshot taken before the resize (mid shrinks back to its size then).
$IMG snapshot -a before-resize mid.qcow2
$IMG snapshot -d before-resize mid.qcow2
$IMG resize -q --shrink base.qcow2 30M
$IMG resize -q --preallocation=metadata base.qcow2 +2M
# An image old qemu versions can open: zero clusters expanded.
qemu-io -f qcow2 -c "write -z 0 128k" base.qcow2 >/dev/null
$IMG amend -o compat=0.10 base.qcow2

for f in base.qcow2 mid.qcow2 top.qcow2; do
    $IMG check -q "$f"
done
$IMG convert -O raw top.qcow2 top.raw
$IMG convert -O raw base.qcow2 base.raw
