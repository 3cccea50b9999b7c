#!/bin/bash
# The systemd tier, guest side (tests/tests/systemd.rs builds the payload around it). Runs as
# chaos-guest-run.service once a Debian 12 guest has booted with systemd as PID 1, does what a sysadmin does
# with the package and the service, and prints one `RESULT <step> pass|fail key=value …` line per step on the
# serial console (`DETAIL <step>: …` says why a step failed), then `GUEST-DONE exit=<failed steps>`, and powers
# the guest off. Steps run in order; a failed step does not stop the run (later steps say what they can).
#
# Timing: lifetimes are seconds; the checks poll every 0.05 s without starting programs; `ended_s`/`resumed_s`
# values are seconds since the fault's request returned (so lifetime + 2 s is a bound on the agent, not on how
# long the CLI took under TCG), other `*_s` values seconds since the step began, as measured in the guest.
set -u
# Packages come and go (/usr/bin/lymph-chaos, then /usr/local/bin/lymph-chaos): look commands up again.
shopt -s checkhash
exec 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
P=/payload
# shellcheck source=/dev/null
. "$P/env" # REPO_ROOT: where `cargo xtask` finds chaos-agent/dist (the host's workspace path)

failures=0
result() { # step pass|fail values…
    local step=$1 verdict=$2
    shift 2
    echo "RESULT $step $verdict $* uptime=$(uptime_s)"
    [ "$verdict" = pass ] || failures=$((failures + 1))
}
check() { # step "values" command… — pass when the command succeeds
    local step=$1 values=$2
    shift 2
    if "$@"; then result "$step" pass "$values"; else result "$step" fail "$values"; fi
}
detail() { echo "DETAIL $*"; }
# Time: integer microseconds from bash's $EPOCHREALTIME, sleeping with `read -t` on a FIFO nobody writes: the
# polling loops below run no program at all, so a busy TCG guest still notices a change within ~0.1 s.
mkfifo /tmp/.nap && exec 9<>/tmp/.nap
nap() { read -r -t "$1" -u 9 _ || true; }
now() { echo "${EPOCHREALTIME/./}"; }
secs() { printf '%d.%02d' $(($1 / 1000000)) $(($1 % 1000000 / 10000)); } # µs → "12.34"
elapsed() { secs $((${EPOCHREALTIME/./} - $1)); }                          # since t0 (µs)
wait_for() { # seconds command… — poll every 0.05 s until the command succeeds
    local deadline=$((${EPOCHREALTIME/./} + $1 * 1000000))
    shift
    until "$@"; do
        [ "${EPOCHREALTIME/./}" -ge "$deadline" ] && return 1
        nap 0.05
    done
}
uptime_s() { local u; read -r u _ </proc/uptime; echo "$u"; }

