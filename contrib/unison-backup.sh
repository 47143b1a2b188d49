#!/usr/bin/env bash
# unison-backup.sh -- one UnisonDB backup run: the WAL segments sealed since the last
# run, plus a daily B-tree snapshot. Install as /usr/local/bin/unison-backup.sh, with
# unison-backup-common.sh (the helpers it shares with unison-wal-archive.sh) in the same
# directory; it is started by unison-backup.timer (contrib/systemd/), every 6 hours.
#
# This is the Backup and Restore document's "Backup Automation" script, fixed:
#  - every setting comes from the environment (the systemd unit reads
#    /etc/default/unison-backup), nothing is hard-wired;
#  - HTTP errors are errors: curl --fail-with-body, and the server's {"error": ...}
#    message is printed. The document's plain `curl -s` carried on after a 500;
#  - the WAL request passes "rotate": true, so the backup reaches the latest
#    acknowledged write instead of stopping at the last segment that happened to be
#    sealed;
#  - every file the server reports is checked against its <file>.sha256 sidecar with
#    `sha256sum -c` before it is compressed, uploaded or recorded as done;
#  - the state file is written atomically (temp file + mv), and only after the stage it
#    describes finished, upload included; a failed run is simply repeated by the next;
#  - the tarball and sidecars are written as hidden .<name>.partial files and renamed,
#    never as *.tmp: the server deletes *.tmp under the backup root when it starts, so
#    a server restart during a run used to fail it;
#  - a state file holding null (older versions of the document's scripts wrote that
#    when there was nothing new) reads as 0;
#  - the snapshot is taken by the first run in hour SNAPSHOT_HOUR, not only at exactly
#    00:00 (a timer rarely starts a job in minute 00:00), and also when the last one is
#    more than SNAPSHOT_MAX_AGE_HOURS old (machine was off at midnight), when
#    FORCE_SNAPSHOT=1, and after a WAL gap (the new snapshot restarts the PITR chain);
#  - a failing snapshot no longer stops the WAL backup, and the other way round;
#  - zstd is used only if it is installed; the upload (`aws s3 cp` in the document) is
#    whatever UPLOAD_CMD names, and skipped when it is empty;
#  - the 7-day clean-up deletes only inside the backup root, never the root or the
#    wal/ directory itself, never the newest snapshot nor WAL newer than it, and by
#    default only when the files were uploaded somewhere;
#  - two runs cannot overlap (flock), and file names carry seconds (the document's had
#    minutes), so two runs in one minute do not collide. The document's restore
#    procedures still find them (they match btree-[0-9]{8} and wal-YYYYMMDD*).
#
# Settings (environment):
#   UNISON_TOKEN_FILE       file holding the server's bearer token (an    unset
#                           admin token; see docs/OPERATIONS.md)
#   UNISON_URL              server base URL                               http://127.0.0.1:8080
#   NAMESPACE               namespace to back up                          users
#   DATA_DIR                the server's --data-dir                       /var/unison/data
#   STATE_DIR               run state and lock file                       /var/lib/unison
#   UPLOAD_CMD              run as `$UPLOAD_CMD FILE KEY` for every file to ship off the
#                           machine; KEY is FILE's path relative to the backup root, e.g.
#                           snapshots/btree-20250108-000000.db.zst. Empty: no upload.
#   FORCE_SNAPSHOT          1: take a B-tree snapshot on this run         0
#   SNAPSHOT_HOUR           hour (00-23) whose first run snapshots        00
#   SNAPSHOT_MAX_AGE_HOURS  also snapshot when the last is older          25
#   LOCAL_RETENTION_DAYS    delete local backups older than this, 0 = keep everything
#                                                  7 when UPLOAD_CMD is set, else 0
#   CURL_MAX_TIME           seconds one API call may take                 3600
#
# Files, under BACKUP_ROOT=$DATA_DIR/backups/$NAMESPACE (written by the server, which
# also writes every <file>.sha256):
#   snapshots/btree-YYYYMMDD-HHMMSS.db[.zst]   B-tree snapshot (+ .sha256 of each form)
#   wal/YYYYMMDD-HHMMSS/000000043.wal          WAL segments copied by this run
#   wal-YYYYMMDD-HHMMSS.tar.gz                 the same, packed for upload (+ .sha256)
# State: $STATE_DIR/wal-state-$NAMESPACE.json
#   {"lastSegmentId": N, "timestamp": "...", "lastSnapshot": {...}}
#
# Exit status: 0 done; 1 a stage failed (it is retried by the next run); 2 bad settings,
# missing tool or missing unison-backup-common.sh; 3 backup done but a WAL gap was found
# (segments deleted by retention before they were backed up: point-in-time recovery
# cannot cross it; a new snapshot was taken); 75 another run is still going.

