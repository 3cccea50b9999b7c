#!/bin/sh
# mmdebstrap --customize-hook for the systemd tier's guest image (xtask/src/systemd_guest.rs); $1 = the new root.
# Part of the image's cache key: editing this file rebuilds the image.
set -eu
root=$1

echo chaos-guest >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tchaos-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# The root file system is mounted by the test's initramfs; nothing else to mount.
printf '# the systemd tier mounts / from its initramfs\n' >"$root/etc/fstab"
# No root password, no getty: the guest is driven by the unit below; nothing logs in.
# mmdebstrap's dpkg settings for the bootstrap (no man pages, docs or locales; unsafe I/O) must not apply to what
# the tests install: the package's man pages and copyright are part of what they check.
rm -f "$root/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
# Background jobs that would only add noise to timings.
rm -f "$root"/etc/systemd/system/timers.target.wants/*.timer

# The test run: the second disk is a tar archive (the .deb, the test script, …); its `run` prints RESULT lines on
# the serial console and powers the guest off.
cat >"$root/etc/systemd/system/chaos-guest-run.service" <<'UNIT'
[Unit]
Description=lymph-chaos systemd tier: the test run from the second disk
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /payload && tar -xf /dev/vdb -C /payload && exec /payload/run'
StandardOutput=file:/dev/ttyS0
StandardError=inherit

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/chaos-guest-run.service \
    "$root/etc/systemd/system/multi-user.target.wants/chaos-guest-run.service"
