#!/bin/sh
# A stand-in for python:3.11-slim-bookworm, for machines that reach no container registry.
#
#   standin-base.sh TARBALL
#
# Builds a minimal Debian bookworm root file system with Python 3.11, venv, pip and CA
# certificates, from this machine's own apt sources (so an apt mirror or proxy the host uses
# serves it too), trimmed of documentation, man pages and locales, and writes it to TARBALL.
# Import it under the name the Dockerfile expects, then build as usual:
#
#   podman import TARBALL localhost/python:3.11-slim-bookworm
#   podman build --build-arg PYTHON_IMAGE=localhost/python:3.11-slim-bookworm ...
#
# It behaves like the official image where flame's install steps care: `python` and
# `python3` on PATH, pip usable as root (Debian's PEP 668 marker removed, as the official
# image has none), useradd/groupadd present. Needs mmdebstrap (Debian package) and root or
# user namespaces. Takes about a minute.
set -eu

out="${1:-}"
if [ -z "$out" ]; then
    echo "usage: standin-base.sh TARBALL" >&2
    exit 2
fi
command -v mmdebstrap >/dev/null 2>&1 || {
    echo "standin-base.sh: mmdebstrap is not installed (apt-get install mmdebstrap)" >&2
    exit 1
}

# the host's apt sources: deb822 files and one-line lists, in apt's own order
set --
for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$file" ] && set -- "$@" "$file"
done

tmp="$out.partial.tar"
mmdebstrap --quiet --variant=minbase --mode=auto \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf python3 "$1"/usr/bin/python' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$tmp" "$@"
mv "$tmp" "$out"
