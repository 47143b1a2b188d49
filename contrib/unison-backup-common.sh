# shellcheck shell=bash
# unison-backup-common.sh -- helpers shared by unison-backup.sh and unison-wal-archive.sh.
# Not a command: both scripts source it from their own directory (symlinks to them are
# resolved), so install it next to them, e.g. /usr/local/bin/unison-backup-common.sh,
# mode 0644 (see contrib/README.md).
#
# The calling script sets `set -euo pipefail` and `shopt -s inherit_errexit`, and these
# variables before it calls the functions that use them:
#   PROG                          name in log lines and in the lock file name
#   NAMESPACE DATA_DIR STATE_DIR  settings (check_base_settings checks them)
#   UPLOAD_CMD CURL_MAX_TIME UNISON_URL
#   UNISON_TOKEN_FILE             optional: a file whose first word is the server's bearer
#                                 token (role admin: the backup endpoints need it)
#   STATE_FILE                    the script's state file (state_get, state_merge)
# and these are set here: UPLOAD_ARGV (setup_upload), BACKUP_ROOT and ROOT_REAL
# (setup_backup_root). Exit status as the scripts' headers document: the setting and
# tool checks exit 2, take_lock exits 75 when another run holds the lock, die exits 1;
# the other helpers return 1 on failure.

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  printf '%s: a library for unison-backup.sh and unison-wal-archive.sh; not to be run\n' "$0" >&2
  exit 2
fi

log() { printf '%s: %s\n' "$PROG" "$*"; }
err() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; }
die() { err "$*"; exit 1; }
config_error() { err "$*"; exit 2; }

# --- settings, tools, lock ------------------------------------------------------------

# check_base_settings: NAMESPACE, DATA_DIR and STATE_DIR, or exit 2; also reads the
# bearer token from UNISON_TOKEN_FILE (if set) into AUTH_TOKEN.
check_base_settings() {
  AUTH_TOKEN=
  if [[ -n ${UNISON_TOKEN_FILE:-} ]]; then
    [[ -r $UNISON_TOKEN_FILE ]] || config_error "UNISON_TOKEN_FILE '$UNISON_TOKEN_FILE' is not a readable file"
    # The first word of the first line that is not blank or a comment; a server-side
    # '<token> <role>' line works as well.
    AUTH_TOKEN=$(awk '!/^[[:space:]]*(#|$)/ { print $1; exit }' "$UNISON_TOKEN_FILE")
    [[ $AUTH_TOKEN =~ ^[A-Za-z0-9._~+/-]+=*$ ]] ||
      config_error "UNISON_TOKEN_FILE '$UNISON_TOKEN_FILE' holds no token (A-Z a-z 0-9 - . _ ~ + / =)"
  fi
  [[ $NAMESPACE =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ && $NAMESPACE != backups ]] ||
    config_error "NAMESPACE '$NAMESPACE' is not a valid namespace name"
  [[ $DATA_DIR == /* ]] || config_error "DATA_DIR must be an absolute path, got '$DATA_DIR'"
  [[ $STATE_DIR == /* ]] || config_error "STATE_DIR must be an absolute path, got '$STATE_DIR'"
}

# check_whole_numbers VAR...: each named variable holds a whole number, or exit 2.
check_whole_numbers() {
  local v
  for v in "$@"; do
    [[ ${!v} =~ ^[0-9]+$ ]] || config_error "$v must be a whole number, got '${!v}'"
  done
}

# require_tools TOOL...: each tool is installed, or exit 2.
require_tools() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || config_error "required tool '$tool' is not installed"
  done
}

# setup_upload: split UPLOAD_CMD into UPLOAD_ARGV (empty: no upload), or exit 2.
setup_upload() {
  UPLOAD_ARGV=()
  if [[ -n $UPLOAD_CMD ]]; then
    read -r -a UPLOAD_ARGV <<<"$UPLOAD_CMD"
    command -v "${UPLOAD_ARGV[0]}" >/dev/null ||
      config_error "UPLOAD_CMD: '${UPLOAD_ARGV[0]}' is not an executable command"
  fi
}

# setup_backup_root: set BACKUP_ROOT and ROOT_REAL (symlinks resolved), or exit 2.
setup_backup_root() {
  BACKUP_ROOT="$DATA_DIR/backups/$NAMESPACE"
  ROOT_REAL=$(realpath -m -- "$BACKUP_ROOT")
  # Everything the scripts delete or rewrite must resolve to a path below ROOT_REAL.
  [[ $ROOT_REAL == /*/* ]] || config_error "backup root '$ROOT_REAL' is too close to /"
}

