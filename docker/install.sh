#!/bin/sh
# The install steps of flame's container image, in one place: the Dockerfile runs this
# script, and so does tests/test_container.py, so the smoke test installs what the image does.
#
#   install.sh wheel OUT_DIR      in a copy of the source: build flame's wheel into OUT_DIR
#   install.sh install WHEEL_DIR  install that wheel with its dependencies, the entry point,
#                                 the runtime user and /app; then self-test the result
#
# The image keeps this script as `flame-install`, for the analysis image's Dockerfile (the
# one `flame init` writes):
#   flame-install requirements FILE   pip-install an analysis's requirements.txt, with
#                                     --require-hashes when it holds hashes; nothing if empty
#   flame-install code DIR SHA256     load the analysis in DIR and check that SHA256 is its
#                                     code's hash (`flame hash DIR`: what nodes approve and
#                                     the run's manifest records)
#
# Knobs (environment; the defaults are the image's):
#   FLAME_INSTALL_PYTHON   the interpreter to install into                   (python3)
#   FLAME_INSTALL_APP_DIR  where the analysis code goes                      (/app)
#   FLAME_INSTALL_UID      uid/gid of the runtime user "flame"; empty creates no user
#                          (the smoke test runs outside a container and sets it empty)  (10001)
#   FLAME_INSTALL_EXTRAS   flame's extras for the node runtime: `sql` because a data holder's
#                          SQL source is the node's concern, not the analysis's; what analyze
#                          itself uses (opendp, pandas, duckdb) goes in its requirements.txt (sql)
set -eu

mode="${1:-}"
target="${2:-}"
python="${FLAME_INSTALL_PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"

usage() {
    echo "usage: install.sh wheel OUT_DIR | install WHEEL_DIR | requirements FILE |" \
        "code DIR SHA256" >&2
    exit 2
}

[ -n "$target" ] || usage

case "$mode" in
wheel)
    "$python" -m pip wheel --no-deps --no-cache-dir --wheel-dir "$target" .
    (cd "$target" && sha256sum flame-*.whl >SHA256SUMS)
    ;;
install)
    set -- "$target"/flame-*.whl
    if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
        echo "install.sh: expected exactly one flame wheel in $target" >&2
        exit 1
    fi
    if [ -f "$target/SHA256SUMS" ]; then
        (cd "$target" && sha256sum -c --quiet SHA256SUMS)
    fi
    extras="${FLAME_INSTALL_EXTRAS-sql}"
    wheel="$1"
    [ -z "$extras" ] || wheel="$1[$extras]"
    "$python" -m pip install --no-cache-dir --no-warn-script-location "$wheel"
    bindir="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    cp "$here/entrypoint" "$bindir/flame-entrypoint"
    cp "$here/install.sh" "$bindir/flame-install"
    chmod 0755 "$bindir/flame-entrypoint" "$bindir/flame-install"

    uid="${FLAME_INSTALL_UID-10001}"
    if [ -n "$uid" ]; then
        groupadd --system --gid "$uid" flame
        useradd --system --uid "$uid" --gid "$uid" --home-dir /home/flame --create-home \
            --shell /usr/sbin/nologin flame
    fi
    # The analysis code belongs to root: the node's process may read it, never change it.
    mkdir -p "${FLAME_INSTALL_APP_DIR:-/app}"

    # Self-test, so a broken image fails its build instead of its first run: every module a
    # node run needs imports, and the packaged templates run as a local simulation.
    "$python" -c "import flame.main, flame.transport.mqtt, flame.clients.minio_client, \
flame.clients.data_api_client, flame.ops.check, flame.ops.status"
    case ",$extras," in *,sql,*) "$python" -c "import psycopg" ;; esac
    scratch="$(mktemp -d)"
    "$bindir/flame" init "$scratch/analysis"
    "$bindir/flame" simulate "$scratch/analysis" --data "$scratch/analysis/data" --quiet >/dev/null
    rm -rf "$scratch"
    ;;
requirements)
    if ! grep -qvE '^[[:space:]]*(#|$)' "$target"; then
        echo "install.sh: $target names no packages; nothing to install"
        exit 0
    fi
    set -- --no-cache-dir --no-warn-script-location -r "$target"
    if grep -qE -- '--hash[=[:space:]]' "$target"; then
        set -- --require-hashes "$@"
    fi
    "$python" -m pip install "$@"
    # the analysis's packages must leave flame and its dependencies working
    "$python" -m pip check
    "$python" -c "import flame.main, flame.transport.mqtt"
    ;;
code)
    expected="${3:-}"
    # the analysis must load here (its imports resolve), or the build fails, not its first run
    # (no bytecode written: a __pycache__ in the code folder is refused by `flame hash`)
    PYTHONDONTWRITEBYTECODE=1 "$python" -c "import sys; from pathlib import Path; \
from flame.analysis.loader import load_analysis; load_analysis(Path(sys.argv[1]))" "$target"
    actual="$("$python" -m flame hash "$target")"
    hint="build with --build-arg FLAME_CODE_SHA256=\"\$(flame hash .)\""
    if [ -z "$expected" ]; then
        echo "install.sh: no FLAME_CODE_SHA256 given; $hint (the code in $target has $actual)" >&2
        exit 1
    fi
    if [ "$expected" != "$actual" ]; then
        echo "install.sh: FLAME_CODE_SHA256 $expected is not the hash of the code in" \
            "$target ($actual); $hint" >&2
        exit 1
    fi
    echo "analysis code in $target: sha256 $actual"
    ;;
*)
    usage
    ;;
esac
