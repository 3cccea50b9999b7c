#!/bin/sh
# Provisions the lymph-chaos workstation VM (Debian 12, as root; run by `vagrant up` / `vagrant provision`).
# Idempotent: a second run only rebuilds what changed. See README.md.
#
# 1. Toolchain from apt: Debian's rustc-web/cargo-web (1.96, bookworm-security). `cargo xtask build-ebpf` needs
#    exactly these packages for the BPF object anyway (rustup's toolchains cannot build `core` for
#    bpfel-unknown-none), so one signed Debian toolchain builds everything: no rustup, no `curl | sh`.
# 2. The kernel modules the scenarios use, loaded now and at every boot.
# 3. `cargo xtask install`: the README's install path (release agent with the BPF object embedded,
#    /usr/local/bin/lymph-chaos, /etc/lymph-chaos/config.yml, the systemd unit, enabled and started).
# 4. chaos-vm-guest (the scenario runner of the CI qemu tier) and the lymph-chaos-scenarios wrapper.
set -eu

REPO=${REPO:-/home/vagrant/lymph-chaos}
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
MODULES="sch_netem sch_prio sch_htb sch_tbf sch_ingress sch_fq cls_bpf cls_u32 act_mirred ifb veth"

step() { printf '\n==> %s\n' "$*"; }

step "apt: Debian's Rust toolchain (rustc-web/cargo-web), build tools, iproute2"
apt-get -o DPkg::Lock::Timeout=600 update -q
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
    rustc-web cargo-web build-essential pkg-config ca-certificates git iproute2 kmod
cargo --version
rustc --version

step "kernel modules: $MODULES"
# Loaded explicitly: autoload of tc modules is unreliable on 6.1. `ifb` creates ifb0/ifb1 (unused, down).
printf '# lymph-chaos scenarios (vagrant/provision.sh)\n' >/etc/modules-load.d/lymph-chaos-vm.conf
for module in $MODULES; do
    printf '%s\n' "$module" >>/etc/modules-load.d/lymph-chaos-vm.conf
    modprobe "$module"
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

step "cargo xtask install (builds the BPF object and the release agent; installs and starts the service)"
cd "$REPO"
cargo xtask install

step "chaos-vm-guest (the scenario runner) -> /usr/local/bin"
cargo build --release --package chaos-tests --bin chaos-vm-guest
install -m 0755 target/release/chaos-vm-guest /usr/local/bin/chaos-vm-guest
install -m 0755 vagrant/lymph-chaos-scenarios /usr/local/bin/lymph-chaos-scenarios

step "done"
lymph-chaos status >/dev/null && echo "agent service: running (lymph-chaos status)"
echo "run the scenarios:  vagrant ssh -c 'sudo lymph-chaos-scenarios'"
