#!/usr/bin/env bash
# Local real services for sensor-ingest on a Debian or Ubuntu machine without Docker.
#
#   deploy/local/services.sh install   install Mosquitto, PostgreSQL and TimescaleDB (apt; builds
#                                      TimescaleDB from Debian's source package when no binary
#                                      package exists for this PostgreSQL)
#   deploy/local/services.sh up        install, then start a private Mosquitto and a private
#                                      PostgreSQL cluster (TimescaleDB preloaded) with the project's
#                                      own config files, in $SENSOR_INGEST_SERVICES_DIR
#   deploy/local/services.sh down      stop both
#   deploy/local/services.sh status    what runs, the TimescaleDB version and its license
#   deploy/local/services.sh env       print the SENSOR_INGEST_* URLs for these services
#
# The private services never touch the system's own Mosquitto or PostgreSQL: they listen on
# 127.0.0.1 only, on their own ports, with their data under the services directory.
#
# Environment:
#   SENSOR_INGEST_SERVICES_DIR  where data, logs and pid files live   (default: <repo>/.services)
#   SENSOR_INGEST_PG_PORT       PostgreSQL port                        (default: 5433)
#   SENSOR_INGEST_MQTT_PORT     Mosquitto port                         (default: 1884)
#   SENSOR_INGEST_PG_MAJOR      PostgreSQL major version to use        (default: newest installed,
#                                                                       else the distribution's)
# Every step is idempotent: run it again and it does only what is missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${SENSOR_INGEST_SERVICES_DIR:-$repo/.services}
pg_port=${SENSOR_INGEST_PG_PORT:-5433}
mqtt_port=${SENSOR_INGEST_MQTT_PORT:-1884}
db_name=sensor_ingest

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    # Install only the packages that are missing, so a second run makes no apt call at all.
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    if [ ! -f "$state/.apt-updated" ] || [ -n "$(find "$state/.apt-updated" -mmin +60 2>/dev/null)" ]; then
        as_root apt-get update -qq
        mkdir -p "$state" && touch "$state/.apt-updated"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pg_major() {
    if [ -n "${SENSOR_INGEST_PG_MAJOR:-}" ]; then echo "$SENSOR_INGEST_PG_MAJOR"; return; fi
    local v
    v=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1 || true)
    if [ -z "$v" ]; then
        # Nothing installed yet: the distribution's default major version.
        v=$(apt-cache depends postgresql 2>/dev/null | sed -n 's/.*Depends: postgresql-\([0-9][0-9]*\)$/\1/p' | head -n 1)
    fi
    [ -n "$v" ] || die "cannot tell which PostgreSQL major version to use; set SENSOR_INGEST_PG_MAJOR"
    echo "$v"
}

pg_bin() { echo "/usr/lib/postgresql/$(pg_major)/bin"; }

timescaledb_installed() {
    local sharedir
    sharedir=$("$(pg_bin)/pg_config" --sharedir 2>/dev/null) || return 1
    [ -f "$sharedir/extension/timescaledb.control" ] && \
        ls "$("$(pg_bin)/pg_config" --pkglibdir)"/timescaledb*.so >/dev/null 2>&1
}

# The mirror URI this machine already uses for the main Debian archive (never a hard-coded host).
debian_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '
            /^[[:space:]]*$/ { if (u != "" && s ~ /(^| )[a-z]+( |$)/ && s !~ /security/) { print u; exit } u=""; s=""; next }
            tolower($1) == "uris:" { u=$2 }
            tolower($1) == "suites:" { $1=""; s=$0 }
            END { if (u != "" && s !~ /security/) print u }
        ' /etc/apt/sources.list.d/*.sources | grep -v security | head -n 1 || true)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list || true)
    fi
    [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources"
    echo "$uri"
}

build_timescaledb_from_source() {
    local major=$1 mirror src work tarball dir
    mirror=$(debian_mirror)
    log "no postgresql-$major-timescaledb package: building TimescaleDB from Debian trixie's source package (mirror $mirror)"
    apt_install build-essential cmake dpkg-dev "postgresql-server-dev-$major" libssl-dev
    # A deb-src entry only: a deb line for trixie would let apt pull trixie's libc into this system.
    src=/etc/apt/sources.list.d/sensor-ingest-trixie-src.sources
    as_root tee "$src" >/dev/null <<EOF
Types: deb-src
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    work=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'; as_root rm -f '$src'" RETURN
    as_root apt-get update -qq -o Dir::Etc::sourcelist="$src" -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0
    (cd "$work" && apt-get source --download-only -qq timescaledb) || die "apt-get source timescaledb failed"
    tarball=$(ls "$work"/timescaledb_*.orig.tar.* | head -n 1)
    [ -n "$tarball" ] || die "the timescaledb source package has no .orig tarball"
    if command -v dpkg-source >/dev/null && ls "$work"/timescaledb_*.dsc >/dev/null 2>&1; then
        (cd "$work" && dpkg-source --no-check -x timescaledb_*.dsc src >/dev/null)
        dir=$work/src
    else
        mkdir -p "$work/src" && tar -xf "$tarball" -C "$work/src" --strip-components=1
        dir=$work/src
    fi
    log "building $(basename "$tarball") against $("/usr/lib/postgresql/$major/bin/pg_config" --version)"
    (
        cd "$dir"
        cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo \
            -DPG_CONFIG="/usr/lib/postgresql/$major/bin/pg_config" \
            -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
            -DUSE_TELEMETRY=OFF -DSEND_TELEMETRY_DEFAULT=OFF >"$work/cmake.log" 2>&1 \
            || { tail -n 30 "$work/cmake.log" >&2; exit 1; }
        make -C build -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 30 "$work/make.log" >&2; exit 1; }
        as_root make -C build install >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; exit 1; }
    ) || die "TimescaleDB build failed (log above)"
}