set -euo pipefail
shopt -s inherit_errexit

PROG=unison-backup

# The helpers shared with unison-wal-archive.sh are in unison-backup-common.sh, which
# must be installed in the directory this script is in (symlinks to it are resolved).
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
UPLOAD_CMD=${UPLOAD_CMD:-}
FORCE_SNAPSHOT=${FORCE_SNAPSHOT:-0}
SNAPSHOT_HOUR=${SNAPSHOT_HOUR:-00}
SNAPSHOT_MAX_AGE_HOURS=${SNAPSHOT_MAX_AGE_HOURS:-25}
if [[ -n $UPLOAD_CMD ]]; then
  LOCAL_RETENTION_DAYS=${LOCAL_RETENTION_DAYS:-7}
else
  LOCAL_RETENTION_DAYS=${LOCAL_RETENTION_DAYS:-0}
fi
CURL_MAX_TIME=${CURL_MAX_TIME:-3600}

# --- settings and tools ---------------------------------------------------------------

check_base_settings
[[ $SNAPSHOT_HOUR =~ ^([01][0-9]|2[0-3])$ ]] ||
  config_error "SNAPSHOT_HOUR must be 00-23, got '$SNAPSHOT_HOUR'"
check_whole_numbers SNAPSHOT_MAX_AGE_HOURS LOCAL_RETENTION_DAYS CURL_MAX_TIME
require_tools curl jq sha256sum flock realpath tar gzip
setup_upload
setup_backup_root
STATE_FILE="$STATE_DIR/wal-state-$NAMESPACE.json"
DATE=$(date +%Y%m%d-%H%M%S)

take_lock
remove_partials "$BACKUP_ROOT"
remove_partials "$BACKUP_ROOT/snapshots"

# --- stage 1: WAL segments sealed since the last run ----------------------------------
# Exit status: 0 ok, 1 failed, 3 ok but gap found.
wal_stage() {
  local last resp n new_last first dir path ids tarball part gap=0
  last=$(last_segment)
  log "backing up WAL segments after $last into wal/$DATE"
  resp=$(api wal/backup "$(jq -nc --argjson after "$last" --arg dir "wal/$DATE" \
    '{afterSegmentId: $after, backupDir: $dir, rotate: true}')")
  jq -e '.backups | type == "array"' >/dev/null <<<"$resp" ||
    die "wal/backup: response has no \"backups\" list: $resp"
  n=$(jq '.backups | length' <<<"$resp")
  new_last=$(jq -r '.backups[-1].segmentId // 0' <<<"$resp")
  dir="$BACKUP_ROOT/wal/$DATE"
  if ((n == 0)); then
    log "no new sealed WAL segments"
    # The server may have created the directory; leave no empty ones behind.
    if [[ -d $dir ]] && under_root "$dir"; then
      rmdir -- "$dir" 2>/dev/null || true
    fi
    return 0
  fi
  # Ids must be integers, ascending, all after $last.
  ids=$(segment_ids "$resp" "$last")
  first=$(jq -r '.backups[0].segmentId' <<<"$resp")
  if ((last > 0 && first != last + 1)); then
    gap=1
    err "WAL GAP: asked for segments after $last but the oldest the server still had is $first;" \
      "segments $((last + 1))-$((first - 1)) were deleted before they were backed up." \
      "Point-in-time recovery cannot cross this gap; a new snapshot will be taken."
  fi
  while IFS= read -r path; do
    [[ $(dirname -- "$(realpath -m -- "$path")") == "$(realpath -m -- "$dir")" ]] ||
      die "wal/backup returned '$path', outside the requested $dir (is DATA_DIR the server's --data-dir?)"
    verify "$path" || die "WAL segment $path failed verification; not recording it as backed up"
  done < <(jq -r '.backups[].path' <<<"$resp")
  log "copied and verified $n segment(s): $ids"

  tarball="$BACKUP_ROOT/wal-$DATE.tar.gz"
  part=$(partial "$tarball")
  tar -czf "$part" -C "$BACKUP_ROOT" "wal/$DATE"
  gzip -t -- "$part"
  mv -f -- "$part" "$tarball"
  sidecar "$tarball"
  upload "$tarball" "$tarball.sha256"

  state_merge "$(jq -nc --argjson id "$new_last" --arg ts "$(date -Iseconds)" \
    '{lastSegmentId: $id, timestamp: $ts}')"
  log "WAL backed up through segment $new_last"
  return $((gap ? 3 : 0))
}

