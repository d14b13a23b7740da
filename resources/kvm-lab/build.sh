#!/usr/bin/env bash
# Builds the kvm-lab image: a nested host ("L1") that QEMU's TCG runs with
# AMD SVM and nested paging, whose Debian kernel loads kvm_amd, so cgsvmm
# runs inside on an ordinary SVM KVM. See README.md beside this script.
#
#   resources/kvm-lab/build.sh [--no-install]
#
# CGSVMM_BIN=PATH packs that cgsvmm instead of building one (to try an
# older build in the lab).
#
# Installs what is missing from Debian's packages (QEMU >= 10 and the
# kernel >= 6.12 from the backports suite, which it adds to the Suites of
# the machine's existing Debian source), builds the release cgsvmm and the
# static lab tools (tools/), and packs into $LAB_DIR (default target/kvm-lab):
#   vmlinuz     L1's kernel (Debian's), also the Linux guest's bzImage
#   l1.cpio     L1's initramfs: busybox, the KVM modules, cgsvmm with its
#               libraries, the scenarios, and the Linux guest (bzImage,
#               vmlinux ELF, initramfs with the checker), Debian's OVMF
#   stamp       a hash of every input: a second build with nothing changed
#               packs nothing
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
lab="${LAB_DIR:-$target/kvm-lab}"
install=1
[ "${1:-}" = "--no-install" ] && install=0

say() { echo "kvm-lab: $*" >&2; }
die() { say "error: $*"; exit 1; }

# The major version of the installed QEMU, 0 if none.
qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p' | head -n1 | grep . || echo 0
}

# Adds "<suite>-backports" to the Suites of the existing Debian source
# (deb822 or one-line format), once.
add_backports() {
    local codename
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || die "cannot tell the Debian release (/etc/os-release)"
    if grep -rqsE "^[^#]*${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # The stanza whose Suites name the release itself (not -security).
        local suite="^Suites:(.*[[:space:]]${codename}([[:space:]].*)?)$"
        if grep -qE "$suite" "$f" && grep -qE "^URIs:.*debian/?$" "$f"; then
            sed -i -E "0,/${suite}/s//Suites:\1 ${codename}-backports/" "$f"
            say "added ${codename}-backports to $f"
            return
        fi
    done
    if [ -f /etc/apt/sources.list ]; then
        local line
        line="$(grep -E "^deb [^ ]+/debian/? ${codename} " /etc/apt/sources.list | head -n1)"
        if [ -n "$line" ]; then
            echo "${line/ ${codename} / ${codename}-backports }" >>/etc/apt/sources.list
            say "added ${codename}-backports to /etc/apt/sources.list"
            return
        fi
    fi
    die "found no Debian source for ${codename} to add ${codename}-backports to"
}

