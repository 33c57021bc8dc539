#!/bin/bash
# Fetches Debian's stock kernel (package linux-image-amd64) into a cache directory and takes the
# uncompressed ELF vmlinux out of its bzImage, so ferry can boot it without running the
# decompressor (which takes tens of minutes under PVM's ring-0 emulation).
#
# usage: debian-vmlinux.sh CACHE_DIR   -> prints the path of the ELF vmlinux; the package's
#                                          bzImage is kept beside it as CACHE_DIR/vmlinuz
set -euo pipefail
cache=${1:?usage: debian-vmlinux.sh CACHE_DIR}
mkdir -p "$cache"
cd "$cache"
if [[ -s vmlinux && -s vmlinuz ]]; then
    echo "$cache/vmlinux"
    exit 0
fi
if ! ls linux-image-[0-9]*.deb >/dev/null 2>&1; then
    package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [[ -n $package ]] || { echo "debian-vmlinux: apt knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
    apt-get download "$package" >&2
fi
rm -rf root
dpkg-deb -x linux-image-[0-9]*.deb root
bzimage=$(ls root/boot/vmlinuz-*)
cp "$bzimage" vmlinuz
# The payload is XZ for Debian's kernels; look for the stream magic and decompress from there.
offset=$(grep -abo $'\xfd7zXZ\x00' "$bzimage" | head -n 1 | cut -d: -f1)
[[ -n $offset ]] || { echo "debian-vmlinux: no XZ payload in $bzimage" >&2; exit 1; }
# xz complains about the bytes after the stream (the bzImage trailer); the ELF check decides.
tail -c +$((offset + 1)) "$bzimage" | xz -dc > vmlinux.tmp 2>/dev/null || true
if [[ $(head -c 4 vmlinux.tmp | od -An -tx1 | tr -d ' ') != 7f454c46 ]]; then
    echo "debian-vmlinux: the payload of $bzimage is not an ELF vmlinux" >&2
    exit 1
fi
mv vmlinux.tmp vmlinux
rm -rf root
echo "$cache/vmlinux"