# --- stage 2: B-tree snapshot ---------------------------------------------------------
snapshot_stage() {
  local rel resp path bytes sha lsn size final
  rel="snapshots/btree-$DATE.db"
  log "creating B-tree snapshot $rel"
  resp=$(api btree/backup "$(jq -nc --arg p "$rel" '{path: $p}')")
  path=$(jq -r '.path // empty' <<<"$resp")
  bytes=$(jq -r '.bytes // empty' <<<"$resp")
  sha=$(jq -r '.sha256 // empty' <<<"$resp")
  lsn=$(jq -r '.lsn // empty' <<<"$resp")
  [[ -n $path ]] || die "btree/backup: response has no path: $resp"
  [[ $(realpath -m -- "$path") == "$(realpath -m -- "$BACKUP_ROOT/$rel")" ]] ||
    die "btree/backup wrote '$path', not $BACKUP_ROOT/$rel (is DATA_DIR the server's --data-dir?)"
  verify "$path" || die "snapshot $path failed verification"
  size=$(stat -c %s -- "$path")
  [[ -z $bytes || $bytes == "$size" ]] || die "snapshot $path has $size bytes, the server reported $bytes"
  if [[ -n $sha ]]; then
    [[ $(cut -d' ' -f1 <"$path.sha256") == "$sha" ]] ||
      die "snapshot $path: sidecar checksum differs from the server's reply ($sha)"
  fi
  log "snapshot verified: $size bytes${lsn:+, LSN $lsn}"

  final=$path
  if command -v zstd >/dev/null; then
    # --rm only removes the original once the .zst is complete; keep the .db.sha256
    # sidecar, it checks the file again after `zstd -d`.
    zstd -q --rm -- "$path"
    final="$path.zst"
    zstd -q -t -- "$final"
    sidecar "$final"
    upload "$final" "$final.sha256" "$path.sha256"
  else
    log "zstd is not installed; keeping the snapshot uncompressed"
    upload "$final" "$final.sha256"
  fi

  state_merge "$(jq -c --arg p "$final" --argjson epoch "$(date +%s)" --arg ts "$(date -Iseconds)" \
    --argjson bytes "$size" \
    '{lastSnapshot: {path: $p, epoch: $epoch, timestamp: $ts, bytes: $bytes,
                     sha256: (.sha256 // null), lsn: (.lsn // null)}}' <<<"$resp")"
  log "snapshot done: $final"
}

# --- stage 3: local retention ---------------------------------------------------------
# Deletes, inside the backup root only: snapshots older than LOCAL_RETENTION_DAYS except
# the newest one, and WAL directories/tarballs older than that *and* older than the newest
# snapshot (WAL after the newest snapshot is needed to restore from it).
prune_stage() {
  local days=$LOCAL_RETENTION_DAYS minutes newest victim
  ((days > 0)) || return 0
  minutes=$((days * 1440))
  newest=$(find "$BACKUP_ROOT/snapshots" -maxdepth 1 -type f \
    \( -name 'btree-*.db' -o -name 'btree-*.db.zst' \) -printf '%T@ %p\n' 2>/dev/null |
    sort -n | tail -n 1 | cut -d' ' -f2-) || newest=
  if [[ -z $newest ]]; then
    log "retention: no snapshot yet, keeping every local WAL backup"
    return 0
  fi
  {
    find "$BACKUP_ROOT/snapshots" -maxdepth 1 -type f -name 'btree-*' -mmin "+$minutes" \
      ! -path "$newest" ! -path "$newest.sha256" ! -path "${newest%.zst}.sha256" -print0
    [[ -d $BACKUP_ROOT/wal && ! -L $BACKUP_ROOT/wal ]] &&
      find "$BACKUP_ROOT/wal" -mindepth 1 -maxdepth 1 -type d -mmin "+$minutes" \
        -name '[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]-*' ! -newer "$newest" -print0
    # (only this script's dated wal/<date>/ directories: never wal/archive of the archiver)
    find "$BACKUP_ROOT" -maxdepth 1 -type f -name 'wal-*.tar.gz*' -mmin "+$minutes" \
      ! -newer "$newest" -print0
  } 2>/dev/null | while IFS= read -r -d '' victim; do
    if under_root "$victim" && [[ ! -L $victim ]]; then
      rm -rf -- "$victim"
      log "retention: deleted ${victim#"$BACKUP_ROOT"/}"
    else
      err "retention: refusing to delete '$victim' (not inside $ROOT_REAL)"
    fi
  done
}

# --- main -----------------------------------------------------------------------------

# run_stage FUNCTION: run one stage in a subshell with errexit in force and leave its
# exit status in STAGE_RC, so one failing stage does not skip the others. It must be
# called as a plain command: inside `if`, `||` or `&&` bash turns errexit off for the
# whole call, even for an explicit `set -e` within.
run_stage() {
  set +e
  (set -e; "$@")
  STAGE_RC=$?
  set -e
}

status=0
gap=0

run_stage wal_stage
case $STAGE_RC in
  0) ;;
  3) gap=1 ;;
  *) status=1; err "WAL backup failed; it will be retried from the same segment next run" ;;