# take_lock: hold $STATE_DIR/$PROG-$NAMESPACE.lock on fd 9 until the script exits, or
# exit 75 when another run holds it.
take_lock() {
  mkdir -p -- "$STATE_DIR"
  exec 9>"$STATE_DIR/$PROG-$NAMESPACE.lock"
  if ! flock -n 9; then
    err "another $PROG run for namespace '$NAMESPACE' is still going; not starting a second"
    exit 75
  fi
}

# --- helpers --------------------------------------------------------------------------

# under_root PATH: true if PATH (symlinks resolved) is strictly inside the backup root.
under_root() {
  local p
  p=$(realpath -m -- "$1")
  [[ $p == "$ROOT_REAL"/* ]]
}

# curl_auth_config: a curl config sending the bearer token, if there is one. Given to
# curl through a pipe (-K <(...)), so the token never appears in the process list.
curl_auth_config() {
  if [[ -n ${AUTH_TOKEN:-} ]]; then
    printf 'header = "Authorization: Bearer %s"\n' "$AUTH_TOKEN"
  fi
}

# api ROUTE JSON: POST to /api/v1/$NAMESPACE/ROUTE, print the response body.
api() {
  local route=$1 body=$2 out rc=0 msg
  out=$(curl -K <(curl_auth_config) -sS --fail-with-body --connect-timeout 10 --max-time "$CURL_MAX_TIME" \
    -X POST -H 'Content-Type: application/json' --data-binary "$body" \
    "$UNISON_URL/api/v1/$NAMESPACE/$route") || rc=$?
  if ((rc != 0)); then
    msg=$(jq -r '.error // empty' <<<"$out" 2>/dev/null) || msg=
    err "POST $UNISON_URL/api/v1/$NAMESPACE/$route failed (curl exit $rc): ${msg:-${out:-no response}}"
    return 1
  fi
  if ! jq -e 'type == "object"' <<<"$out" >/dev/null 2>&1; then
    err "POST $route: response is not a JSON object: $out"
    return 1
  fi
  printf '%s\n' "$out"
}

# verify FILE: FILE is inside the backup root and matches its FILE.sha256 sidecar.
verify() {
  local f=$1 dir base name
  under_root "$f" || { err "'$f' is outside the backup root $ROOT_REAL (is DATA_DIR the server's --data-dir?)"; return 1; }
  [[ -f $f && ! -L $f ]] || { err "backup file '$f' is missing"; return 1; }
  [[ -f $f.sha256 ]] || { err "checksum sidecar '$f.sha256' is missing"; return 1; }
  dir=$(dirname -- "$f")
  base=$(basename -- "$f")
  # The sidecar must name this very file, or `sha256sum -c` would check another one.
  read -r _ name <"$f.sha256" || true
  name=${name#\*}
  [[ ${name##*/} == "$base" ]] || { err "'$f.sha256' names '$name', not '$base'"; return 1; }
  (cd -- "$dir" && sha256sum --strict --quiet -c -- "$base.sha256") ||
    { err "checksum mismatch: $f"; return 1; }
}

