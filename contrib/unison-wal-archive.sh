#!/usr/bin/env bash
# unison-wal-archive.sh -- continuous WAL archival for UnisonDB: copy every WAL segment
# sealed since the last run into wal/archive, verify, compress and ship each one.
# Install as /usr/local/bin/unison-wal-archive.sh and run it every 15 minutes, from
# cron (`*/15 * * * * /usr/local/bin/unison-wal-archive.sh`, as the unison user) or
# from contrib/systemd/unison-wal-archive.timer.
#
# This is the Backup and Restore document's "Continuous WAL Archival" script, fixed:
#  - settings come from the environment instead of being hard-wired;
#  - `set -euo pipefail`, and HTTP errors are errors (curl --fail-with-body; the
#    document's `curl -s` fed an error body to jq and carried on);
#  - "rotate": true, so each run archives up to the latest acknowledged write and the
#    recovery point is the run interval, not "whenever a segment happens to fill up";
#  - it compresses and uploads exactly the files the server reported, one by one, after
#    `sha256sum -c` against their .sha256 sidecars. The document picked files with
#    `find -mmin -15`: a run that was late or failed lost segments for good, and a
#    re-run uploaded some twice;
#  - `find -exec gzip {} \; -exec aws s3 cp {}.gz` uploaded nothing when gzip failed
#    and could not report an upload failure; here any failure stops the run with a
#    non-zero exit before the state moves past that segment;
#  - the state file is written atomically (temp file + fsync + mv) after each segment,
#    so a failed run resumes where it stopped; a state holding null, a bare number or no
#    lastSegmentId reads as 0 (older runs of the document's scripts wrote such files);
#  - a WAL gap (segments deleted by retention before they were archived) is reported
#    and makes the run exit 3;
#  - zstd is used if installed, gzip otherwise (the document's choice); the upload
#    (`aws s3 cp` in the document) is whatever UPLOAD_CMD names, skipped when empty;
#  - local clean-up deletes only archived segment files inside the archive directory;
#  - two runs cannot overlap (flock).
#
# Settings (environment):
#   UNISON_URL            server base URL                                 http://127.0.0.1:8080
#   NAMESPACE             namespace to archive                            users
#   DATA_DIR              the server's --data-dir                         /var/unison/data
#   STATE_DIR             run state and lock file                         /var/lib/unison
#   STATE_FILE            state file            $STATE_DIR/wal-archive-state-$NAMESPACE.json
#                         (the document used /var/lib/unison/wal-archive-state.json; point
#                         STATE_FILE at it to carry on from an existing installation)
#   ARCHIVE_DIR           backupDir, relative to the backup root          wal/archive
#   UPLOAD_CMD            run as `$UPLOAD_CMD FILE KEY` for every file to ship off the
#                         machine; KEY is FILE's path relative to the backup root, e.g.
#                         wal/archive/000000043.wal.zst. Empty: no upload.
#   COMPRESS              auto (zstd if installed, else gzip), zstd, gzip or none   auto
#   ROTATE                1: seal the active segment first ("rotate": true); 0: do not   1
#   LOCAL_RETENTION_DAYS  delete archived local segment files older than this, 0 = keep
#                                                  7 when UPLOAD_CMD is set, else 0
#   CURL_MAX_TIME         seconds one API call may take                   600
#
# Exit status: 0 done; 1 failed (the next run resumes after the last segment that was
# fully archived); 2 bad settings or missing tool; 3 archived, but a WAL gap was found
# (point-in-time recovery cannot cross it: take a B-tree snapshot, e.g.
# FORCE_SNAPSHOT=1 unison-backup.sh); 75 another run is still going.

set -euo pipefail
shopt -s inherit_errexit

PROG=unison-wal-archive

UNISON_URL=${UNISON_URL:-http://127.0.0.1:8080}
UNISON_URL=${UNISON_URL%/}
NAMESPACE=${NAMESPACE:-users}
DATA_DIR=${DATA_DIR:-/var/unison/data}
STATE_DIR=${STATE_DIR:-/var/lib/unison}
STATE_FILE=${STATE_FILE:-$STATE_DIR/wal-archive-state-$NAMESPACE.json}
ARCHIVE_DIR=${ARCHIVE_DIR:-wal/archive}
ARCHIVE_DIR=${ARCHIVE_DIR%/}
UPLOAD_CMD=${UPLOAD_CMD:-}
COMPRESS=${COMPRESS:-auto}
ROTATE=${ROTATE:-1}
if [[ -n $UPLOAD_CMD ]]; then
  LOCAL_RETENTION_DAYS=${LOCAL_RETENTION_DAYS:-7}
else
  LOCAL_RETENTION_DAYS=${LOCAL_RETENTION_DAYS:-0}
fi
CURL_MAX_TIME=${CURL_MAX_TIME:-600}

log() { printf '%s: %s\n' "$PROG" "$*"; }
err() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; }
die() { err "$*"; exit 1; }
config_error() { err "$*"; exit 2; }

