#!/usr/bin/env bash
# Fetches the guest images the hardware end-to-end tests boot (a Debian
# cloud kernel and OVMF) from Debian's package archive into
# resources/images/. Only hosts with native ring 0 (VMX/SVM) can boot them;
# on the PVM lab host the tests skip with a printed reason whether or not
# the images are here.
set -euo pipefail
dest="$(cd "$(dirname "$0")" && pwd)/images"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"
cd "$work"
apt-get download ovmf linux-image-cloud-amd64 >/dev/null
# The meta package names the real kernel package.
kernel_pkg="$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[^ ]*-cloud-amd64' | head -n1)"
apt-get download "$kernel_pkg" >/dev/null
for deb in ovmf_*.deb "$kernel_pkg"_*.deb; do dpkg-deb -x "$deb" root; done
cp root/usr/share/ovmf/OVMF.fd "$dest/OVMF.fd"
cp root/boot/vmlinuz-* "$dest/vmlinuz"
echo "images in $dest:"
ls -l "$dest"
