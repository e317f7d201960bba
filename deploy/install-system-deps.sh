#!/usr/bin/env bash
# System packages the test suite drives for real: OpenSSH's sshd (the comparison and push-agent
# target), PuTTY's psftp/pscp and lftp (client matrix), PostgreSQL 15 (SIS database tests),
# iproute2 (a private network namespace for the handshake ACK test), strace (which syscalls
# make an upload durable), logrotate (the shipped deploy/sis-ingest.logrotate is run for real),
# rclone and sshfs (client matrix; sshfs brings FUSE 3 and fusermount3), prometheus (a real
# Prometheus scrapes /metrics; promtool checks the exposition and deploy/prometheus-alerts.yml),
# haproxy (two nodes behind the shipped deploy/haproxy.cfg in tests/cluster/).
# Runs apt-get only for what is missing, so a second run costs nothing.
set -euo pipefail

need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v psftp >/dev/null 2>&1 || need+=(putty-tools)
command -v lftp >/dev/null 2>&1 || need+=(lftp)
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || need+=(logrotate)
command -v rclone >/dev/null 2>&1 || need+=(rclone)
command -v sshfs >/dev/null 2>&1 || need+=(sshfs)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "install-system-deps: missing ${need[*]}; run as root: apt-get install -y ${need[*]}" >&2
    exit 1
  fi
else
  SUDO=
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# A policy-rc.d that answers 101 keeps the packages from starting services on install (an sshd
# on port 22, a PostgreSQL cluster); the tests start their own. Only ours is removed afterwards.
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  added_policy=1
fi
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q "${need[@]}" >/dev/null
if [ "$added_policy" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
echo "system packages installed"