# --- settings and tools ---------------------------------------------------------------

[[ $NAMESPACE =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ && $NAMESPACE != backups ]] ||
  config_error "NAMESPACE '$NAMESPACE' is not a valid namespace name"
[[ $DATA_DIR == /* ]] || config_error "DATA_DIR must be an absolute path, got '$DATA_DIR'"
[[ $STATE_DIR == /* ]] || config_error "STATE_DIR must be an absolute path, got '$STATE_DIR'"
[[ $STATE_FILE == /* ]] || config_error "STATE_FILE must be an absolute path, got '$STATE_FILE'"
[[ -n $ARCHIVE_DIR && $ARCHIVE_DIR != /* && /$ARCHIVE_DIR/ != */../* && /$ARCHIVE_DIR/ != */./* ]] ||
  config_error "ARCHIVE_DIR must be a relative path without . or .. parts, got '$ARCHIVE_DIR'"
[[ $ROTATE == 0 || $ROTATE == 1 ]] || config_error "ROTATE must be 0 or 1, got '$ROTATE'"
for v in LOCAL_RETENTION_DAYS CURL_MAX_TIME; do
  [[ ${!v} =~ ^[0-9]+$ ]] || config_error "$v must be a whole number, got '${!v}'"
done
for tool in curl jq sha256sum flock realpath; do
  command -v "$tool" >/dev/null || config_error "required tool '$tool' is not installed"
done
case $COMPRESS in
  auto) if command -v zstd >/dev/null; then COMPRESS=zstd; else COMPRESS=gzip; fi ;;
  zstd | gzip) ;;
  none) ;;
  *) config_error "COMPRESS must be auto, zstd, gzip or none, got '$COMPRESS'" ;;
esac
if [[ $COMPRESS != none ]]; then
  command -v "$COMPRESS" >/dev/null || config_error "COMPRESS=$COMPRESS but $COMPRESS is not installed"
fi
UPLOAD_ARGV=()
if [[ -n $UPLOAD_CMD ]]; then
  read -r -a UPLOAD_ARGV <<<"$UPLOAD_CMD"
  command -v "${UPLOAD_ARGV[0]}" >/dev/null ||
    config_error "UPLOAD_CMD: '${UPLOAD_ARGV[0]}' is not an executable command"
fi

BACKUP_ROOT="$DATA_DIR/backups/$NAMESPACE"
ROOT_REAL=$(realpath -m -- "$BACKUP_ROOT")
# Everything this script deletes or rewrites must resolve to a path below ROOT_REAL.
[[ $ROOT_REAL == /*/* ]] || config_error "backup root '$ROOT_REAL' is too close to /"
ARCHIVE_PATH="$BACKUP_ROOT/$ARCHIVE_DIR"

mkdir -p -- "$STATE_DIR"
exec 9>"$STATE_DIR/$PROG-$NAMESPACE.lock"
if ! flock -n 9; then
  err "another $PROG run for namespace '$NAMESPACE' is still going; not starting a second"
  exit 75
fi

# --- helpers (the same as in unison-backup.sh) ----------------------------------------