main_pid() { systemctl show -p MainPID --value lymph-chaos; }
agent_ok() { lymph-chaos --timeout 3 status >/dev/null 2>&1; }
agent_up_since() { # old main pid — a new agent answers
    local pid
    pid=$(main_pid)
    [ "$pid" != 0 ] && [ "$pid" != "$1" ] && agent_ok
}
zk_up() { (exec 3<>/dev/tcp/127.0.0.1/2181) 2>/dev/null; }
# Milliseconds to open a TCP connection to the test's listener on port 7777 (the port of the latency faults).
PORT=7777
connect_ms() {
    local t=${EPOCHREALTIME/./}
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null || { echo 99999; return; }
    echo $(((${EPOCHREALTIME/./} - t) / 1000))
}
slow() { [ "$(connect_ms)" -ge 250 ]; }
fast() { [ "$(connect_ms)" -lt 150 ]; }
proc_state() { # pid — R, S, T (stopped) …, empty when gone
    local l
    read -r l <"/proc/$1/stat" 2>/dev/null || return 0
    l=${l##*) }
    echo "${l%% *}"
}
running() { # pid — alive and not stopped (no subshell: polled)
    local l
    read -r l <"/proc/$1/stat" 2>/dev/null || return 1
    l=${l##*) }
    [ "${l%% *}" != T ]
}
victim_cgroup() { echo /sys/fs/cgroup/system.slice/chaos-victim.service/cgroup.procs; }
workers() { # load workers placed in the victim's cgroup
    local pid n=0
    while read -r pid; do [ "$pid" = "$VICTIM" ] || n=$((n + 1)); done <"$(victim_cgroup)"
    echo "$n"
}
no_workers() { [ "$(workers)" -eq 0 ]; }
fill_files() { # disk-fill files in the two fill directories
    local f n=0
    for f in /var/lib/lymph-chaos/.lymph-chaos-fill-* /tmp/.lymph-chaos-fill-*; do [ -e "$f" ] && n=$((n + 1)); done
    echo "$n"
}
no_fill_files() { [ "$(fill_files)" -eq 0 ]; }
guardian_pid() { cat /run/lymph-chaos/guardian.pid 2>/dev/null; }
alive() { [ -n "$1" ] && [ -d "/proc/$1" ] && [ "$(proc_state "$1")" != Z ]; }
gone() { ! alive "$1"; }
# Kernel objects of ours: the IFB device, the pinned maps, tc filters running our classifier, BPF programs.
our_objects() {
    local n=0
    ip link show lchaos0 >/dev/null 2>&1 && n=$((n + 1))
    [ -e /sys/fs/bpf/lymph-chaos ] && n=$((n + 1))
    n=$((n + $(tc filter show dev lo egress 2>/dev/null | grep -c chaos)))
    n=$((n + $(tc filter show dev lo ingress 2>/dev/null | grep -c chaos)))
    n=$((n + $(bpftool prog show 2>/dev/null | grep -c chaos_)))
    echo "$n"
}
no_objects() { [ "$(our_objects)" -eq 0 ]; }
# Waits until `limit` s after `t0` (µs) for `cond`; prints the seconds since t0 it took (or "never").
time_until() { # t0 limit cond…
    local t0=$1 deadline=$(($1 + $2 * 1000000))
    shift 2
    until "$@"; do
        if [ "${EPOCHREALTIME/./}" -ge "$deadline" ]; then
            echo never
            return
        fi
        nap 0.05
    done
    elapsed "$t0"
}
within() { # "12.34"|never limit_s
    [ "$1" != never ] || return 1
    local c=${1/./}
    [ $((10#$c)) -le $(($2 * 100)) ]
}
at_least() { # "12.34"|never limit_s
    [ "$1" != never ] || return 1
    local c=${1/./}
    [ $((10#$c)) -ge $(($2 * 100)) ]
}
# watch name t0 limit cond… — in the background, time_until into /tmp/watch.<name> (read it after `wait`).
watch() {
    local name=$1
    shift
    rm -f "/tmp/watch.$name"
    (time_until "$@" >"/tmp/watch.$name") &
}
sleep_until() { # t0 offset_s — sleep until t0 (µs) + offset
    local d=$(($1 + $2 * 1000000 - ${EPOCHREALTIME/./}))
    [ "$d" -gt 0 ] && nap "$(secs "$d")"
}
apply() { # step command… — apply a fault; fails the step with the CLI's words when refused
    local step=$1 out
    shift
    if out=$("$@" 2>&1); then return 0; fi
    detail "$step: $* -> $(echo "$out" | tr '\n' ' ')"
    return 1
}
# apply_bg name step command… — apply a fault in the background; /tmp/applied.<name> gets the time (µs) the CLI
# returned, by which the fault's lifetime has started (or "fail"). Read it with `applied` after `wait`.
apply_bg() {
    local name=$1
    shift
    rm -f "/tmp/applied.$name"
    (if apply "$@"; then now >"/tmp/applied.$name"; else echo fail >"/tmp/applied.$name"; fi) &
}
applied() { cat "/tmp/applied.$1" 2>/dev/null || echo fail; }
all_applied() { local n; for n in "$@"; do [ "$(applied "$n")" != fail ] || return 1; done; }
diagnose() { # step — the service's state and last log lines, as DETAIL lines
    systemctl status --no-pager -l lymph-chaos 2>&1 | tail -12 | sed "s/^/DETAIL $1: status| /"
    journalctl -u lymph-chaos -n 12 --no-pager -o cat 2>&1 | sed "s/^/DETAIL $1: journal| /"
}
zk_registered() { lymph-chaos --via-zookeeper 127.0.0.1:2181 --timeout 3 status >/dev/null 2>&1; }

echo "GUEST-BOOT uptime=$(uptime_s) kernel=$(uname -r)"

# --- The machine: systemd as PID 1, ZooKeeper from Debian -------------------------------------------------------
state=$(systemctl is-system-running 2>/dev/null)
check systemd-pid1 "init=$(readlink /proc/1/exe) state=$state uptime=$(uptime_s)" \
    grep -q systemd /proc/1/comm
t=$(now)
check zookeeper-listening "after_s=$(time_until "$t" 180 zk_up)" zk_up

# --- apt-get install ./lymph-chaos_….deb: enabled, active, answering, registered ------------------------------
cd "$P" || exit 1
t=$(now)
if apt-get install -y --no-install-recommends ./lymph-chaos_*_*.deb >/tmp/apt-install.log 2>&1; then rc=0; else
    rc=$?
    detail "deb-install: $(tail -5 /tmp/apt-install.log | tr '\n' ' ')"
fi
check deb-install "s=$(elapsed "$t")" test "$rc" -eq 0
check unit-enabled "is_enabled=$(systemctl is-enabled lymph-chaos 2>&1)" \
    test "$(systemctl is-enabled lymph-chaos 2>&1)" = enabled
up=$(time_until "$t" 90 agent_ok)
check unit-active-answering "is_active=$(systemctl is-active lymph-chaos) answered_s=$up" \
    test "$(systemctl is-active lymph-chaos)" = active -a "$up" != never
[ "$up" = never ] && diagnose unit-active-answering
zk=$(time_until "$(now)" 90 zk_registered)
check registered-in-zookeeper "found_s=$zk" test "$zk" != never
[ "$zk" = never ] && detail "registered-in-zookeeper: $(lymph-chaos --via-zookeeper 127.0.0.1:2181 status 2>&1 | tail -2 | tr '\n' ' ')"
check man-page-and-completions "pages=$(ls /usr/share/man/man1/lymph-chaos*.1.gz 2>/dev/null | wc -l)" \
    bash -c 'zcat /usr/share/man/man1/lymph-chaos.1.gz | grep -q "^\.TH" &&
        . /usr/share/bash-completion/completions/lymph-chaos && complete -p lymph-chaos >/dev/null &&
        test -s /usr/share/zsh/vendor-completions/_lymph-chaos &&
        test -s /usr/share/fish/vendor_completions.d/lymph-chaos.fish'
if apt-get install -y ./lymph-chaos-dbgsym_*_*.deb >/tmp/apt-dbgsym.log 2>&1; then rc=0; else rc=$?; fi
debug_file=$(dpkg -L lymph-chaos-dbgsym 2>/dev/null | grep '\.debug$')
check dbgsym-install "file=$debug_file" test "$rc" -eq 0 -a -s "$debug_file"

# The guardian lives in a scope of its own, outside the service's control group.
gpid=$(guardian_pid)
scope=lymph-chaos-guardian-$(main_pid).scope
check guardian-own-scope "pid=$gpid scope=$scope cgroup=$(cut -d: -f3 "/proc/$gpid/cgroup" 2>/dev/null)" \
    bash -c "systemctl is-active --quiet $scope && grep -q '/$scope\$' /proc/$gpid/cgroup &&
        grep -q '^lymph-chaos-guardian' /proc/$gpid/cmdline"

# The hardened unit.
systemd-analyze security --no-pager lymph-chaos.service 2>&1 | sed 's/^/SECURITY| /'
exposure=$(systemd-analyze security --no-pager lymph-chaos.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for lymph-chaos.service: \([0-9.]*\).*/\1/p')
check security-exposure "exposure=$exposure" awk -v e="${exposure:-10}" 'BEGIN { exit !(e <= 5.0) }'
check limits "nofile=$(grep 'Max open files' /proc/"$(main_pid)"/limits | awk '{print $4"/"$5}')" \
    bash -c "grep 'Max open files' /proc/$(main_pid)/limits | grep -q 65536"

# --- The administrator allows a test process as a target, restarts -------------------------------------------
sed -i 's/^  allowed_processes: \[\]$/  allowed_processes: [chaos-victim]/' /etc/lymph-chaos/config.yml
# ... and the directories its disk faults fill (the tests fill the state directory's filesystem and /tmp).
sed -i 's|^  disk_paths: \[/var/lib/lymph-chaos/fill\]$|  disk_paths: [/var/lib/lymph-chaos, /tmp]|' /etc/lymph-chaos/config.yml
old=$(main_pid)
t=$(now)
systemctl restart lymph-chaos
up=$(time_until "$t" 60 agent_up_since "$old")
check systemctl-restart "old_pid=$old new_pid=$(main_pid) answered_s=$up" \
    bash -c "grep -q 'allowed_processes: \[chaos-victim\]' /etc/lymph-chaos/config.yml && test '$up' != never"

# journald stamps each line: the agent's own lines carry no second time stamp.
lines=$(journalctl -u lymph-chaos -o cat --no-pager | grep -c .)
stamped=$(journalctl -u lymph-chaos -o cat --no-pager | grep -c -E '^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}')
ready=$(journalctl -u lymph-chaos -o cat --no-pager | grep -c 'lymph-chaos agent ready')
check journald-single-timestamps "lines=$lines stamped=$stamped ready=$ready" \
    test "$lines" -gt 0 -a "$stamped" -eq 0 -a "$ready" -ge 2
[ "$stamped" -eq 0 ] || detail "journald-single-timestamps: $(journalctl -u lymph-chaos -o cat --no-pager | grep -m2 -E '^[0-9]{4}-')"

# The target: a process the test starts in a service of its own.
systemd-run --quiet --unit=chaos-victim bash -c 'exec -a chaos-victim sleep 1000000'
wait_for 10 bash -c '[ "$(systemctl show -p MainPID --value chaos-victim)" != 0 ]'
VICTIM=$(systemctl show -p MainPID --value chaos-victim)
check victim-started "pid=$VICTIM" running "$VICTIM"
# Named so that faults.allowed_processes ([chaos-victim]) lets the latency faults at its port through.
systemd-run --quiet --unit=chaos-listener bash -c "exec -a chaos-victim-listener nc -lk 127.0.0.1 $PORT"
up=$(time_until "$(now)" 10 fast)
check listener-started "port=$PORT listening_s=$up connect_ms=$(connect_ms)" test "$up" != never

# --- kill -9 of the agent while faults are active: systemd restarts it; every fault ends on time ------------------
# Each fault's end is watched in the background from the moment it is applied, so waiting for one thing never
# delays noticing another. With these lifetimes the restarted agent comes back before they end and undoes the
# faults the dead agent left (its journal); the guardian of the dead agent is stopped by the new agent.
L=30
tp=$(now)
apply_bg pause kill9-faults lymph-chaos pause --pid "$VICTIM" --lifetime "$L"
apply_bg cpu kill9-faults lymph-chaos inject cpu --pid "$VICTIM" workers=1 in_target_cgroup=true --lifetime "$L"
apply_bg latency kill9-faults lymph-chaos latency --port "$PORT" 0.3 --lifetime "$L"
apply_bg fill1 kill9-faults lymph-chaos inject disk path=/var/lib/lymph-chaos mib=4 --lifetime "$L"
apply_bg fill2 kill9-faults lymph-chaos inject disk path=/tmp mib=4 --lifetime "$L"
wait
ok=0
all_applied pause cpu latency fill1 fill2 || ok=1
st=$(proc_state "$VICTIM")
w=$(workers)
c=$(connect_ms)
f=$(fill_files)
check kill9-faults-active "applied=$((ok == 0)) apply_s=$(elapsed "$tp") paused=$st workers=$w connect_ms=$c fills=$f" \
    test "$ok" -eq 0 -a "$st" = T -a "$w" -ge 1 -a "$c" -ge 250 -a "$f" -eq 2
old=$(main_pid)
gpid=$(guardian_pid)
# Each end is timed from the moment its request returned (the latest its lifetime can have started).
watch pause "$(applied pause)" $((L + 2)) running "$VICTIM"
watch cpu "$(applied cpu)" $((L + 2)) no_workers
watch latency "$(applied latency)" $((L + 2)) fast
watch fill "$(applied fill2)" $((L + 2)) no_fill_files
kill -9 "$old"
tk=$(now)
killed_at=$(secs $((tk - tp)))
nap 0.5
check kill9-guardian-survives "agent=$old guardian=$gpid killed_at_s=$killed_at" alive "$gpid"
restart=$(time_until "$tk" 60 agent_up_since "$old")
restarted_at=$(elapsed "$tp")
wait
check kill9-restarted "restart_s=$restart restarted_at_s=$restarted_at new_pid=$(main_pid)" test "$restart" != never
for fault in pause cpu latency fill; do
    ended=$(cat "/tmp/watch.$fault")
    check "kill9-$fault-ended" "ended_s=$ended lifetime_s=$L killed_at_s=$killed_at restarted_at_s=$restarted_at" \
        within "$ended" $((L + 2))
done
undone=$(grep -c '"undid faults left by an earlier run"' /var/log/lymph-chaos/events.jsonl 2>/dev/null)
check kill9-old-guardian-stopped "undone_events=$undone new_guardian=$(guardian_pid)" \
    bash -c "! test -d /proc/$gpid && systemctl is-active --quiet lymph-chaos-guardian-$(main_pid).scope"

# --- A crash loop hits the start limit: no agent any more, the last run's guardian ends its faults on time -------
systemctl reset-failed lymph-chaos
cycles=0
for _ in 1 2 3; do
    old=$(main_pid)
    kill -9 "$old"
    if [ "$(time_until "$(now)" 60 agent_up_since "$old")" != never ]; then cycles=$((cycles + 1)); fi
done
LB=20
tp=$(now)
apply_bg pause start-limit-faults lymph-chaos pause --pid "$VICTIM" --lifetime "$LB"
apply_bg latency start-limit-faults lymph-chaos latency --port "$PORT" 0.3 --lifetime "$LB"
wait
ok=0
all_applied pause latency || ok=1
gpid=$(guardian_pid)
watch pause "$(applied pause)" $((LB + 2)) running "$VICTIM"
watch latency "$(applied latency)" $((LB + 2)) fast
kill -9 "$(main_pid)"
tk=$(now)
# systemd refuses the restart ("Start request repeated too quickly") and leaves the unit failed.
given_up() {
    [ "$(systemctl is-active lymph-chaos)" = failed ] &&
        journalctl -u lymph-chaos --no-pager -o cat | grep -q 'Start request repeated too quickly'
}
hit=$(time_until "$tk" 30 given_up)
nap 3 # well past RestartSec: no new agent
check start-limit-hit "restarts=$cycles given_up_s=$hit state=$(systemctl is-active lymph-chaos) main_pid=$(main_pid)" \
    test "$ok" -eq 0 -a "$cycles" -eq 3 -a "$hit" != never -a "$(main_pid)" = 0
# Still on 2 s before the earliest the lifetimes can end (they started after tp): nobody reverted early …
sleep_until "$tp" $((LB - 2))
early_state=$(proc_state "$VICTIM")
early_ms=$(connect_ms)
check start-limit-faults-kept "at_s=$(elapsed "$tp") paused=$early_state connect_ms=$early_ms guardian_alive=$(alive "$gpid" && echo yes || echo no)" \
    test "$early_state" = T -a "$early_ms" -ge 250
# … and off on time, with no agent running: the guardian did it.
wait
resumed=$(cat /tmp/watch.pause)
unslowed=$(cat /tmp/watch.latency)
check start-limit-pause-ended "resumed_s=$resumed lifetime_s=$LB agent=$(systemctl is-active lymph-chaos)" \
    within "$resumed" $((LB + 2))
check start-limit-latency-ended "normal_s=$unslowed lifetime_s=$LB" within "$unslowed" $((LB + 2))
left=$(time_until "$tp" $((LB + 20)) gone "$gpid")
objects=$(our_objects)
check start-limit-guardian-cleans-up "guardian_exit_s=$left objects=$objects" test "$left" != never -a "$objects" -eq 0

# --- systemctl stop reverts everything and leaves no kernel object of ours ----------------------------------------
systemctl reset-failed lymph-chaos
systemctl start lymph-chaos
check start-after-reset "answered_s=$(time_until "$(now)" 60 agent_ok)" agent_ok
apply_bg pause stop-faults lymph-chaos pause --pid "$VICTIM" --lifetime 300
apply_bg cpu stop-faults lymph-chaos inject cpu --pid "$VICTIM" workers=1 in_target_cgroup=true --lifetime 300
apply_bg latency stop-faults lymph-chaos latency --port "$PORT" 0.3 --lifetime 300
apply_bg fill stop-faults lymph-chaos inject disk path=/var/lib/lymph-chaos mib=4 --lifetime 300
wait
ok=0
all_applied pause cpu latency fill || ok=1
gpid=$(guardian_pid)
nap 0.3
before="paused=$(proc_state "$VICTIM") workers=$(workers) objects=$(our_objects)"
t=$(now)
systemctl stop lymph-chaos
stop_s=$(elapsed "$t")
nap 0.3
st=$(proc_state "$VICTIM")
w=$(workers)
c=$(connect_ms)
f=$(fill_files)
o=$(our_objects)
check stop-reverts-everything "$before applied=$((ok == 0)) stop_s=$stop_s state=$st workers=$w connect_ms=$c fills=$f objects=$o" \
    test "$ok" -eq 0 -a "$st" != T -a "$w" -eq 0 -a "$c" -lt 150 -a "$f" -eq 0 -a "$o" -eq 0 -a ! -e /run/lymph-chaos/agent.pid
check stop-dismisses-guardian "guardian=$gpid" wait_for 5 gone "$gpid"

# --- apt-get remove, then purge: nothing left behind ---------------------------------------------------------------
systemctl start lymph-chaos
wait_for 60 agent_ok
dpkg -L lymph-chaos lymph-chaos-dbgsym 2>/dev/null | sort >/tmp/package-files
# Removing the package removes its -dbgsym too (which depends on it).
if apt-get remove -y lymph-chaos >/tmp/apt-remove.log 2>&1; then rc=0; else
    rc=$?
    detail "apt-remove: $(tail -5 /tmp/apt-remove.log | tr '\n' ' ')"
fi
dbgsym=$(dpkg-query -W -f '${Status}' lymph-chaos-dbgsym 2>/dev/null)
check apt-remove "rc=$rc agent_running=$(pgrep -c -x lymph-chaos) conffile=$(test -e /etc/lymph-chaos/config.yml && echo kept) dbgsym=${dbgsym:-gone}" \
    test "$rc" -eq 0 -a "$(pgrep -c -x lymph-chaos)" -eq 0 -a ! -e /usr/bin/lymph-chaos -a -e /etc/lymph-chaos/config.yml \
    -a "$(our_objects)" -eq 0 -a -z "$dbgsym"
if apt-get purge -y lymph-chaos >/tmp/apt-purge.log 2>&1; then rc=0; else
    rc=$?
    detail "apt-purge-leaves-nothing: $(tail -5 /tmp/apt-purge.log | tr '\n' ' ')"
fi
leftover=$(
    # Files and links the packages installed (not directories, nor links to directories such as /lib).
    while read -r f; do
        { [ -f "$f" ] && [ ! -L "$f" ]; } || { [ -L "$f" ] && [ ! -d "$f" ]; } && echo "$f"
    done </tmp/package-files
    for d in /etc/lymph-chaos /run/lymph-chaos /var/log/lymph-chaos /var/lib/lymph-chaos /sys/fs/bpf/lymph-chaos; do
        [ -e "$d" ] && echo "$d"
    done
    find /etc/systemd /lib/systemd /usr/lib/systemd /run/systemd/system /var/lib/systemd -name '*lymph-chaos*' 2>/dev/null
    getent passwd lymph-chaos
    getent group lymph-chaos
    systemctl list-units --all --no-legend --plain 'lymph-chaos*' | awk '{print "unit " $1}'
    dpkg -l 'lymph-chaos*' 2>/dev/null | awk '/^[a-z][a-z] / && $1 != "un" && $1 != "pn" {print "dpkg " $1 " " $2}'
    [ "$(our_objects)" -eq 0 ] || echo "kernel objects: $(our_objects)"
)
check apt-purge-leaves-nothing "rc=$rc leftover=$(echo "$leftover" | grep -c .)" test "$rc" -eq 0 -a -z "$leftover"
[ -z "$leftover" ] || detail "apt-purge-leaves-nothing: $(echo "$leftover" | head -10 | tr '\n' ' ')"

# --- cargo xtask install / --uninstall in the same guest --------------------------------------------------------
mkdir -p "$(dirname "$REPO_ROOT")" /tmp/xtask-target
ln -sfn "$P/repo" "$REPO_ROOT"
dpkg-deb -x "$(ls "$P"/lymph-chaos_*_*.deb)" /tmp/unpacked
export CARGO_TARGET_DIR=/tmp/xtask-target
t=$(now)
if "$P/xtask" install --binary /tmp/unpacked/usr/bin/lymph-chaos >/tmp/xtask-install.log 2>&1; then rc=0; else
    rc=$?
    detail "xtask-install: $(tail -5 /tmp/xtask-install.log | tr '\n' ' ')"
fi
install_s=$(elapsed "$t")
up=$(time_until "$(now)" 60 agent_ok)
[ "$up" = never ] && diagnose xtask-install
check xtask-install "rc=$rc install_s=$install_s is_enabled=$(systemctl is-enabled lymph-chaos 2>&1) answered_s=$up" \
    bash -c "test $rc -eq 0 && test -x /usr/local/bin/lymph-chaos && test -s /etc/systemd/system/lymph-chaos.service &&
        test '$up' != never && systemctl is-active --quiet lymph-chaos-guardian-$(main_pid).scope &&
        zcat /usr/local/share/man/man1/lymph-chaos.1.gz | grep -q '^\.TH' &&
        test -s /usr/local/share/bash-completion/completions/lymph-chaos"
if "$P/xtask" install --uninstall >/tmp/xtask-uninstall.log 2>&1; then rc=0; else
    rc=$?
    detail "xtask-uninstall: $(tail -5 /tmp/xtask-uninstall.log | tr '\n' ' ')"
fi
leftover=$(
    for p in /usr/local/bin/lymph-chaos /etc/systemd/system/lymph-chaos.service /etc/lymph-chaos /run/lymph-chaos \
        /var/log/lymph-chaos /var/lib/lymph-chaos /sys/fs/bpf/lymph-chaos; do
        [ -e "$p" ] && echo "$p"
    done
    find /usr/local -name '*lymph-chaos*' 2>/dev/null
    systemctl list-units --all --no-legend --plain 'lymph-chaos*' | awk '{print "unit " $1}'
    pgrep -a lymph-chaos
    [ "$(our_objects)" -eq 0 ] || echo "kernel objects: $(our_objects)"
)
check xtask-uninstall-leaves-nothing "rc=$rc leftover=$(echo "$leftover" | grep -c .)" test "$rc" -eq 0 -a -z "$leftover"
[ -z "$leftover" ] || detail "xtask-uninstall-leaves-nothing: $(echo "$leftover" | head -10 | tr '\n' ' ')"

echo "GUEST-DONE exit=$failures uptime=$(uptime_s)"
systemctl poweroff --force --force
