#!/usr/bin/env bash
# Fuzz one input parser with libFuzzer for a given time:
#
#   scripts/fuzz.sh patch_parse|package_read|object_diff SECONDS
#
# patch_parse: patch text into the patch parser and applier; package_read:
# bytes into the package reader; object_diff: two ELF objects into the diff
# stage. Seeds are made afresh each run (the example patches, a small
# package, two small objects); the corpus grows in fuzz/corpus/TARGET and
# inputs that crash are saved in fuzz/artifacts/TARGET. Needs cargo-fuzz
# (scripts/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: scripts/fuzz.sh patch_parse|package_read|object_diff SECONDS" >&2
    exit 1
}
[ $# -eq 2 ] || usage
target=$1
seconds=$2
case "$target" in
    patch_parse | package_read | object_diff) ;;
    *) usage ;;
esac
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || usage
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: cargo-fuzz is not installed: run scripts/install-deps.sh (or cargo install --locked cargo-fuzz)" >&2
    exit 1
fi

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
# A postcard string or byte string: its length as one varint byte, then it.
field() { printf '%b%s' "\\x$(printf %02x ${#1})" "$1"; }
case "$target" in
    patch_parse)
        cp patches/*.diff "$seeds/"
        ;;
    package_read)
        # The contents of a small package (the target signs them itself):
        # one replaced function with its run-pre code, one external symbol.
        {
            field fix; field dynamos_fix; field 0.1.0
            field 6.1.0-57-amd64; printf '\x00\x00'          # target: no Debian version, no build-id
            printf '\x01'; field fix.diff; field 00           # patches
            printf '\x01'; field vmlinux                      # objects: vmlinux
            printf '\x01'; field cmdline_proc_show; printf '\x00'; field fs/proc/cmdline.c; field __dynamos_v2_0
            printf '\x00'                                     # added
            printf '\x01'; field __dynamos_ext_0; field saved_command_line; printf '\x01\x00\x01'
            printf '\x00\x00'                                 # files, load_time
            printf '\x01'; field cmdline_proc_show; field fs/proc/cmdline.c
            printf '\x06\xe8\x00\x00\x00\x00\xc3'             # code bytes
            printf '\x01\x01\x04'                             # masked: offset 1, len 4
            printf '\x01\x01\x03'; field seq_printf; printf '\x07'   # PC32 reloc, addend -4
            printf '\x00'                                     # replaces
            printf '\x03\x01\x02\x03'                         # module
        } >"$seeds/package"
        ;;
    object_diff)
        # Objects built as kernel objects are, each pair prefixed by the
        # length of its first object (two bytes, little-endian).
        flags=(-O2 -c -ffunction-sections -fdata-sections -mcmodel=kernel -fno-pic
               -pg -mfentry -mrecord-mcount -fno-asynchronous-unwind-tables)
        for side in orig patched; do
            cc "${flags[@]}" -o "$seeds/$side.o" "fuzz/seeds/object_$side.c"
        done
        pair() {
            local size
            size=$(stat -c %s "$seeds/$1.o")
            printf '%b' "\\x$(printf %02x $((size & 255)))\\x$(printf %02x $((size >> 8)))"
            cat "$seeds/$1.o" "$seeds/$2.o"
        }
        pair orig patched >"$seeds/orig-patched"
        pair patched orig >"$seeds/patched-orig"
        pair orig orig >"$seeds/orig-orig"
        rm "$seeds"/*.o
        ;;
esac

corpus=fuzz/corpus/$target
mkdir -p "$corpus"
# cargo-fuzz passes -Z flags to rustc; the stable toolchain accepts them
# with RUSTC_BOOTSTRAP=1. Safe Rust needs no address sanitizer; debug
# assertions turn arithmetic overflow into a crash.
RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --debug-assertions "$target" \
    "$corpus" "$seeds" -- -max_total_time="$seconds"
