#!/usr/bin/env bash
# Builds a local stand-in for the Dockerfile's pinned base image (python:3.11.13-slim-bookworm) from Debian's own
# packages, for machines that reach Debian's apt repositories and PyPI but no Docker image registry (the image
# test, tests/deploy/test_image.py, runs on such machines).
#
#   deploy/docker/base-image.sh            # tag: the Dockerfile's base image
#   deploy/docker/base-image.sh my:tag     # another tag
#
# What it makes: a minimal Debian bookworm root file system (debootstrap --variant=minbase) with python3.11 and
# its venv module, imported with `docker import` under the pinned tag. Like the official image it has python3.11,
# python3 and python in /usr/local/bin (here symlinks to Debian's /usr/bin/python3.11, so a venv made with it
# refers to /usr/local/bin as the Dockerfile's runtime stage expects) and /usr/local/bin first on PATH; unlike it,
# it has no pip outside a venv and Debian's Python 3.11 patch release, not 3.11.13. The machine's CA bundle and
# its pip index settings are copied in, so that `pip install` in the Docker build reaches the same index.
#
# Idempotent: does nothing when the tag exists (`docker rmi <tag>` to rebuild). Needs root for debootstrap (sudo
# otherwise) and a running Docker engine. Environment: DEBIAN_MIRROR overrides the apt mirror (default: the one
# of this machine's bookworm entry in /etc/apt/sources.list(.d)), DOCKER the docker client.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
docker="${DOCKER:-docker}"
suite=bookworm

# The tag: the first stage's base image, so that the stand-in follows the Dockerfile's pin.
tag="${1:-$(awk 'toupper($1) == "FROM" { print $2; exit }' "$repo/Dockerfile")}"
if [ -z "$tag" ]; then
    echo "base-image.sh: no FROM line in $repo/Dockerfile" >&2
    exit 2
fi
if "$docker" image inspect "$tag" >/dev/null 2>&1; then
    echo "base-image.sh: $tag exists, nothing to do"
    exit 0
fi

if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
PATH="$PATH:/usr/sbin:/sbin"
command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap is missing (make system-deps)" >&2; exit 2; }

# The apt mirror this machine uses for Debian itself (one-line and deb822 formats), not security or extra repos.
mirror_of_this_machine() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -E 's/\[[^]]*\]//' "$f" | awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # One stanza per paragraph: print the first URI of a stanza whose Suites include the bare suite.
        awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; hit = 0; deb = 0
              for (i = 1; i <= NF; i++) {
                  if ($i ~ /^URIs:/) { split($i, w, " "); uri = w[2] }
                  if ($i ~ /^Suites:/) { n = split($i, w, " "); for (j = 2; j <= n; j++) if (w[j] == s) hit = 1 }
                  if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
                  if ($i ~ /^Enabled:[ \t]*no/) hit = 0 }
              if (hit && deb && uri != "") { print uri; exit } }' "$f"
    done
}
mirror="${DEBIAN_MIRROR:-$(mirror_of_this_machine | head -n 1 || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"

work="$(mktemp -d "${TMPDIR:-/var/tmp}/genserve-base.XXXXXX")"
rootfs="$work/rootfs"
cleanup() {
    # debootstrap mounts /proc and /sys in the target and may leave them mounted when it fails.
    awk -v r="$rootfs/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        $sudo umount -l "$m" || true
    done
    $sudo rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "base-image.sh: debootstrap $suite from $mirror"
# minbase: essential and apt only. python3.11-venv brings python3.11 and the pip and setuptools wheels that
# ensurepip installs; it depends on the virtual python3.11-distutils, which debootstrap does not resolve itself.
$sudo debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils \
    "$suite" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 40 "$work/debootstrap.log" >&2; exit 1; }

# Where the official image has its Python.
for name in python3.11 python3 python; do
    $sudo ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/$name"
done

# This machine's CA bundle (it may hold a proxy's CA) and pip index settings, so pip in the build reaches the
# same index. Local paths and file: URLs (wheel directories on this disk) are left out: the build cannot see them.
$sudo mkdir -p "$rootfs/etc/ssl/certs"
$sudo cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
python3 - >"$work/pip.conf" <<'EOF'
import re
import subprocess
import sys

keys = ("index-url", "extra-index-url", "trusted-host", "find-links", "timeout", "default-timeout")
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in listed.splitlines():                    # files first, then the environment: later ones win
    m = re.fullmatch(r"[^.]*\.([\w-]+)='(.*)'", line.strip())
    if m and m.group(1) in keys:
        settings[m.group(1)] = m.group(2)
print("[global]\ncert = /etc/ssl/certs/ca-certificates.crt")
for key, value in settings.items():
    if key in ("index-url", "extra-index-url", "find-links"):
        value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
    if value:
        print(f"{key} = {value}")
EOF
$sudo cp "$work/pip.conf" "$rootfs/etc/pip.conf"

# Nothing the image needs: downloaded packages, package lists, documentation.
$sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

echo "base-image.sh: importing as $tag"
$sudo tar -C "$rootfs" --numeric-owner -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
"$docker" image inspect --format 'base-image.sh: {{.RepoTags}} {{.Size}} bytes' "$tag"
