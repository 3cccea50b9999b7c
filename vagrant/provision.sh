#!/bin/sh
# Provisions the lymph-chaos workstation VM (Debian 12, as root; run by `vagrant up` / `vagrant provision`) from
# the packages built on the host by `cargo xtask deb` — the same .deb the CI systemd tier installs in its Debian 12
# guest. Idempotent: a second run reinstalls the package only when it changed. See README.md.
#
# 1. apt-get install ./lymph-chaos_<version>_amd64.deb (and its -dbgsym): /usr/bin/lymph-chaos, the hardened
#    systemd unit enabled and started, /etc/lymph-chaos/config.yml, man pages, shell completions.
# 2. The kernel modules the scenarios use, loaded now and at every boot.
# 3. chaos-vm-guest (the scenarios of the CI qemu tier, a libtest binary built on the host), the services it
#    starts (chaos-vm-services) and the lymph-chaos-scenarios wrapper.
set -eu

PAYLOAD=${PAYLOAD:-/tmp/lymph-chaos-payload}
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
MODULES="sch_netem sch_prio sch_htb sch_tbf sch_ingress sch_fq cls_bpf cls_u32 act_mirred ifb veth"

step() { printf '\n==> %s\n' "$*"; }

step "modules: $MODULES"
# Loaded before the agent starts (autoload of tc modules is unreliable on 6.1). `ifb` creates ifb0/ifb1 (unused).
printf '# lymph-chaos scenarios (vagrant/provision.sh)\n' >/etc/modules-load.d/lymph-chaos-vm.conf
for module in $MODULES; do
    printf '%s\n' "$module" >>/etc/modules-load.d/lymph-chaos-vm.conf
    modprobe "$module"
done

step "apt-get install $PAYLOAD/lymph-chaos_*_amd64.deb (+ -dbgsym)"
apt-get -o DPkg::Lock::Timeout=600 update -q
# Absolute paths: apt installs the local files and takes their dependencies from the archive.
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
    "$PAYLOAD"/lymph-chaos_*_amd64.deb "$PAYLOAD"/lymph-chaos-dbgsym_*_amd64.deb iproute2 kmod
systemctl is-enabled lymph-chaos
systemctl is-active lymph-chaos

step "chaos-vm-guest (the scenarios), chaos-vm-services and lymph-chaos-scenarios -> /usr/local/bin"
install -m 0755 "$PAYLOAD/chaos-vm-guest" /usr/local/bin/chaos-vm-guest
install -m 0755 "$PAYLOAD/chaos-vm-services" /usr/local/bin/chaos-vm-services
install -m 0755 "$PAYLOAD/lymph-chaos-scenarios" /usr/local/bin/lymph-chaos-scenarios

step "done"
for i in 1 2 3 4 5 6 7 8 9 10; do
    lymph-chaos status >/dev/null 2>&1 && break
    sleep 1
done
lymph-chaos status >/dev/null && echo "agent service: running (lymph-chaos status; journalctl -u lymph-chaos)"
echo "run the scenarios:  vagrant ssh -c 'sudo lymph-chaos-scenarios'"
