#!/usr/bin/env bash
# gpubuild-init: installs one pinned, verified package set into a shared volume.
# Written by `gpubuild init-script` for profile torch-cu121, digest 8efdcf1e1ab14b777bc3aedc7a8133b2093ab4b59d149ca2141790e06ce68d6d.
# Do not edit: regenerate it. Everything it installs is pinned below by sha256.
#
# Run-time settings (environment, all optional):
#   GPUBUILD_TARGET     install folder (default /shared-packages)
#   GPUBUILD_STORE_URL  the store (the folder holding blobs/), overriding the one written in
#   GPUBUILD_SAS        a SAS token appended to every blob URL (never printed)
#   GPUBUILD_SAS_FILE   a file holding the SAS token (a mounted Secret)
#   GPUBUILD_PARALLEL   shards downloaded at once (default: two per usable core, 4 to 16)
#   GPUBUILD_UNPACKERS  shards hashed and unpacked at once (default: the usable cores, that
#                       is nproc capped by the container's CPU limit, from its cgroup; at most
#                       GPUBUILD_PARALLEL and 256)
#   GPUBUILD_RETRIES    download attempts per shard (default 5); between two, a wait drawn at
#                       random from 0 to 1, 2, 4 ... 30 s (full jitter, so that many pods
#                       throttled at once do not come back at once), after what the store's
#                       Retry-After asked for (at most 300 s)
#   GPUBUILD_STALL_SECONDS  abort an attempt that moves under 1 KB/s this long (default 60;
#                       curl averages over its last ~5 s, so a stall shows a little later)
#   GPUBUILD_PYTHON     the interpreter for the pip fallback, when one is built in
#
# Layout of the target folder T (the volume's mount point, so T itself cannot be renamed):
#   T/<entries of the package set>    the live set: what PYTHONPATH=T sees
#   T/.gpubuild/lock                  flock'ed by the running copy (same volume)
#   T/.gpubuild/installed             "<digest> <source>" of the live set, written once it is
#                                     complete; source is "store" (verified) or "pip" (fallback)
#   T/.gpubuild/incomplete            present while the live set is being replaced
#   T/.gpubuild/download/<sha256>.part  a shard being downloaded (kept for resuming)
#   T/.gpubuild/staging-<digest>/     a set being unpacked; verified-<digest> once checked
#   T/.gpubuild/trash/                the previous set, moved aside, deleted after the switch
#
# Why only verified bytes are ever unpacked, and why it is safe to kill at any moment:
#   1. Each shard is downloaded into download/<sha256>.part (an interrupted download resumes
#      where it stopped, with an HTTP Range request), and its sha256 is checked against the pin
#      below before a single byte of it is unpacked: a shard that fails the check is deleted
#      and downloaded again, so nothing a rejected stream carried can reach the set.
#   2. Verified shards unpack in parallel into staging-<digest> (bsdtar, which decompresses
#      zstd in-process, or zstd -d | GNU tar), one per usable core at most while the other
#      downloads go on, after the whole directory skeleton exists:
#      parallel tar processes racing to create the same folders silently lose files
#      (pghoard#452; seen here: up to 48 of 12,699 files missing). Each shard's member count
#      and exit status are checked; shards are disjoint, so together they prove the tree's
#      file count without another pass over it. The live
#      set is not touched in this phase; a killed run leaves a staging folder that the next run
#      deletes (or reuses, when verified-<digest> says it was complete and checked).
#   3. The switch: write `incomplete`, remove `installed` and `verified-<digest>`, move the old
#      set's top-level entries into trash/, move the staged entries up (renames on one file
#      system), write `installed`, remove `incomplete` (last), then delete trash/.
#   4. A run that finds `incomplete` treats the live tree as nothing: it clears it and installs
#      again. So the live tree is always the old complete set, or counts as nothing; the next
#      run finishes the job. (A node crash can lose unsynced writes; an emptyDir dies with its
#      pod anyway.)
# The lock's file descriptor is inherited by every download: even the orphaned children of a
# killed run keep a second run waiting until they have exited. Everything the script creates
# it can also remove, as any user: folders are made writable before they are deleted.

set -euo pipefail
shopt -s nullglob dotglob

readonly DIGEST=8efdcf1e1ab14b777bc3aedc7a8133b2093ab4b59d149ca2141790e06ce68d6d
readonly PROFILE=torch-cu121
readonly DEFAULT_TARGET=/shared-packages
readonly DEFAULT_STORE_URL=https://gpucache.blob.core.windows.net/gpubuild/prod
readonly SHARD_COUNT=17
readonly TOTAL_BYTES=17119
readonly TOTAL_RAW_BYTES=85119
readonly TOTAL_FILES=379
readonly FALLBACK=none
# Retries: a random wait in [0, min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2^(attempt-1))], after
# the Retry-After the store sent (capped: a hostile header must not park the pod for hours).
readonly BACKOFF_BASE_MS=1000
readonly BACKOFF_CAP_MS=30000
readonly RETRY_AFTER_MAX=300
# A SAS that runs out within this many seconds is warned about on every run.
readonly SAS_WARN_SECONDS=$(( 7 * 86400 ))

# One line per shard, largest first: sha256 (of the .tar.zst: its name in the store), bytes,
# files, BLAKE3 (of the same bytes; "-" when the manifest has none), packages.
shard_table() {
  cat <<'GPUBUILD_SHARDS'
77cbc27cb202acd1ec928e68c1d0661df80abe8ebe46a8a15320b458b157b165 1015 25 - triton
62cbf6a920411d2f9d0efa22b8e04b3e27502dbb7ad5bf09877837b8cc49cde6 1014 24 - torchvision
5ff363c288872a50a6e8aa8adb005fe6f8c9feb57f490ec9d12d9fd871868bd3 1013 23 - torch
fe1fd5568380f98e47cb9c6d75d09b149c33e0a47088ce53e468d66f7f2f8ebb 1012 22 - onnxruntime-gpu
cfb122e916730b10c15e458af91d640b750b3693d96cebbff57020016b6c5781 1011 21 - nvidia-nvtx-cu12
934ded650694f8a47b08b5e3c7873f45b8f5aca64889beaa217df73a38bc91ce 1010 20 - nvidia-nvjitlink-cu12
c16ff59c36185fd5c79a317bb6079765c69123185d637ee87530cf066bc997d4 1009 19 - nvidia-nccl-cu12
33421f61d16820a063890cab531e09a4510283f6b2e249d0b6dea1a847a36d57 1008 18 - nvidia-cusparse-cu12
f64cac73e6c8cbba4901bc00fe1d61795943acd921edcabdd772f54186e77123 1007 17 - nvidia-cusolver-cu12
3b1a8a2ac36d0e7eb7db6b61ef6b467f17e97b1588e186016e70e441d3d1679c 1006 16 - nvidia-curand-cu12
84e274a1fbed3aeae27f9d33507759c764d707eeb778c2d9f6adb1c53657231f 1005 15 - nvidia-cufft-cu12
36d692a88aead3749bb844f61602834ac0204aae15ece3491a1ce304c2a6874e 1004 14 - nvidia-cudnn-cu12
88ea59806ce545ea24dc50364621b4978c6c76756b76790f427973f035d89347 1003 13 - nvidia-cuda-runtime-cu12
e4cb87311cd765cb3ef55cb70036bb11657e41224a052ca4cbf1407ab3261e07 1002 12 - nvidia-cuda-nvrtc-cu12
ff983455a79191f815ea866f7f340911e40a349f7adbc81f818497d3551397cb 1001 11 - nvidia-cuda-cupti-cu12
6f022e4acfb3941ceff820094a7010dd921a41e9933cade9312a0e3ca2306033 1000 10 - nvidia-cublas-cu12
51f3287b1c163022a38296788ed6007dde47ebe1d70d29c110153112ae2c35df 999 99 - coloredlogs,humanfriendly,mpmath,networkx,pillow,sympy
GPUBUILD_SHARDS
}

