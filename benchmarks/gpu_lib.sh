# The budgeted parts of the gpu_*.sh scripts, sourced by them (`source benchmarks/gpu_lib.sh`):
# device calls are cut at 600 s, so each part runs under `timeout`, clipped to what is left of
# the script's budget, and is skipped when too little is left for it to say anything.
#   part_budget SECONDS [FROM]  the budget ends SECONDS after FROM (epoch seconds; default now)
#   fits GIB NAME  before a part that needs GIB of the card's memory: skipped (said) if not
#   by_card H200_WORDS OTHER_WORDS  the first if the card is an H200, else the second
#   part NAME TIMEOUT_S CMD...  runs CMD into $PART_DIR/NAME$PART_EXT, then prints a summary
#     PART_ONLY   names to run, space-separated; empty: every part
#     PART_MIN_S  a part with fewer seconds of the budget left is skipped (default 30)
#     PART_DIR, PART_EXT  where its output goes (default $OUT, .log)
#     PART_CUT    characters of the log's last line in the summary (default 300)
# `part` returns 0 and sets PART_RAN=1 if it ran, 0 if not asked for or skipped. A script may
# redefine part_say (how lines are printed) and part_done NAME RC SECONDS LOG LIMIT (the summary).

# The card's SM clock, power draw and throttle reasons every 100 ms into FILE until clock_log_stop
# (benchmarks/clock_summary.py FILE RESULT.json... sets them beside each side's timed steps): a
# card at its power limit slows whatever runs on it.
clock_log() {  # FILE
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 100 > "$1" 2>&1 &
  CLOCK_LOG_PID=$!
  trap clock_log_stop EXIT  # a script that stops early leaves no sampler behind
}

clock_log_stop() {
  if [ -n "${CLOCK_LOG_PID:-}" ]; then
    kill "$CLOCK_LOG_PID" 2>/dev/null
    wait "$CLOCK_LOG_PID" 2>/dev/null
  fi
  CLOCK_LOG_PID=
}

# The first card's memory in whole GiB (0 where nvidia-smi does not answer with a number).
card_gib() {
  local mib
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  [[ "$mib" =~ ^[0-9]+$ ]] || mib=0
  echo $((mib / 1024))
}

# The first card's model as nvidia-smi names it ("NVIDIA H200", "NVIDIA H100 80GB HBM3"; empty
# where it does not answer).
card_name() {
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
}

# H200_WORDS if the first card is an H200, else OTHER_WORDS: a call that asks for any card
# runs what is queued for the one that came.
by_card() {  # H200_WORDS OTHER_WORDS
  if [[ "$(card_name)" == *H200* ]]; then echo "$1"; else echo "$2"; fi
}

# Whether a part needing GIB of the card's memory fits it (CARD_GIB, card_gib's if unset); if not,
# says NAME is skipped where PART_ONLY asks for it (or is empty), so that no device time goes to
# a run that can only end out of memory.
fits() {  # GIB NAME
  local have=${CARD_GIB:-$(card_gib)}
  [ "$have" -ge "$1" ] && return 0
  if [ -z "${PART_ONLY:-}" ] || [[ " $PART_ONLY " == *" $2 "* ]]; then
    part_say "$2 skipped (needs ~$1 GiB of the card's memory, this one has $have)"
  fi
  return 1
}

part_budget() { PART_DEADLINE=$((${2:-$(date +%s)} + $1)); }

part_left() { echo $((PART_DEADLINE - $(date +%s))); }

part_say() { echo "$*"; }

part_done() {  # name rc seconds log limit
  part_say "$1 exit $2 in $3 s: $(tail -1 "$4" | cut -c 1-"${PART_CUT:-300}")"
}

part() {  # name timeout_s command...
  local name=$1 limit=$2 left t rc log
  shift 2
  PART_RAN=0
  if [ -n "${PART_ONLY:-}" ] && [[ " $PART_ONLY " != *" $name "* ]]; then return 0; fi
  left=$(part_left)
  if [ "$left" -lt "${PART_MIN_S:-30}" ]; then part_say "$name skipped (budget spent)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log=${PART_DIR:-$OUT}/$name${PART_EXT:-.log}
  t=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  PART_RAN=1
  part_done "$name" "$rc" "$(($(date +%s) - t))" "$log" "$limit"
}

# The code a call ran, as a digest of the Python and shell files under toolkit/ and benchmarks/
# (the device's copy of .git can lag the tree sent with the call, so its HEAD may name an older
# commit). `bash -c 'source benchmarks/gpu_lib.sh; tree_digest'` here names the same tree.
tree_digest() {
  find toolkit benchmarks -type f \( -name '*.py' -o -name '*.sh' \) | LC_ALL=C sort |
    xargs sha1sum | sha1sum | cut -c 1-12
}

# Inductor's compiled blocks in .gpu/inductor for this and later processes, unpacked from the
# parts an earlier call brought back (gpu_train.sh writes them; carry them in .dev/).
inductor_cache() {
  export TORCHINDUCTOR_CACHE_DIR=$PWD/.gpu/inductor
  if [ ! -d .gpu/inductor ] && ls .dev/inductor.tar.xz.part* > /dev/null 2>&1; then
    mkdir -p .gpu && cat .dev/inductor.tar.xz.part* | tar xJf - -C .gpu
  fi
}