esac

want_snapshot=0
reason=
last_epoch=$(state_get '(if type == "object" then .lastSnapshot.epoch else null end) // 0') || last_epoch=0
[[ $last_epoch =~ ^[0-9]+$ ]] || last_epoch=0
if [[ $FORCE_SNAPSHOT == 1 ]]; then
  want_snapshot=1 reason="FORCE_SNAPSHOT=1"
elif ((gap)); then
  want_snapshot=1 reason="WAL gap"
elif [[ $(date +%H) == "$SNAPSHOT_HOUR" ]]; then
  want_snapshot=1 reason="daily snapshot hour $SNAPSHOT_HOUR"
elif ((last_epoch == 0)); then
  want_snapshot=1 reason="no snapshot recorded in $STATE_FILE yet"
elif (($(date +%s) - last_epoch > SNAPSHOT_MAX_AGE_HOURS * 3600)); then
  want_snapshot=1 reason="last snapshot older than ${SNAPSHOT_MAX_AGE_HOURS}h"
fi
if ((want_snapshot)); then
  log "snapshot due: $reason"
  run_stage snapshot_stage
  if ((STAGE_RC != 0)); then
    status=1
    err "B-tree snapshot failed"
  fi
fi

if ((status == 0)); then
  run_stage prune_stage
  ((STAGE_RC == 0)) || { status=1; err "local retention failed"; }
fi

if ((status != 0)); then
  err "backup run FAILED"
  exit "$status"
fi
if ((gap)); then
  err "backup completed, but with a WAL gap (see above)"
  exit 3
fi
log "Backup completed successfully"
