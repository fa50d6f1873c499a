# Shared by the scripts that install their own Debian peers (test.sh, bench.sh, vm-e2e.sh).
# Source it; then `deb_install_missing PKG...` installs the packages that are not installed yet
# (with sudo when not root), running `apt-get update` once per script run.

DEB_UPDATED=0

deb_install_missing() {
    local missing=() p sudo=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    printf '==> installing Debian packages: %s\n' "${missing[*]}" >&2
    if ((DEB_UPDATED == 0)); then
        $sudo apt-get update -qq
        DEB_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