# The folders to create before extraction: only the deepest ones (mkdir -p makes the rest).
directory_skeleton() {
  cat <<'GPUBUILD_DIRECTORIES'

GPUBUILD_DIRECTORIES
}

# No pip fallback was built in (gpubuild init-script --fallback pip adds one).
fallback_lock() {
  :
}

fallback_indexes() {
  :
}

fallback_excludes() {
  :
}

# Several extractors share one staging tree, so a link made by one shard could otherwise carry
# another shard's files out of it (gpubuild's own shards hold no links: wheels cannot). bsdtar
# (without -P) refuses `..`, absolute names and any member whose path goes through a symlink
# on disk; GNU tar guards only within one archive, so there symlink targets are made relative
# and stripped of `..` while extracting.
readonly TAR_SAFE_LINKS=(
  --transform 's,^/*,,RH'
  --transform 's,\(^\|/\)\.\.\(/\|$\),\1__\2,gRH'
)
readonly BSDTAR_SAFE=(--no-same-owner --no-acls --no-xattrs --no-fflags)

# --- messages -------------------------------------------------------------------------------

log() {
  printf '[gpubuild-init] %s\n' "$*" >&2
}

die() {
  log "ERROR: $*"
  exit 1
}

# Sets NOW_MS without a subshell (the main loop asks ten times a second): bash's own clock
# where it has one (5.0+), else date.
read_clock() {
  local now=${EPOCHREALTIME:-}
  if [[ $now =~ ^([0-9]+)[.,]([0-9]{3}) ]]; then
    NOW_MS=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
  else
    NOW_MS=$(date +%s%3N)
  fi
}

now_ms() {
  read_clock
  printf '%s' "$NOW_MS"
}

# 123456789 -> "123.5 MB", 3325 -> "3.3 kB" (decimal units).
format_mb() {
  local unit=MB scale=100000
  if (( $1 < 1000000 )); then
    unit=kB scale=100
  fi
  local tenths=$(( ($1 + scale / 2) / scale ))
  printf '%d.%d %s' $(( tenths / 10 )) $(( tenths % 10 )) "$unit"
}

# bytes, milliseconds -> "85.2 MB/s".
format_rate() {
  local ms=$(( $2 > 0 ? $2 : 1 ))
  local tenths=$(( $1 / (ms * 100) ))
  printf '%d.%d MB/s' $(( tenths / 10 )) $(( tenths % 10 ))
}

# milliseconds -> "12.3 s".
format_seconds() {
  printf '%d.%d s' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 ))
}