# under_root PATH: true if PATH (symlinks resolved) is strictly inside the backup root.
under_root() {
  local p
  p=$(realpath -m -- "$1")
  [[ $p == "$ROOT_REAL"/* ]]
}

# api ROUTE JSON: POST to /api/v1/$NAMESPACE/ROUTE, print the response body.
api() {
  local route=$1 body=$2 out rc=0 msg
  out=$(curl -sS --fail-with-body --connect-timeout 10 --max-time "$CURL_MAX_TIME" \
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

# sidecar FILE: write FILE.sha256 (sha256sum format, file name relative to its directory).
sidecar() {
  local dir base
  dir=$(dirname -- "$1")
  base=$(basename -- "$1")
  (cd -- "$dir" && sha256sum -- "$base" >"$base.sha256.tmp" && mv -f -- "$base.sha256.tmp" "$base.sha256")
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

# state_merge JSON: merge JSON into the state file, atomically (temp file, fsync, rename).
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

# last_segment: the last WAL segment id archived. The state may be an object (ours and
# the document's), a bare number (the document's last_wal_id.txt), null, or absent.
last_segment() {
  local v
  v=$(state_get '(if type == "object" then .lastSegmentId elif type == "number" then . else null end) // 0')
  [[ $v =~ ^[0-9]+$ ]] || { err "state file $STATE_FILE: lastSegmentId '$v' is not a number"; return 1; }
  printf '%s\n' "$v"
}

# --- archive --------------------------------------------------------------------------

# archive_one ID PATH: verify, compress, upload one segment, then record it as archived.
archive_one() {
  local id=$1 path=$2 final
  [[ $(dirname -- "$(realpath -m -- "$path")") == "$(realpath -m -- "$ARCHIVE_PATH")" ]] ||
    die "wal/backup returned '$path', outside $ARCHIVE_PATH (is DATA_DIR the server's --data-dir?)"
  verify "$path" || die "segment $id ($path) failed verification; not archiving it"
  final=$path
  case $COMPRESS in
    # -f: a re-run after a failed upload finds the compressed file of the same, verified
    # content already there. The original is removed only once the copy is complete; its
    # .sha256 sidecar stays and checks the segment again after decompression.
    zstd) zstd -q -f --rm -- "$path"; final="$path.zst"; zstd -q -t -- "$final" ;;
    gzip) gzip -f -- "$path"; final="$path.gz"; gzip -t -- "$final" ;;
    none) ;;
  esac
  if [[ $final != "$path" ]]; then
    sidecar "$final"
    upload "$final" "$final.sha256" "$path.sha256"
  else
    upload "$final" "$final.sha256"
  fi
  state_merge "$(jq -nc --argjson id "$id" --arg ts "$(date -Iseconds)" \
    '{lastSegmentId: $id, timestamp: $ts}')"
  log "archived segment $id: ${final#"$BACKUP_ROOT"/}"
}

# prune: delete local segment files (any form, with sidecars) older than
# LOCAL_RETENTION_DAYS whose segment id is at or below the last archived one.
prune() {
  local days=$LOCAL_RETENTION_DAYS last f base id
  ((days > 0)) || return 0
  [[ -d $ARCHIVE_PATH && ! -L $ARCHIVE_PATH ]] || return 0
  under_root "$ARCHIVE_PATH" || die "archive directory $ARCHIVE_PATH is outside $ROOT_REAL"
  last=$(last_segment)
  find "$ARCHIVE_PATH" -maxdepth 1 -type f -name '[0-9]*.wal*' -mmin "+$((days * 1440))" -print0 |
    while IFS= read -r -d '' f; do
      base=$(basename -- "$f")
      id=${base%%.*}
      [[ $id =~ ^[0-9]+$ ]] || continue
      ((10#$id <= last)) || continue
      if under_root "$f"; then
        rm -f -- "$f"
        log "retention: deleted ${f#"$BACKUP_ROOT"/}"
      fi
    done
}

main() {
  local last resp n ids first id path gap=0 rotate=false
  last=$(last_segment)
  if ((ROTATE)); then rotate=true; fi
  resp=$(api wal/backup "$(jq -nc --argjson after "$last" --arg dir "$ARCHIVE_DIR" \
    --argjson rotate "$rotate" '{afterSegmentId: $after, backupDir: $dir, rotate: $rotate}')")
  jq -e '.backups | type == "array"' >/dev/null <<<"$resp" ||
    die "wal/backup: response has no \"backups\" list: $resp"
  n=$(jq '.backups | length' <<<"$resp")
  if ((n == 0)); then
    log "no new sealed WAL segments after $last"
  else
    ids=$(jq -r '[.backups[].segmentId] | if all(type == "number" and . == floor) then map(tostring) | join(" ") else "bad" end' <<<"$resp")
    [[ $ids != bad ]] || die "wal/backup: segment ids are not integers: $resp"
    jq -e --argjson after "$last" '[.backups[].segmentId] as $s
        | ($s == ($s | sort)) and ($s | unique | length) == ($s | length) and all($s[]; . > $after)' \
      >/dev/null <<<"$resp" || die "wal/backup: segment ids not ascending after $last: $ids"
    first=$(jq -r '.backups[0].segmentId' <<<"$resp")
    if ((last > 0 && first != last + 1)); then
      gap=1
      err "WAL GAP: asked for segments after $last but the oldest the server still had is $first;" \
        "segments $((last + 1))-$((first - 1)) were deleted before they were archived." \
        "Point-in-time recovery cannot cross this gap: take a new B-tree snapshot now."
    fi
    log "archiving $n segment(s): $ids"
    while read -r id path; do
      archive_one "$id" "$path"
    done < <(jq -r '.backups[] | "\(.segmentId) \(.path)"' <<<"$resp")
  fi
  prune
  if ((gap)); then
    err "archived through segment $(last_segment), but with a WAL gap (see above)"
    exit 3
  fi
}

main