# partial FILE: the name FILE is written under until it is complete and renamed into
# place: hidden, next to FILE (so the rename is atomic), and NOT *.tmp — the server
# deletes every *.tmp under the backup root when it starts, which would pull a file from
# under a running job. Only these scripts write it, one run at a time (take_lock).
partial() { printf '%s/.%s.partial\n' "$(dirname -- "$1")" "$(basename -- "$1")"; }

# remove_partials DIR: delete what a killed run left in DIR itself (not below it: the
# other script, under its own lock, writes in its own directory). Call with the lock held.
remove_partials() {
  [[ -d $1 ]] || return 0
  find "$1" -maxdepth 1 -type f -name '.*.partial' -delete
}

# sidecar FILE: write FILE.sha256 (sha256sum format, file name relative to its directory).
sidecar() {
  local dir base part
  dir=$(dirname -- "$1")
  base=$(basename -- "$1")
  part=$(basename -- "$(partial "$1.sha256")")
  (cd -- "$dir" && sha256sum -- "$base" >"$part" && mv -f -- "$part" "$base.sha256")
}

# upload FILE...: hand each file to UPLOAD_CMD (no-op when it is empty).
upload() {
  local f key
  ((${#UPLOAD_ARGV[@]})) || return 0
  for f in "$@"; do
    key=$(realpath -m -- "$f")
    key=${key#"$ROOT_REAL"/}
    "${UPLOAD_ARGV[@]}" "$f" "$key" || { err "upload of $f failed ($UPLOAD_CMD)"; return 1; }
    log "uploaded $key"
  done
}

# state_get JQ_FILTER: read from the state file; a missing or empty file reads as {}.
state_get() {
  [[ -s $STATE_FILE ]] || { jq -nr "{} | $1"; return; }
  jq -r "$1" "$STATE_FILE" || { err "state file $STATE_FILE is not valid JSON; fix or delete it"; return 1; }
}

# state_merge JSON: merge JSON into the state file, atomically (temp file next to it,
# fsync, rename).
state_merge() {
  local tmp cur='{}'
  if [[ -s $STATE_FILE ]]; then
    cur=$(jq -c 'if type == "object" then . else {} end' "$STATE_FILE")
  fi
  tmp=$(mktemp "$(dirname -- "$STATE_FILE")/.$(basename -- "$STATE_FILE").XXXXXX")
  if jq -n --argjson a "$cur" --argjson b "$1" '$a + $b' >"$tmp" && sync -- "$tmp" &&
    mv -f -- "$tmp" "$STATE_FILE"; then
    return 0
  fi
  rm -f -- "$tmp"
  err "could not write state file $STATE_FILE"
  return 1
}

# last_segment: the last WAL segment id backed up or archived. The state may be an
# object (ours and the document's), a bare number (the document's last_wal_id.txt),
# null, or absent.
last_segment() {
  local v
  v=$(state_get '(if type == "object" then .lastSegmentId elif type == "number" then . else null end) // 0')
  [[ $v =~ ^[0-9]+$ ]] || { err "state file $STATE_FILE: lastSegmentId '$v' is not a number"; return 1; }
  printf '%s\n' "$v"
}

# segment_ids RESPONSE LAST: print the segment ids of a non-empty wal/backup RESPONSE,
# space-separated; exit 1 unless they are integers, ascending, unique and all after LAST.
segment_ids() {
  local resp=$1 last=$2 ids
  ids=$(jq -r '[.backups[].segmentId] | if all(type == "number" and . == floor) then map(tostring) | join(" ") else "bad" end' <<<"$resp")
  [[ $ids != bad ]] || die "wal/backup: segment ids are not integers: $resp"
  jq -e --argjson after "$last" '[.backups[].segmentId] as $s
      | ($s == ($s | sort)) and ($s | unique | length) == ($s | length) and all($s[]; . > $after)' \
    >/dev/null <<<"$resp" || die "wal/backup: segment ids not ascending after $last: $ids"
  printf '%s\n' "$ids"
}