# Everything printed from curl passes through here: the SAS never reaches the log.
redact() {
  local text=$1
  if [[ -n ${SAS:-} ]]; then
    text=${text//"$SAS"/<sas>}
  fi
  # A signature in any case; a URL's userinfo up to its last '@' (a password may hold '@').
  printf '%s' "$text" | sed -E -e 's/([?&][sS][iI][gG]=)[^&[:space:]"]*/\1<redacted>/g' \
    -e 's,([A-Za-z][A-Za-z0-9+.-]*://)[^[:space:]]*@,\1<redacted>@,g'
}

# --- settings -------------------------------------------------------------------------------

# The install folder must be a folder of its own: never /, a system folder, or a path whose
# meaning depends on '.' or '..' (gpubuild checks the profile's install_dir the same way).
check_target() {
  local target=$1
  while [[ $target == */ && $target != / ]]; do
    target=${target%/}
  done
  case $target/ in
    *//* | */./* | */../*)
      die "GPUBUILD_TARGET='$target' must be an absolute path without '.', '..' or '//'" ;;
  esac
  case $target in
    / | /bin | /boot | /dev | /etc | /home | /lib | /lib32 | /lib64 | /libx32 | /media | /mnt | \
      /opt | /proc | /root | /run | /sbin | /srv | /sys | /tmp | /usr | /var | /proc/* | \
      /sys/* | /dev/*)
      die "GPUBUILD_TARGET='$target' is a system folder; name the shared volume's mount point instead" ;;
    /*) ;;
    *) die "GPUBUILD_TARGET='$target' must be an absolute path (the shared volume's mount point)" ;;
  esac
  TARGET=$target
}

# The tightest CPU limit, in whole cores rounded up, on the cgroup of this process ($1:
# /proc/self/cgroup) and its ancestors, under the cgroup mounts in $2 (/sys/fs/cgroup): v2's
# cpu.max ("200000 100000"), v1's cpu.cfs_quota_us over cpu.cfs_period_us. Prints nothing
# when there is no limit. A container sees its own cgroup as the mount's top folder; the walk
# up the path finds it there as well as on a host.
cgroup_cpu_limit() {
  local proc_cgroup=$1 root=$2 line controllers own path base dir best="" quota period cores
  [[ -r $proc_cgroup ]] || return 0
  while IFS= read -r line; do
    [[ $line =~ ^[0-9]+:([^:]*):(/.*)$ ]] || continue
    controllers=${BASH_REMATCH[1]}
    own=${BASH_REMATCH[2]}
    local -a bases=()
    if [[ -z $controllers ]]; then
      bases=("$root" "$root/unified")
    elif [[ ,$controllers, == *,cpu,* ]]; then
      bases=("$root/$controllers" "$root/cpu" "$root/cpu,cpuacct")
    fi
    for base in "${bases[@]}"; do
      [[ -d $base ]] || continue
      path=$own
      while :; do
        dir=$base${path%/}
        quota="" period=""
        if [[ -z $controllers && -r $dir/cpu.max ]]; then
          read -r quota period <"$dir/cpu.max" 2>/dev/null || true
        elif [[ -n $controllers && -r $dir/cpu.cfs_quota_us && -r $dir/cpu.cfs_period_us ]]; then
          read -r quota <"$dir/cpu.cfs_quota_us" 2>/dev/null || true
          read -r period <"$dir/cpu.cfs_period_us" 2>/dev/null || true
        fi
        if [[ $quota =~ ^[0-9]{1,15}$ && $period =~ ^[0-9]{1,15}$ ]] && (( period > 0 && quota > 0 )); then
          cores=$(( (quota + period - 1) / period ))
          if [[ -z $best ]] || (( cores < best )); then
            best=$cores
          fi
        fi
        [[ $path != / ]] || break
        path=${path%/*}
        [[ -n $path ]] || path=/
      done
    done
  done <"$proc_cgroup"
  printf '%s' "$best"
}

# CORES: what this container may compute with: nproc (its CPU affinity) capped by its CPU
# limit, which nproc does not see (limits.cpu: 2 on a 64-core node still says 64). nproc also
# obeys OMP_NUM_THREADS, which the worker image sets to 1 for other reasons: not here.
# CORES_FROM says which of the two it is, for the log.
usable_cores() {
  local limit
  CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null) || CORES=""
  [[ $CORES =~ ^[1-9][0-9]{0,4}$ ]] || CORES=4
  CORES_FROM="nproc"
  limit=$(cgroup_cpu_limit /proc/self/cgroup /sys/fs/cgroup)
  if [[ -n $limit ]] && (( limit < CORES )); then
    CORES=$limit
    CORES_FROM="the container's CPU limit"
  fi
}

read_settings() {
  check_target "${GPUBUILD_TARGET:-$DEFAULT_TARGET}"
  STATE="$TARGET/.gpubuild"
  STAGING="$STATE/staging-$DIGEST"
  DOWNLOADS="$STATE/download"

  local store=${GPUBUILD_STORE_URL:-$DEFAULT_STORE_URL}
  SAS=""
  SAS_SOURCE="none"
  # Nothing secret may ride in the URL but a SAS in its query, which is split off so that
  # the URL itself can be printed: a '#' or an '@' (userinfo) is refused without printing it.
  if [[ $store == *#* ]]; then
    die "GPUBUILD_STORE_URL holds a '#'; give the store's URL without a fragment, and its SAS through GPUBUILD_SAS or GPUBUILD_SAS_FILE"
  fi
  if [[ $store == *\?* ]]; then
    SAS=${store#*\?}
    SAS_SOURCE="the query of GPUBUILD_STORE_URL"
    store=${store%%\?*}
  fi
  if [[ $store == *@* ]]; then
    die "GPUBUILD_STORE_URL carries a user name or password ($(redact "$store")); give a SAS through GPUBUILD_SAS or GPUBUILD_SAS_FILE instead"
  fi
  STORE_URL=${store%/}
  if [[ ! ${STORE_URL,,} =~ ^(https?|file):// ]]; then
    die "GPUBUILD_STORE_URL must start with https://, http:// or file:// (got '$(redact "$STORE_URL")')"
  fi

  if [[ -n ${GPUBUILD_SAS:-} ]]; then
    SAS=$GPUBUILD_SAS
    SAS_SOURCE="GPUBUILD_SAS"
  elif [[ -n ${GPUBUILD_SAS_FILE:-} ]]; then
    if [[ ! -r $GPUBUILD_SAS_FILE ]]; then
      die "GPUBUILD_SAS_FILE=$GPUBUILD_SAS_FILE cannot be read; check the Secret and its volume mount"
    fi
    SAS=$(<"$GPUBUILD_SAS_FILE")
    SAS_SOURCE="GPUBUILD_SAS_FILE ($GPUBUILD_SAS_FILE)"
  fi
  SAS=${SAS//[[:space:]]/}
  SAS=${SAS#\?}
  if [[ -n $SAS && ${STORE_URL,,} == file://* ]]; then
    log "note: a SAS means nothing to a file:// store; ignoring it"
    SAS=""
    SAS_SOURCE="none"
  fi

  usable_cores
  # Two downloads per core (at least 4, at most 16): a download mostly waits for the network,
  # so more of them than cores keep the link busy; hashing and unpacking, which only compute
  # and write, go no more than one per core (UNPACKERS): more decoders than cores only evict
  # each other's caches (torch-cu121 on 2 cores: 21-22 CPU-s unpacking 4 at once, 19.7 with 2,
  # in the same wall time).
  local workers=$(( 2 * CORES ))
  (( workers >= 4 )) || workers=4
  (( workers <= 16 )) || workers=16
  PARALLEL=${GPUBUILD_PARALLEL:-$workers}
  UNPACKERS=${GPUBUILD_UNPACKERS:-$CORES}
  RETRIES=${GPUBUILD_RETRIES:-5}
  STALL_SECONDS=${GPUBUILD_STALL_SECONDS:-60}
  local name
  for name in PARALLEL UNPACKERS RETRIES STALL_SECONDS; do
    if [[ ! ${!name} =~ ^[1-9][0-9]{0,4}$ ]]; then
      die "GPUBUILD_$name must be a whole number from 1 (got '${!name}')"
    fi
  done
  # More unpackers than downloads could never all be busy.
  (( UNPACKERS <= PARALLEL )) || UNPACKERS=$PARALLEL
  (( UNPACKERS <= 256 )) || UNPACKERS=256
}

check_tools() {
  local tool missing=()
  for tool in curl zstd tar sha256sum flock find grep df date sleep sed stat chmod cut tr tail mkfifo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if (( ${#missing[@]} )); then
    die "missing programs: ${missing[*]}; run this script in the gpubuild init image (Dockerfile.init)"
  fi
  # coreutils' sha256sum does not use the CPU's SHA instructions (about 340 MB/s here, the
  # slowest stage of the pipeline); OpenSSL does (about 1.6 GB/s). Same digest either way.
  HASHER=(sha256sum)
  if command -v openssl >/dev/null 2>&1 \
    && [[ $(openssl dgst -sha256 -r </dev/null 2>/dev/null) == e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855* ]]; then
    HASHER=(openssl dgst -sha256 -r)
  fi
  # BLAKE3 where the manifest pins it and the image has b3sum: a cryptographic hash like
  # sha256 at a third of OpenSSL's CPU here (its SIMD tree hash, over a mapped file), so the
  # check costs 0.3 CPU-s per GB instead of 1.2. The sha256 still names the blob.
  HAS_B3SUM=no
  if command -v b3sum >/dev/null 2>&1 \
    && [[ $(printf '' | b3sum --num-threads 1 --no-names 2>/dev/null) == af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262 ]]; then
    HAS_B3SUM=yes
  fi
  # bsdtar reads the .tar.zst itself: no pipe carrying every unpacked byte between two
  # processes (about a third less CPU for the whole unpack, bench/bench_stages.py).
  EXTRACTOR=gnu
  if command -v bsdtar >/dev/null 2>&1 && bsdtar --version 2>/dev/null | grep -q 'libzstd'; then
    EXTRACTOR=bsdtar
  fi
  # The sha256 already proved the bytes: zstd's own frame checksum is a second pass for nothing.
  ZSTD_NO_CHECK=()
  if printf x | zstd -q -c 2>/dev/null | zstd -d -q --no-check -c >/dev/null 2>&1; then
    ZSTD_NO_CHECK=(--no-check)
  fi
}

# What checks the shards, for the log: BLAKE3 for those the manifest pins it for, when the
# image has b3sum; sha256 for the others.
checksum_tool() {
  local blake3 pinned=0
  for blake3 in "${BLAKE3S[@]}"; do
    [[ $blake3 == - ]] || pinned=$(( pinned + 1 ))
  done
  if [[ $HAS_B3SUM != yes ]]; then
    printf 'sha256 (%s)' "${HASHER[0]}"
  elif (( pinned == ${#BLAKE3S[@]} )); then
    printf 'BLAKE3 (b3sum)'
  elif (( pinned == 0 )); then
    printf 'sha256 (%s; the manifest pins no BLAKE3: this digest was published before gpubuild recorded it)' "${HASHER[0]}"
  else
    printf 'BLAKE3 (b3sum) for %d of %d shards, sha256 (%s) for the others' "$pinned" "${#BLAKE3S[@]}" "${HASHER[0]}"
  fi
}

# "3 days 4 hours", "5 hours 12 minutes", "40 minutes" (whole units, rounded down).
format_duration() {
  local seconds=$1
  if (( seconds >= 86400 )); then
    printf '%d days %d hours' $(( seconds / 86400 )) $(( seconds % 86400 / 3600 ))
  elif (( seconds >= 3600 )); then
    printf '%d hours %d minutes' $(( seconds / 3600 )) $(( seconds % 3600 / 60 ))
  else
    printf '%d minutes' $(( seconds / 60 ))
  fi
}

# How long the SAS stays valid, from its se= field; only the parsed time is printed, never
# the token. Under 7 days is a warning: the Secret must be renewed before pods stop starting.
report_sas_expiry() {
  [[ -n $SAS ]] || return 0
  local raw="" expiry now left
  if [[ "&$SAS&" =~ \&se=([^\&]*)\& ]]; then
    raw=${BASH_REMATCH[1]}
  fi
  if [[ -z $raw ]]; then
    log "note: the SAS from $SAS_SOURCE names no expiry (se=); a stored access policy may set one"
    return 0
  fi
  # Percent-decoding: 2024-05-01T12%3A00%3A00Z; only digits, letters and -:.+ may remain.
  raw=${raw//%3A/:}
  raw=${raw//%3a/:}
  raw=${raw//%2B/+}
  raw=${raw//%2b/+}
  if [[ ! $raw =~ ^[0-9A-Za-z:.+-]{1,40}$ ]] || ! expiry=$(date -u -d "$raw" +%s 2>/dev/null); then
    log "WARNING: the expiry (se=) of the SAS from $SAS_SOURCE is not a date; check the token"
    return 0
  fi
  now=$(date -u +%s)
  left=$(( expiry - now ))
  local until
  until=$(date -u -d "@$expiry" +%Y-%m-%dT%H:%M:%SZ)
  if (( left <= 0 )); then
    log "WARNING: the SAS from $SAS_SOURCE expired at $until; make a new one (gpubuild sas) and update its Secret"
  elif (( left < SAS_WARN_SECONDS )); then
    log "WARNING: the SAS from $SAS_SOURCE expires in $(format_duration "$left") ($until): make a new one (gpubuild sas --expires-in) and update its Secret before then"
  else
    log "the SAS from $SAS_SOURCE is valid for $(format_duration "$left") (until $until)"
  fi
}

# --- the lock and the state of the target ---------------------------------------------------

take_lock() {
  mkdir -p -- "$STATE" 2>/dev/null || die "cannot create $STATE: is $TARGET mounted and writable?"
  exec 9>>"$STATE/lock" || die "cannot open $STATE/lock for writing"
  if ! flock -n 9; then
    log "another gpubuild-init is installing into $TARGET; waiting for it to finish"
    flock 9 || die "could not lock $STATE/lock"
    log "the other run has finished; checking what it installed"
  fi
}

# Removes files and folders this script created, whatever their modes: a non-root user cannot
# delete the contents of a folder it may not write, so such folders are made writable first.
remove_tree() {
  local path
  for path in "$@"; do
    [[ -e $path || -L $path ]] || continue
    rm -rf -- "$path" 2>/dev/null && continue
    chmod -R u+rwx -- "$path" 2>/dev/null || true
    rm -rf -- "$path" || die "cannot remove $path: is $TARGET writable by this user ($EUID)?"
  done
}

installed_digest() {
  local line=""
  if [[ -f $STATE/installed && ! -e $STATE/incomplete ]]; then
    read -r line <"$STATE/installed" || true
  fi
  printf '%s' "${line%% *}"
}

# Where the live set came from: "store" (verified) or "pip" (the fallback).
installed_source() {
  local source=""
  if [[ -f $STATE/installed ]]; then
    read -r _ source <"$STATE/installed" || true
  fi
  printf '%s' "${source:-store}"
}

# The live set: every top-level entry of the target but the state folder.
live_entries() {
  local entry
  for entry in "$TARGET"/*; do
    case ${entry##*/} in
      .gpubuild | lost+found) ;;
      *) printf '%s\n' "$entry" ;;
    esac
  done
}

