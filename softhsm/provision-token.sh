#!/bin/sh
# Create a SoftHSM2 token in its own directory, for development, CI and small deployments.
#
# usage: provision-token.sh DIR LABEL SO_PIN USER_PIN
#
# Writes DIR/softhsm2.conf (from softhsm2.conf.template) and DIR/tokens/, initialises a token
# labelled LABEL there, and prints the line that points the library at it:
#     export SOFTHSM2_CONF=DIR/softhsm2.conf
# Only that line goes to stdout, so `eval "$(provision-token.sh ...)"` works.
# The PINs are passed on softhsm2-util's command line: fine on a build machine, but on a shared
# host anyone running `ps` can see them, so provision production tokens interactively instead.
set -eu

if [ "$#" -ne 4 ]; then
    echo "usage: $0 DIR LABEL SO_PIN USER_PIN" >&2
    exit 2
fi
dir=$1 label=$2 so_pin=$3 user_pin=$4

if ! command -v softhsm2-util >/dev/null 2>&1; then
    echo "$0: softhsm2-util not found; install SoftHSM2 (apt-get install softhsm2)" >&2
    exit 1
fi

here=$(cd "$(dirname "$0")" && pwd)
umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf="$dir/softhsm2.conf"
if [ -e "$conf" ]; then
    echo "$0: $conf already exists; refusing to overwrite it" >&2
    exit 1
fi
# '|' as the sed delimiter: the directory may contain '/' but not a newline or '|'.
case $dir in *'|'*) echo "$0: DIR must not contain '|'" >&2; exit 2 ;; esac
sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.template" >"$conf"

SOFTHSM2_CONF=$conf softhsm2-util --init-token --free --label "$label" \
    --so-pin "$so_pin" --pin "$user_pin" >&2

echo "export SOFTHSM2_CONF=$conf"
