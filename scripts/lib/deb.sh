# Shared by the scripts that install their own Debian peers (test.sh, bench.sh, vm-e2e.sh).
# Source it; then `deb_install_missing PKG...` installs the packages that are not installed yet
# (with sudo when not root), running `apt-get update` once per script run.
#
# Another apt or dpkg (unattended-upgrades, a second terminal) holds the dpkg lock: apt waits
# for it (DPkg::Lock::Timeout), and an apt-get that still fails on a lock is retried, for up to
# DEB_LOCK_WAIT_SECONDS (600) in all, instead of failing the whole run at once.
#
# Packages that ship a daemon (prometheus, ceph-mon, ...) would start it on install, listening
# on every interface: the tests start their own on loopback. While installing, a policy-rc.d
# that refuses every service start is in place (unless the machine has its own already).

DEB_UPDATED=0
DEB_LOCK_WAIT_SECONDS="${DEB_LOCK_WAIT_SECONDS:-600}"
DEB_LOCK_RETRY_SECONDS="${DEB_LOCK_RETRY_SECONDS:-5}"

# apt-get with the lock wait; retries while the failure is a lock held by someone else.
deb_apt_get() {
    local waited=0 out rc
    while :; do
        rc=0
        out="$(DEBIAN_FRONTEND=noninteractive $DEB_SUDO apt-get \
            -o DPkg::Lock::Timeout="$DEB_LOCK_WAIT_SECONDS" "$@" 2>&1)" || rc=$?
        if ((rc == 0)); then
            return 0
        fi
        if grep -qiE "could not get lock|unable to acquire the dpkg frontend lock|is another process using it" <<<"$out" &&
            awk -v w="$waited" -v max="$DEB_LOCK_WAIT_SECONDS" 'BEGIN { exit !(w < max) }'; then
            printf '==> apt is busy (another apt or dpkg holds its lock); waiting\n' >&2
            sleep "$DEB_LOCK_RETRY_SECONDS"
            waited="$(awk -v w="$waited" -v s="$DEB_LOCK_RETRY_SECONDS" 'BEGIN { print w + s }')"
            continue
        fi
        printf '%s\n' "$out" >&2
        return "$rc"
    done
}

deb_install_missing() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    DEB_SUDO=""
    [[ $(id -u) -eq 0 ]] || DEB_SUDO=sudo
    printf '==> installing Debian packages: %s\n' "${missing[*]}" >&2
    if ((DEB_UPDATED == 0)); then
        deb_apt_get update -qq
        DEB_UPDATED=1
    fi
    local policy=/usr/sbin/policy-rc.d own_policy=0 rc=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# nbdcrypt scripts/lib/deb.sh: no service starts during the install\nexit 101\n' |
            $DEB_SUDO tee "$policy" >/dev/null && $DEB_SUDO chmod 755 "$policy" && own_policy=1
    fi
    deb_apt_get install -y -qq "${missing[@]}" >/dev/null || rc=$?
    if ((own_policy)); then
        $DEB_SUDO rm -f "$policy"
    fi
    return "$rc"
}