# Moves the live set aside into a fresh trash folder: renames, so it takes no time.
move_live_to_trash() {
  remove_tree "$STATE/trash"
  mkdir -p -- "$STATE/trash"
  local entry
  while IFS= read -r entry; do
    mv -- "$entry" "$STATE/trash/" || die "cannot move $entry aside: is $TARGET writable?"
  done < <(live_entries)
}

# Puts the target back into a known state after a killed or failed run.
recover() {
  remove_tree "$STATE/trash" "$STATE/work" "$STATE"/*.tmp
  if [[ -e $STATE/incomplete ]]; then
    log "a previous run was stopped while switching package sets; the live set is incomplete: clearing it"
    move_live_to_trash
    rm -f -- "$STATE/installed" "$STATE"/verified-*
    remove_tree "$STATE/trash"
    rm -f -- "$STATE/incomplete"
  fi
  local path
  for path in "$STATE"/staging-*; do
    if [[ $path != "$STAGING" || ! -e $STATE/verified-$DIGEST ]]; then
      remove_tree "$path"
    fi
  done
  for path in "$STATE"/verified-*; do
    if [[ $path != "$STATE/verified-$DIGEST" || ! -d $STAGING ]]; then
      rm -f -- "$path"
    fi
  done
  # A partial download of one of this set's shards is kept: the next attempt resumes it.
  local pinned name
  pinned=" $(shard_table | while read -r name _; do printf '%s ' "$name"; done)"
  for path in "$DOWNLOADS"/*; do
    name=${path##*/}
    if [[ $pinned != *" ${name%.part} "* || $name != *.part ]]; then
      remove_tree "$path"
    fi
  done
  if [[ ! -f $STATE/installed && -n $(live_entries) ]]; then
    die "$TARGET holds files that gpubuild did not install (an earlier pip install?); empty it, or point GPUBUILD_TARGET at an empty folder"
  fi
}

