#!/usr/bin/env bash
# unison-wal-archive.sh -- continuous WAL archival for UnisonDB: copy every WAL segment
# sealed since the last run into wal/archive, verify, compress and ship each one.
# Install as /usr/local/bin/unison-wal-archive.sh, with unison-backup-common.sh (the
# helpers it shares with unison-backup.sh) in the same directory, and run it every 15
# minutes, from cron (`*/15 * * * * /usr/local/bin/unison-wal-archive.sh`, as the
# unison user) or from contrib/systemd/unison-wal-archive.timer.
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
#   UNISON_TOKEN_FILE     file holding the server's bearer token (an      unset
#                         admin token; see docs/OPERATIONS.md)
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
# fully archived); 2 bad settings, missing tool or missing unison-backup-common.sh;
# 3 archived, but a WAL gap was found (point-in-time recovery cannot cross it: take a
# B-tree snapshot, e.g. FORCE_SNAPSHOT=1 unison-backup.sh); 75 another run is still going.

set -euo pipefail
shopt -s inherit_errexit

PROG=unison-wal-archive

# The helpers shared with unison-backup.sh are in unison-backup-common.sh, which must
# be installed in the directory this script is in (symlinks to it are resolved).
SELF=$(readlink -f -- "${BASH_SOURCE[0]}")
COMMON_SH="${SELF%/*}/unison-backup-common.sh"
if [[ ! -f $COMMON_SH || ! -r $COMMON_SH ]]; then
  printf '%s: ERROR: %s is missing or unreadable; it must be installed next to %s\n' \
    "$PROG" "$COMMON_SH" "$SELF" >&2
  exit 2
fi
# shellcheck source-path=SCRIPTDIR
# shellcheck source=unison-backup-common.sh
source "$COMMON_SH"

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

# --- settings and tools ---------------------------------------------------------------

check_base_settings
[[ $STATE_FILE == /* ]] || config_error "STATE_FILE must be an absolute path, got '$STATE_FILE'"
[[ -n $ARCHIVE_DIR && $ARCHIVE_DIR != /* && /$ARCHIVE_DIR/ != */../* && /$ARCHIVE_DIR/ != */./* ]] ||
  config_error "ARCHIVE_DIR must be a relative path without . or .. parts, got '$ARCHIVE_DIR'"
[[ $ROTATE == 0 || $ROTATE == 1 ]] || config_error "ROTATE must be 0 or 1, got '$ROTATE'"
check_whole_numbers LOCAL_RETENTION_DAYS CURL_MAX_TIME
require_tools curl jq sha256sum flock realpath
case $COMPRESS in
  auto) if command -v zstd >/dev/null; then COMPRESS=zstd; else COMPRESS=gzip; fi ;;
  zstd | gzip) ;;
  none) ;;
  *) config_error "COMPRESS must be auto, zstd, gzip or none, got '$COMPRESS'" ;;
esac
if [[ $COMPRESS != none ]]; then
  command -v "$COMPRESS" >/dev/null || config_error "COMPRESS=$COMPRESS but $COMPRESS is not installed"
fi
setup_upload
setup_backup_root
ARCHIVE_PATH="$BACKUP_ROOT/$ARCHIVE_DIR"

take_lock
remove_partials "$ARCHIVE_PATH"

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
    ids=$(segment_ids "$resp" "$last")
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