cmd_install() {
    mkdir -p "$state"
    # One installer at a time: `make run` and `make test` may start together on a new machine.
    exec 9>"$state/.install.lock"
    flock 9
    local major
    # The Makefile's virtualenv needs venv/ensurepip, which Debian ships separately.
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then apt_install python3-venv; fi
    # openssl: the CLI makes the test PKI of tests/integration/test_mqtt_tls.py.
    apt_install mosquitto openssl
    major=$(pg_major)
    apt_install "postgresql-$major" "postgresql-client-$major"
    if ! timescaledb_installed; then
        if [ -n "$(apt-cache policy "postgresql-$major-timescaledb" 2>/dev/null | sed -n 's/.*Candidate: \(.*\)/\1/p' | grep -v none)" ]; then
            apt_install "postgresql-$major-timescaledb"
        else
            build_timescaledb_from_source "$major"
        fi
    fi
    timescaledb_installed || die "TimescaleDB is still not installed for PostgreSQL $major"
    flock -u 9
}

# PostgreSQL refuses to run as root; the private cluster then belongs to the postgres user.
run_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() { [ -f "$state/pg/postmaster.pid" ] && run_pg "$(pg_bin)/pg_ctl" -D "$state/pg" status >/dev/null 2>&1; }
mqtt_running() { [ -f "$state/mosquitto/mosquitto.pid" ] && kill -0 "$(cat "$state/mosquitto/mosquitto.pid")" 2>/dev/null; }

mosquitto_conf() {
    # The project's broker settings plus what only this instance knows: its port and data dir.
    cat "$repo/deploy/mosquitto/mosquitto.conf"
    cat <<EOF

# --- local instance (written by deploy/local/services.sh) ---
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence_location $state/mosquitto/data/
log_dest file $state/mosquitto/mosquitto.log
pid_file $state/mosquitto/mosquitto.pid
EOF
}

start_mosquitto() {
    if mqtt_running; then log "mosquitto already running on 127.0.0.1:$mqtt_port"; return; fi
    mkdir -p "$state/mosquitto/data"
    mosquitto_conf >"$state/mosquitto/mosquitto.conf"
    if [ "$(id -u)" -eq 0 ]; then
        # Started as root, mosquitto drops to the mosquitto user, which must own its files.
        chown -R mosquitto: "$state/mosquitto"
    fi
    mosquitto -d -c "$state/mosquitto/mosquitto.conf"
    for _ in $(seq 50); do mqtt_running && break; sleep 0.1; done
    mqtt_running || die "mosquitto did not start; see $state/mosquitto/mosquitto.log"
    log "mosquitto running on 127.0.0.1:$mqtt_port"
}

start_postgres() {
    local bin
    bin=$(pg_bin)
    if pg_running; then log "postgresql already running on 127.0.0.1:$pg_port"; return; fi
    mkdir -p "$state"
    if [ ! -f "$state/pg/PG_VERSION" ]; then
        mkdir -p "$state/pg"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$state/pg"
        chmod 700 "$state/pg"
        run_pg "$bin/initdb" -D "$state/pg" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
        {
            echo
            echo "# --- sensor-ingest ---"
            echo "include '$repo/deploy/postgres/postgresql.conf'"
            echo "port = $pg_port"
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$state/pg'"
        } | run_pg tee -a "$state/pg/postgresql.conf" >/dev/null
    fi
    # The included file must be readable by the postgres user.
    [ "$(id -u)" -eq 0 ] && chmod o+rx "$repo" "$repo/deploy" "$repo/deploy/postgres" 2>/dev/null || true
    run_pg "$bin/pg_ctl" -D "$state/pg" -l "$state/pg/server.log" -w -t 60 start >/dev/null \
        || die "postgresql did not start; see $state/pg/server.log"
    if ! run_pg "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -Atqc "select 1 from pg_database where datname = '$db_name'" postgres | grep -q 1; then
        run_pg "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres "$db_name"
    fi
    log "postgresql running on 127.0.0.1:$pg_port (database $db_name)"
}

cmd_up() {
    cmd_install
    start_postgres
    start_mosquitto
    cmd_env
}

cmd_down() {
    if pg_running; then run_pg "$(pg_bin)/pg_ctl" -D "$state/pg" -m fast -w stop >/dev/null; log "postgresql stopped"; fi
    if mqtt_running; then
        local pid
        pid=$(cat "$state/mosquitto/mosquitto.pid")
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        log "mosquitto stopped"
    fi
}

cmd_status() {
    local rc=0
    if mqtt_running; then echo "mosquitto:   running on 127.0.0.1:$mqtt_port (pid $(cat "$state/mosquitto/mosquitto.pid"))"
    else echo "mosquitto:   stopped"; rc=1; fi
    if pg_running; then
        echo "postgresql:  running on 127.0.0.1:$pg_port ($("$(pg_bin)/postgres" --version))"
        local q="$(pg_bin)/psql -h 127.0.0.1 -p $pg_port -U postgres -d $db_name -Atq"
        run_pg $q -c "create extension if not exists timescaledb" >/dev/null 2>&1 || true
        echo "timescaledb: $(run_pg $q -c "select extversion from pg_extension where extname = 'timescaledb'")"
        echo "license:     $(run_pg $q -c "show timescaledb.license")"
    else echo "postgresql:  stopped"; rc=1; fi
    return $rc
}

cmd_env() {
    echo "export SENSOR_INGEST_DATABASE_URL=postgresql://postgres@127.0.0.1:$pg_port/$db_name"
    echo "export SENSOR_INGEST_MQTT_URL=mqtt://127.0.0.1:$mqtt_port"
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h|--help|help|"") sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (use install, up, down, status or env)" ;;
esac