# The unpacked set, plus the compressed shards that are downloaded at once (each is deleted
# as soon as it is unpacked).
check_space() {
  local available="" in_flight=0 index
  for (( index = 0; index < ${#BYTES[@]} && index < PARALLEL; index++ )); do
    in_flight=$(( in_flight + BYTES[index] ))
  done
  local needed=$(( TOTAL_RAW_BYTES + in_flight ))
  { read -r _ && read -r _ _ _ available _; } < <(df -Pk -- "$TARGET" 2>/dev/null) || true
  [[ $available =~ ^[0-9]+$ ]] || return 0
  available=$(( available * 1024 ))
  if (( available < needed )); then
    die "not enough space in $TARGET: the set needs $(format_mb "$TOTAL_RAW_BYTES") unpacked and $(format_mb "$in_flight") for the shards downloading at once, $(format_mb "$available") is free; raise the volume's sizeLimit (or lower GPUBUILD_PARALLEL)"
  fi
}

# --- downloading ----------------------------------------------------------------------------

shard_url() {
  printf '%s/blobs/%s.tar.zst' "$STORE_URL" "$1"
}

# curl reads the URL from a config on a pipe, so the SAS is not in its argv (ps) either.
curl_config() {
  local url
  url=$(shard_url "$1")
  if [[ -n $SAS ]]; then
    url="$url?$SAS"
  fi
  url=${url//\\/\\\\}
  printf 'url = "%s"\n' "${url//\"/\\\"}"
}

file_size() {
  stat -c %s -- "$1" 2>/dev/null || echo 0
}

# Why curl could not get a shard, as "<class> <message>" (see fetch_shard_once).
download_failure() {
  local sha=$1 rc=$2 err=$3 message code=""
  message=$(redact "$(sed -n '$p' "$err")")
  message=${message#curl: }
  if [[ $message =~ returned\ error:\ ([0-9]{3}) ]]; then
    code=${BASH_REMATCH[1]}
  fi
  if [[ ${STORE_URL,,} == file://* ]]; then
    local path
    path=$(shard_url "$sha")
    path=${path#file://}
    if [[ ! -e $path ]]; then
      echo "fatal the store has no blobs/$sha.tar.zst (missing at $path); publish the profile again (gpubuild publish-cache)"
    elif [[ ! -r $path ]]; then
      echo "fatal $path exists but this user ($EUID) may not read it (unreadable: its mode is $(stat -c %a -- "$path" 2>/dev/null)); make the store's blobs world-readable (chmod a+r)"
    else
      echo "transport $message (curl exit $rc)"
    fi
    return
  fi
  case $rc:$code in
    22:401 | 22:403)
      if [[ -n $SAS ]]; then
        echo "fatal the store refused access (HTTP $code, forbidden): the SAS from $SAS_SOURCE is missing, expired or lacks read permission; make a new one (gpubuild sas)"
      else
        echo "fatal the store refused access (HTTP $code, forbidden) and no SAS was given: an Azure container needs one (GPUBUILD_SAS or GPUBUILD_SAS_FILE); a web server must be allowed to read the store's blobs/ folder"
      fi
      ;;
    22:404)
      echo "fatal the store has no blobs/$sha.tar.zst (HTTP 404, missing); publish the profile again (gpubuild publish-cache)"
      ;;
    22:*)
      echo "transport HTTP $code from the store ($message)"
      ;;
    23:*)
      echo "fatal cannot write the download to $DOWNLOADS (is the volume full?): $message"
      ;;
    *)
      echo "transport $message (curl exit $rc)"
      ;;
  esac
}

# Downloads shard $1 into $2, resuming a part that an earlier attempt left; the response's
# headers go to $5 (for Retry-After).
download_shard() {
  local sha=$1 part=$2 bytes=$3 err=$4 headers=$5 have rc=0
  have=$(file_size "$part")
  if (( have > bytes )); then
    rm -f -- "$part"
    have=0
  fi
  (( have == bytes )) && return 0
  local -a resume=()
  (( have > 0 )) && resume=(--continue-at -)
  # curl's own --retry is not used: fetch_shard retries, with a message per attempt.
  curl --fail --silent --show-error --connect-timeout 15 \
    --speed-limit 1024 --speed-time "$STALL_SECONDS" "${resume[@]}" \
    --dump-header "$headers" --config <(curl_config "$sha") --output "$part" 2>"$err" || rc=$?
  if (( rc == 33 )); then
    # The server ignores Range requests: start this shard from its first byte.
    log "shard ${sha:0:12}: the store cannot resume a download; starting it again from 0"
    rm -f -- "$part"
    rc=0
    curl --fail --silent --show-error --connect-timeout 15 \
      --speed-limit 1024 --speed-time "$STALL_SECONDS" \
      --dump-header "$headers" --config <(curl_config "$sha") --output "$part" 2>"$err" || rc=$?
  fi
  return "$rc"
}

# Unpack slots: UNPACKERS tokens in a FIFO that every worker inherits open. A worker takes one
# (a blocking read of one byte, no polling) before it hashes and unpacks, and gives it back
# after, whatever happened. No timeout: bash 5.2's `read -t` on a FIFO shared by several
# readers can outlive its deadline in read(2), or take a byte and still report the timeout,
# which would lose the token. A token is only lost with the worker holding it, and a worker
# that ends without a result stops the whole run (fetch_all).
open_unpack_slots() {
  local count
  mkfifo -m 600 -- "$WORK/unpack-slots" "$WORK/tick" ||
    die "cannot create FIFOs in $WORK (a file system without them?); point TMPDIR at a local folder"
  exec {SLOTS_FD}<>"$WORK/unpack-slots" {TICK_FD}<>"$WORK/tick"
  for (( count = 0; count < UNPACKERS; count++ )); do
    printf x >&"$SLOTS_FD"
  done
}

# Sets SLOT_HELD to yes once a token is read (the status of read is not what says so).
take_unpack_slot() {
  local token=""
  SLOT_HELD=no
  read -r -n 1 -u "$SLOTS_FD" token || true
  if [[ $token == x ]]; then
    SLOT_HELD=yes
  fi
}

give_unpack_slot() {
  if [[ $SLOT_HELD == yes ]]; then
    printf x >&"$SLOTS_FD"
    SLOT_HELD=no
  fi
}

# One attempt at one shard: download (or resume), verify, and only then unpack. On failure
# prints "<class> <message>", the class being one of
#   transport  the store could not be reached or cut the stream (worth another attempt)
#   corrupt    the bytes are not the pinned ones (another attempt, then an integrity failure)
#   fatal      no point in trying again (HTTP 403/404, a full volume, a bad archive)
fetch_shard_once() {
  local sha=$1 bytes=$2 files=$3 blake3=$4 dir="$WORK/$1" part="$DOWNLOADS/$1.part" rc=0
  if ! { rm -rf -- "$dir" && mkdir -p -- "$dir"; }; then
    echo "fatal cannot create work files in $WORK"
    return 1
  fi
  download_shard "$sha" "$part" "$bytes" "$dir/curl.err" "$dir/headers" || rc=$?
  if (( rc != 0 )); then
    download_failure "$sha" "$rc" "$dir/curl.err"
    return 1
  fi
  take_unpack_slot
  unpack_verified "$sha" "$bytes" "$files" "$dir" "$part" "$blake3" || rc=$?
  give_unpack_slot
  return "$rc"
}

# Hashes the downloaded shard $5 and, only when it is the pinned one ($1 its sha256, $6 its
# BLAKE3 or "-"), unpacks it into staging and checks its member count (see fetch_shard_once).
unpack_verified() {
  local sha=$1 bytes=$2 files=$3 dir=$4 part=$5 blake3=$6
  local got="" size pinned=$1 algorithm=sha256
  size=$(file_size "$part")
  if [[ $HAS_B3SUM == yes && $blake3 != - ]]; then
    # b3sum maps the file (no copy through a read buffer); one thread: an unpack slot is a core.
    read -r got _ < <(b3sum --num-threads 1 --no-names "$part" 2>/dev/null) || true
    if [[ $got =~ ^[0-9a-f]{64}$ ]]; then
      pinned=$blake3 algorithm=BLAKE3
    else
      # A b3sum that hashes a pipe but not this file (a sandbox refusing its memory map, say)
      # must not read as tampering: the pinned sha256 proves the bytes as well.
      log "shard ${sha:0:12}: b3sum could not hash the download; checking its sha256 instead"
      got=""
    fi
  fi
  if [[ $algorithm == sha256 ]]; then
    read -r got _ < <("${HASHER[@]}" <"$part") || true
  fi
  if [[ -z $got || $got != "$pinned" || $size != "$bytes" ]]; then
    # Never unpacked, and never resumed: the next attempt downloads it whole.
    rm -f -- "$part"
    echo "corrupt $algorithm mismatch: got ${got:-nothing} ($size bytes), pinned $pinned ($bytes bytes)"
    return 1
  fi
  local -a codes
  : >"$dir/zstd.err"
  if [[ $EXTRACTOR == bsdtar ]]; then
    # bsdtar lists members on stderr ("x NAME"), beside its errors ("bsdtar: ...").
    codes=(0 0)
    bsdtar -x -v -f "$part" -C "$STAGING" "${BSDTAR_SAFE[@]}" 2>"$dir/tar.err" || codes=(0 "$?")
    grep '^x ' "$dir/tar.err" >"$dir/members" || true
  else
    zstd -d -q "${ZSTD_NO_CHECK[@]}" -c -- "$part" 2>"$dir/zstd.err" |
      tar -x -v -f - -C "$STAGING" --no-same-owner "${TAR_SAFE_LINKS[@]}" 2>"$dir/tar.err" >"$dir/members"
    codes=("${PIPESTATUS[@]}")
  fi
  rm -f -- "$part"
  if (( codes[1] != 0 )) && grep -q 'No space left on device' "$dir/tar.err"; then
    echo "fatal the volume at $TARGET is full (No space left on device); raise the emptyDir sizeLimit or the node's ephemeral storage"
    return 1
  fi
  if (( codes[0] != 0 || codes[1] != 0 )); then
    echo "fatal the shard has the pinned digest but does not unpack: $(grep -v '^x ' "$dir/zstd.err" "$dir/tar.err" | head -n 2 | cut -d: -f2- | tr '\n' ' ')"
    return 1
  fi
  local members
  members=$(grep -cv '/$' "$dir/members" || true)
  if (( members != files )); then
    echo "fatal it unpacked $members files where the manifest says $files"
    return 1
  fi
  return 0
}

# The seconds a Retry-After header in the headers file $1 asks for (0 without one), at most
# RETRY_AFTER_MAX; either form: seconds, or an HTTP date.
retry_after_seconds() {
  local value="" seconds=0
  if [[ -f $1 ]]; then
    value=$(grep -i '^retry-after:' "$1" | tail -n 1 | cut -d: -f2- | tr -d '\r') || value=""
  fi
  value=${value#"${value%%[![:space:]]*}"}
  value=${value%"${value##*[![:space:]]}"}
  if [[ $value =~ ^[0-9]{1,6}$ ]]; then
    seconds=$(( 10#$value ))
  elif [[ -n $value ]] && [[ $value =~ ^[A-Za-z0-9\ ,:-]{1,40}$ ]] && seconds=$(date -u -d "$value" +%s 2>/dev/null); then
    seconds=$(( seconds - $(date -u +%s) ))
  else
    seconds=0
  fi
  (( seconds > 0 )) || seconds=0
  (( seconds <= RETRY_AFTER_MAX )) || seconds=$RETRY_AFTER_MAX
  printf '%d' "$seconds"
}

# A random number from 0 to $1: bash's 32-bit SRANDOM where it has one (5.1+), else RANDOM.
random_upto() {
  local value=${SRANDOM:-$(( (RANDOM << 15) | RANDOM ))}
  printf '%d' $(( value % ($1 + 1) ))
}

# Milliseconds to wait after failed attempt $1 when the store asked for $2 seconds: full jitter
# over an exponential window, so that pods throttled together spread out instead of coming
# back in one wave.
retry_delay_ms() {
  local attempt=$1 after=$2 window=$BACKOFF_CAP_MS
  if (( attempt <= 15 )); then
    window=$(( BACKOFF_BASE_MS << (attempt - 1) ))
    (( window <= BACKOFF_CAP_MS )) || window=$BACKOFF_CAP_MS
  fi
  printf '%d' $(( after * 1000 + $(random_upto "$window") ))
}

# Every attempt at shard number $1; writes "$WORK/$1.result": "ok <ms>" or "<class> <message>",
# and "$WORK/$1.retries": how many attempts failed before the last.
fetch_shard() {
  local index=$1 sha=${SHAS[$1]} bytes=${BYTES[$1]} files=${FILES[$1]} blake3=${BLAKE3S[$1]}
  local attempt=1 started outcome class message after delay result
  while :; do
    started=$(now_ms)
    if outcome=$(fetch_shard_once "$sha" "$bytes" "$files" "$blake3"); then
      result="ok $(( $(now_ms) - started ))"
      break
    fi
    class=${outcome%% *}
    message=${outcome#* }
    if [[ $class == fatal ]]; then
      result="fatal $message"
      break
    fi
    if (( attempt >= RETRIES )); then
      if [[ $class == corrupt ]]; then
        result="integrity $message"
      else
        result="unreachable $message"
      fi
      break
    fi
    after=$(retry_after_seconds "$WORK/$sha/headers")
    delay=$(retry_delay_ms "$attempt" "$after")
    local waited=""
    (( after == 0 )) || waited=" (the store asked for ${after} s: Retry-After)"
    log "shard ${sha:0:12}: attempt $attempt of $RETRIES failed: $message; trying again in $(( delay / 1000 )).$(printf '%03d' $(( delay % 1000 ))) s$waited"
    sleep "$(( delay / 1000 )).$(printf '%03d' $(( delay % 1000 )))"
    attempt=$(( attempt + 1 ))
  done
  printf '%d\n' $(( attempt - 1 )) >"$WORK/$index.retries"
  printf '%s\n' "$result" >"$WORK/$index.result.tmp"
  mv -f -- "$WORK/$index.result.tmp" "$WORK/$index.result"
}

# Starts fetch_shard in a process group of its own, so that a failure can stop the others
# mid-download (job control is on only while starting it: left on, bash prints job notices).
start_worker() {
  set -m
  fetch_shard "$1" &
  set +m
  WORKERS[$!]=$1
}

stop_workers() {
  local pid
  for pid in "${!WORKERS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${!WORKERS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  WORKERS=()
}

load_shards() {
  SHAS=() BYTES=() FILES=() BLAKE3S=() LABELS=()
  local sha bytes files blake3 label
  while read -r sha bytes files blake3 label; do
    [[ -n $sha ]] || continue
    if [[ ! $sha =~ ^[0-9a-f]{64}$ || ! $bytes =~ ^[0-9]{1,15}$ || ! $files =~ ^[0-9]{1,9}$ ||
      ! $blake3 =~ ^([0-9a-f]{64}|-)$ ]]; then
      die "this script's shard table is damaged (line for ${sha:0:12}); generate it again (gpubuild init-script)"
    fi
    SHAS+=("$sha") BYTES+=("$bytes") FILES+=("$files") BLAKE3S+=("$blake3") LABELS+=("$label")
  done < <(shard_table)
}

make_skeleton() {
  mkdir -p -- "$STAGING" "$DOWNLOADS" || die "cannot create $STAGING"
  local -a folders=()
  local folder
  while IFS= read -r folder; do
    [[ -n $folder ]] && folders+=("$STAGING/$folder")
    if (( ${#folders[@]} >= 500 )); then
      mkdir -p -- "${folders[@]}" || die "cannot create the folders of the set in $STAGING (is the volume full?)"
      folders=()
    fi
  done < <(directory_skeleton)
  if (( ${#folders[@]} )); then
    mkdir -p -- "${folders[@]}" || die "cannot create the folders of the set in $STAGING (is the volume full?)"
  fi
}

# "1 file", "2,183 files".
count_of() {
  local number=$1 word=$2 text
  text=$(printf "%'d" "$number" 2>/dev/null) || text=$number
  if (( number == 1 )); then
    printf '%s %s' "$text" "$word"
  else
    printf '%s %ss' "$text" "$word"
  fi
}

# Downloads every shard, PARALLEL at once, biggest first. On failure sets FAILURE_CLASS
# (fatal, unreachable or integrity) and FAILURE, stops the other downloads, returns 1.
fetch_all() {
  FAILURE_CLASS=""
  FAILURE=""
  local count=${#SHAS[@]} next=0 finished=0 finished_bytes=0 started last_beat retried
  read_clock
  started=$NOW_MS
  last_beat=$started
  while (( finished < count )) && [[ -z $FAILURE_CLASS ]]; do
    while (( next < count && ${#WORKERS[@]} < PARALLEL )); do
      start_worker "$next"
      next=$(( next + 1 ))
    done
    local pid index result class rest
    for pid in "${!WORKERS[@]}"; do
      index=${WORKERS[$pid]}
      if [[ ! -f $WORK/$index.result ]] && kill -0 "$pid" 2>/dev/null; then
        continue
      fi
      wait "$pid" 2>/dev/null || true
      unset "WORKERS[$pid]"
      result="fatal its download process ended without a result"
      if [[ -f $WORK/$index.result ]]; then
        read -r result <"$WORK/$index.result"
      fi
      class=${result%% *}
      rest=${result#* }
      if [[ $class != ok ]]; then
        FAILURE_CLASS=$class
        FAILURE="shard ${SHAS[$index]:0:12} (${LABELS[$index]}) at $(shard_url "${SHAS[$index]}"): $rest"
        stop_workers
        break
      fi
      retried=0
      if [[ -f $WORK/$index.retries ]]; then
        read -r retried <"$WORK/$index.retries" || retried=0
      fi
      [[ $retried =~ ^[0-9]{1,6}$ ]] || retried=0
      RETRIED=$(( RETRIED + retried ))
      finished=$(( finished + 1 ))
      finished_bytes=$(( finished_bytes + BYTES[index] ))
      log "shard $finished/$count done: ${LABELS[$index]} $(format_mb "${BYTES[$index]}"), $(count_of "${FILES[$index]}" file) in $(format_seconds "$rest") ($(format_rate "${BYTES[$index]}" "$rest"))"
    done
    if (( ${#WORKERS[@]} )) && [[ -z $FAILURE_CLASS ]]; then
      # A tenth of a second, waited by bash itself: nothing ever writes to the tick FIFO.
      read -r -t 0.1 -u "$TICK_FD" _ || true
      read_clock
      if (( NOW_MS - last_beat >= 10000 )); then
        last_beat=$NOW_MS
        log "progress: $finished/$count shards, $(format_mb "$finished_bytes") of $(format_mb "$TOTAL_BYTES") after $(format_seconds $(( NOW_MS - started )))"
      fi
    fi
  done
  [[ -z $FAILURE_CLASS ]]
}

# --- the switch -----------------------------------------------------------------------------

write_marker() {
  if ! { printf '%s\n' "$2" >"$STATE/$1.tmp" && mv -f -- "$STATE/$1.tmp" "$STATE/$1"; }; then
    die "cannot write $STATE/$1"
  fi
}

switch_live() {
  local source=$1 entry
  write_marker incomplete "$DIGEST"
  # From here the staged set stops being whole (its entries move): never reuse it.
  rm -f -- "$STATE/installed" "$STATE/verified-$DIGEST"
  move_live_to_trash
  for entry in "$STAGING"/*; do
    if ! mv -- "$entry" "$TARGET/" 2>/dev/null; then
      # A folder this user may not write cannot be moved to another parent: make it writable.
      chmod -R u+rwX -- "$entry" 2>/dev/null || true
      mv -- "$entry" "$TARGET/" || die "cannot move $entry into $TARGET"
    fi
  done
  rmdir -- "$STAGING"
  write_marker installed "$DIGEST $source"
  # Removed last: until now a run that finds the target treats its live set as nothing.
  rm -f -- "$STATE/incomplete"
  remove_tree "$STATE/trash" "$DOWNLOADS"
}

# --- the pip fallback -----------------------------------------------------------------------

# The Python program that removes the profile's excluded distributions, by their RECORD.
exclude_program() {
  cat <<'GPUBUILD_EXCLUDE'
import csv, os, re, shutil, sys
root, names = sys.argv[1], {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2:]}
for entry in sorted(os.listdir(root)):
    if not entry.endswith(".dist-info"):
        continue
    name = re.sub(r"[-_.]+", "-", entry[: -len(".dist-info")].split("-")[0]).lower()
    if name not in names:
        continue
    record = os.path.join(root, entry, "RECORD")
    paths = []
    if os.path.isfile(record):
        with open(record, newline="", encoding="utf-8") as f:
            paths = [row[0] for row in csv.reader(f) if row]
    for path in paths:
        full = os.path.normpath(os.path.join(root, path))
        if full.startswith(root + os.sep) and os.path.lexists(full) and not os.path.isdir(full):
            os.remove(full)
    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    print(f"[gpubuild-init] WARNING: removed excluded {name} ({len(paths)} files)")
GPUBUILD_EXCLUDE
}

fallback_pip() {
  local why=$1
  log "WARNING: ======================================================================"
  log "WARNING: the store is unreachable: $why"
  log "WARNING: falling back to pip: installing the lock built into this script."
  log "WARNING: slow, and the packages come from the package index, not the store."
  log "WARNING: ======================================================================"
  local python=${GPUBUILD_PYTHON:-}
  if [[ -z $python ]]; then
    python=$(command -v python3 || command -v python || true)
  fi
  if [[ -z $python ]] || ! "$python" -m pip --version >/dev/null 2>&1; then
    die "the pip fallback needs a python with pip (set GPUBUILD_PYTHON, or run the init container on the worker image); the store failed with: $why"
  fi
  remove_tree "$STAGING"
  mkdir -p -- "$STAGING"
  fallback_lock >"$WORK/lock.txt"
  local -a index_args=()
  local url
  while IFS= read -r url; do
    [[ -n $url ]] && index_args+=(--extra-index-url "$url")
  done < <(fallback_indexes)
  local started
  started=$(now_ms)
  if ! "$python" -m pip install --no-deps --require-hashes --no-compile \
    --disable-pip-version-check --target "$STAGING" "${index_args[@]}" -r "$WORK/lock.txt" >&2; then
    die "the pip fallback failed too (see pip's output above); nothing was changed in $TARGET"
  fi
  local -a excluded=()
  mapfile -t excluded < <(fallback_excludes)
  if (( ${#excluded[@]} )); then
    "$python" - "$STAGING" "${excluded[@]}" >&2 < <(exclude_program) ||
      die "applying the profile's excludes after pip failed; nothing was changed in $TARGET"
  fi
  log "WARNING: installed by pip in $(format_seconds $(( $(now_ms) - started ))), not from the verified store"
}

# --- main -----------------------------------------------------------------------------------

declare -A WORKERS=()
declare -a SHAS=() BYTES=() FILES=() BLAKE3S=() LABELS=()
WORK=""
RETRIED=0
NOW_MS=0
SLOTS_FD=""
TICK_FD=""
SLOT_HELD=no
HAS_B3SUM=no

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  if (( ${#WORKERS[@]} )); then
    stop_workers
  fi
  # A failed run leaves the target as it found it: the staged part goes. Partial downloads
  # stay only when the store could not be reached, for the next run to resume.
  if (( code != 0 )) && [[ -n ${STAGING:-} && -d $STAGING && ! -e $STATE/verified-$DIGEST ]]; then
    remove_tree "$STAGING"
  fi
  if (( code != 0 )) && [[ -n ${DOWNLOADS:-} && -d $DOWNLOADS ]]; then
    if [[ ${FAILURE_CLASS:-} == unreachable ]]; then
      rmdir -- "$DOWNLOADS" 2>/dev/null || true
    else
      remove_tree "$DOWNLOADS"
    fi
  fi
  if [[ -n $WORK ]]; then
    rm -rf -- "$WORK"
  fi
  exit "$code"
}

make_work_dir() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpubuild-init.XXXXXX" 2>/dev/null) && return 0
  WORK="$STATE/work"
  mkdir -p -- "$WORK" || die "cannot create a work folder in ${TMPDIR:-/tmp} or $STATE"
}

main() {
  local started
  started=$(now_ms)
  trap cleanup EXIT
  trap 'log "stopped by a signal"; exit 143' INT TERM
  read_settings
  check_tools
  report_sas_expiry
  take_lock
  recover
  local pip_installed=no
  if [[ $(installed_digest) == "$DIGEST" ]]; then
    if [[ $(installed_source) != pip ]]; then
      log "$PROFILE $DIGEST is already installed in $TARGET; nothing to do"
      return 0
    fi
    # A pip fallback is not the verified set: replace it as soon as the store answers.
    log "$PROFILE $DIGEST was installed by the pip fallback; trying the verified store again"
    pip_installed=yes
  fi
  make_work_dir
  local fetch_started source=store
  fetch_started=$(now_ms)
  if [[ -e $STATE/verified-$DIGEST && -d $STAGING ]]; then
    log "an earlier run left a complete, verified copy of $DIGEST; switching to it"
    source=$(<"$STATE/verified-$DIGEST")
  else
    load_shards
    check_space
    log "installing $PROFILE $DIGEST into $TARGET: $(count_of "${#SHAS[@]}" shard), $(format_mb "$TOTAL_BYTES") to download, $(format_mb "$TOTAL_RAW_BYTES") and $(count_of "$TOTAL_FILES" file) unpacked"
    log "store $(redact "$STORE_URL") (SAS: $SAS_SOURCE); $PARALLEL downloads at once ($RETRIES attempts each), $UNPACKERS unpacking at once ($(count_of "$CORES" core) usable, by $CORES_FROM); unpacking with $( [[ $EXTRACTOR == bsdtar ]] && echo bsdtar || echo 'zstd | GNU tar'), checking $(checksum_tool)"
    make_skeleton
    open_unpack_slots
    if ! fetch_all; then
      if [[ $FAILURE_CLASS == unreachable && $pip_installed == yes ]]; then
        log "WARNING: $FAILURE; keeping the set the pip fallback installed earlier"
        return 0
      fi
      case $FAILURE_CLASS:$FALLBACK in
        unreachable:pip)
          fallback_pip "$FAILURE"
          source=pip
          ;;
        integrity:*)
          die "$FAILURE. The store holds other bytes than this script pins: do not trust it: delete the damaged blobs/<sha256>.tar.zst named above from the store, then publish the profile again (gpubuild publish-cache --repair); nothing was changed in $TARGET"
          ;;
        unreachable:*)
          die "$FAILURE. No luck after $RETRIES attempts: check GPUBUILD_STORE_URL and the pod's network; nothing was changed in $TARGET"
          ;;
        *)
          die "$FAILURE; nothing was changed in $TARGET"
          ;;
      esac
    fi
    write_marker "verified-$DIGEST" "$source"
  fi
  local fetched=$(( $(now_ms) - fetch_started ))
  local retried_text="$RETRIED retries"
  (( RETRIED != 1 )) || retried_text="1 retry"
  switch_live "$source"
  log "done: $PROFILE $DIGEST installed in $TARGET from the $source: $(format_mb "$TOTAL_BYTES") in $(count_of "$SHARD_COUNT" shard), $(count_of "$TOTAL_FILES" file); $(format_seconds $(( $(now_ms) - started ))) in all ($(format_rate "$TOTAL_BYTES" "$fetched") download and unpack; $retried_text)"
}

main "$@"