install_packages() {
    local need=()
    [ "$(qemu_major)" -ge 10 ] || need+=(qemu)
    command -v busybox >/dev/null && file -L "$(command -v busybox)" 2>/dev/null | grep -q static || need+=(busybox-static)
    [ -f /usr/share/ovmf/OVMF.fd ] || need+=(ovmf)
    for tool in cpio zstd xz objcopy file; do command -v "$tool" >/dev/null || need+=("$tool"); done
    [ ${#need[@]} -eq 0 ] && return
    [ "$install" -eq 1 ] || die "missing ${need[*]} (run without --no-install, as root)"
    [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}: run as root to install them"
    say "installing: ${need[*]}"
    add_backports
    local codename
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    apt-get update -q >/dev/null
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends busybox-static ovmf cpio zstd xz-utils binutils file >/dev/null
    apt-get install -y -q --no-install-recommends -t "${codename}-backports" qemu-system-x86 >/dev/null
    [ "$(qemu_major)" -ge 10 ] || die "QEMU >= 10 is needed, $(qemu-system-x86_64 --version | head -n1) is installed"
}

# Debian's kernel >= 6.12 from the backports suite, unpacked into $lab/kernel.
fetch_kernel() {
    local codename debs meta pkg
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    debs="$lab/debs"
    mkdir -p "$debs"
    if ! ls "$debs"/linux-image-6.*-amd64_*.deb >/dev/null 2>&1; then
        [ "$install" -eq 1 ] || die "no kernel package in $debs (run without --no-install)"
        command -v apt-get >/dev/null || die "apt-get is needed to fetch the kernel"
        if ! apt-cache policy linux-image-amd64 | grep -q "${codename}-backports"; then
            [ "$(id -u)" -eq 0 ] || die "the ${codename}-backports suite is missing: run as root to add it"
        fi
        if ! apt-cache policy linux-image-amd64 | grep -q "${codename}-backports"; then
            add_backports
            apt-get update -q >/dev/null
        fi
        # The meta package names the versioned one.
        pkg="$(apt-cache depends -t "${codename}-backports" linux-image-amd64 |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)"
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 in ${codename}-backports"
        say "downloading $pkg"
        (cd "$debs" && apt-get download -q -t "${codename}-backports" "$pkg" 2>/dev/null) ||
            die "apt-get download $pkg failed"
    fi
    meta="$(ls "$debs"/linux-image-6.*-amd64_*.deb | sort -V | tail -n1)"
    local version
    version="$(dpkg-deb -f "$meta" Version)"
    dpkg --compare-versions "$version" ge 6.12 || die "kernel $version is older than 6.12"
    if [ ! -f "$lab/kernel/.from" ] || [ "$(cat "$lab/kernel/.from")" != "$(basename "$meta")" ]; then
        rm -rf "$lab/kernel"
        mkdir -p "$lab/kernel"
        dpkg-deb -x "$meta" "$lab/kernel"
        basename "$meta" >"$lab/kernel/.from"
    fi
}

# The uncompressed ELF vmlinux inside a bzImage (its setup header names the
# payload: offset at 0x248, length at 0x24c, after the setup sectors).
extract_vmlinux() {
    local bz="$1" out="$2" setup_sects offset length
    setup_sects=$(od -An -tu1 -j 0x1f1 -N1 "$bz" | tr -d ' ')
    [ "$setup_sects" -eq 0 ] && setup_sects=4
    offset=$(od -An -tu4 -j 0x248 -N4 "$bz" | tr -d ' ')
    length=$(od -An -tu4 -j 0x24c -N4 "$bz" | tr -d ' ')
    tail -c +$(((setup_sects + 1) * 512 + offset + 1)) "$bz" | head -c "$length" | zstd -dq >"$out" 2>/dev/null || true
    file "$out" | grep -q "ELF 64-bit" || die "no ELF vmlinux inside $bz"
}

build_binaries() {
    say "building the release cgsvmm and the lab checker"
    [ -n "${CGSVMM_BIN:-}" ] || (cd "$root" && cargo build --release -q -p cgsvmm)
    # Static, so the guest's initramfs needs no libraries; an explicit
    # --target keeps RUSTFLAGS away from build scripts.
    (cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -q -p cgsvmm-kvm-lab-tools --target x86_64-unknown-linux-gnu)
}

# Copies a dynamically linked binary and the libraries ldd names into $2.
copy_with_libs() {
    local bin="$1" dest="$2" name="$3" lib
    install -D -m 0755 "$bin" "$dest/usr/bin/$name"
    strip "$dest/usr/bin/$name"
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        install -D -m 0755 "$lib" "$dest$lib"
    done
}

# A newc cpio of directory $1 into $2.
pack() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$2"
}

main() {
    install_packages
    fetch_kernel
    build_binaries
    local kdir vmlinuz kver cgsvmm checker
    kdir="$lab/kernel"
    vmlinuz="$(ls "$kdir"/boot/vmlinuz-* | head -n1)"
    kver="${vmlinuz##*/vmlinuz-}"
    cgsvmm="${CGSVMM_BIN:-$target/release/cgsvmm}"
    checker="$target/x86_64-unknown-linux-gnu/release/lab-checker"
    proxy="$target/x86_64-unknown-linux-gnu/release/lab-proxy"

    local stamp
    stamp="$(
        {
            sha256sum "$vmlinuz" "$cgsvmm" "$checker" "$proxy" "$(command -v busybox)" /usr/share/ovmf/OVMF.fd
            find "$here/l1" "$here/guest" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
            sha256sum "$0"
        } | sha256sum | cut -d' ' -f1
    )"
    if [ -f "$lab/stamp" ] && [ "$(cat "$lab/stamp")" = "$stamp" ] && [ -f "$lab/l1.cpio" ]; then
        say "image up to date ($lab)"
        return
    fi

    work="$(mktemp -d "$lab/work.XXXXXX")"
    trap 'rm -rf "$work"' EXIT

    # The Linux guest's initramfs: busybox, the checker, an init.
    local g="$work/guest"
    mkdir -p "$g"/{bin,dev,proc,sys,tmp}
    cp "$(command -v busybox)" "$g/bin/busybox"
    ln -s busybox "$g/bin/sh"
    install -m 0755 "$checker" "$g/bin/lab-checker"
    install -m 0755 "$here/guest/init" "$g/init"

    # L1's initramfs.
    local r="$work/l1"
    mkdir -p "$r"/{bin,sbin,dev,proc,sys,tmp,run,lab/guest,lib/modules}
    cp "$(command -v busybox)" "$r/bin/busybox"
    ln -s busybox "$r/bin/sh"
    install -m 0755 "$here/l1/init" "$r/init"
    cp -r "$here/l1/lib.sh" "$here/l1/run-one.sh" "$here/l1/scenarios" "$r/lab/"
    local m
    for m in virt/lib/irqbypass arch/x86/kvm/kvm drivers/crypto/ccp/ccp arch/x86/kvm/kvm-amd; do
        xz -dc "$kdir/lib/modules/$kver/kernel/$m.ko.xz" >"$r/lib/modules/$(basename "$m").ko"
    done
    copy_with_libs "$cgsvmm" "$r" cgsvmm
    install -m 0755 "$proxy" "$r/bin/lab-proxy"
    cp "$vmlinuz" "$r/lab/guest/bzImage"
    extract_vmlinux "$vmlinuz" "$r/lab/guest/vmlinux"
    # The same kernel without its PVH note: the plain 64-bit ELF entry.
    objcopy --remove-section=.notes --remove-section='.note.*' "$r/lab/guest/vmlinux" "$r/lab/guest/vmlinux-nopvh"
    pack "$g" "$r/lab/guest/initrd.cpio"
    gzip -1 "$r/lab/guest/initrd.cpio"
    install -D -m 0644 /usr/share/ovmf/OVMF.fd "$r/usr/share/ovmf/OVMF.fd"

    pack "$r" "$lab/l1.cpio.tmp"
    mv "$lab/l1.cpio.tmp" "$lab/l1.cpio"
    cp "$vmlinuz" "$lab/vmlinuz"
    echo "$stamp" >"$lab/stamp"
    say "image in $lab ($(du -h "$lab/l1.cpio" | cut -f1) initramfs, kernel $kver)"
}

mkdir -p "$lab"
main
