# Sourced by the recipes' run.sh: `stage NAME CMD...` runs CMD, prints it, and records its wall time (seconds) under
# NAME in $TIMINGS (a JSON object, created if absent).
mkdir -p "$(dirname "$TIMINGS")"
[ -f "$TIMINGS" ] || echo '{}' > "$TIMINGS"

stage() {  # stage NAME CMD...: run, time, record
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: $*"
  "$@"
  python - "$TIMINGS" "$name" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
path, name, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = json.load(open(path)); t[name] = secs; json.dump(t, open(path, "w"), indent=1)
PY
}
