# Shared by test.sh, bench.sh and vm-e2e.sh: one consistent qemu, whatever the machine starts
# with. Source it after scripts/lib/deb.sh; then `qemu_consistent` makes qemu-system-x86,
# qemu-utils, qemu-block-extra and every other installed package built from qemu one version:
# the one the configured sources offer for qemu-system-x86.
#
# Why: a machine may carry a newer qemu-utils (e.g. 10.x from backports) than its sources offer
# for qemu-system-x86 (7.2 in Debian 12). Installing qemu-system-x86 then either removes
# qemu-utils (its Breaks) or, with a newer qemu-block-extra installed too, stops apt with
# "pkgProblemResolver::Resolve generated breaks"; and qemu's block modules load only into the
# build they came from. Pinning every qemu package to one version avoids both.

qemu_version_of() { # PKG -> installed version, or nothing
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "install" && $3 == "installed" { print $4 }'
}

qemu_candidate() { # PKG -> the version the sources offer, or nothing
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" { print $2 }'
}

qemu_source_version() { # PKG VERSION -> the qemu source version it was built from
    # "Source: qemu (V)" for binary rebuilds (+bN) and arch-independent packages, else V itself.
    apt-cache show "$1=$2" 2>/dev/null |
        awk -v v="$2" '/^Source:/ && $3 != "" { gsub(/[()]/, "", $3); print $3; found = 1; exit }
                       END { if (!found) print v }'
}

qemu_consistent() {
    local target_v target_src p v src_v cand
    target_v="$(qemu_candidate qemu-system-x86)"
    if [[ -z "$target_v" ]] && ((DEB_UPDATED == 0)); then
        DEB_SUDO=""
        [[ $(id -u) -eq 0 ]] || DEB_SUDO=sudo
        deb_apt_get update -qq
        DEB_UPDATED=1
        target_v="$(qemu_candidate qemu-system-x86)"
    fi
    [[ -n "$target_v" ]] || {
        echo "qemu.sh: no qemu-system-x86 in the configured apt sources" >&2
        return 1
    }
    target_src="$(qemu_source_version qemu-system-x86 "$target_v")"
    local install=() remove=() seen=" "
    local -A have_src=()
    # The packages the tests need, then every other installed package of the qemu source.
    local -a pkgs=(qemu-system-x86 qemu-utils qemu-block-extra)
    while read -r p v src_v; do
        pkgs+=("$p")
        have_src[$p]="$src_v"
    done < <(dpkg-query -W -f='${Package} ${Status} ${source:Package} ${source:Version}\n' 2>/dev/null |
        awk '$3 == "ok" && $4 == "installed" && $5 == "qemu" { print $1, $5, $6 }')
    for p in "${pkgs[@]}"; do
        case "$seen" in *" $p "*) continue ;; esac
        seen+="$p "
        [[ "${have_src[$p]:-}" == "$target_src" ]] && continue
        cand="$(qemu_candidate "$p")"
        if [[ -n "$cand" && "$(qemu_source_version "$p" "$cand")" == "$target_src" ]]; then
            install+=("$p=$cand")
        elif [[ -n "${have_src[$p]:-}" ]]; then
            remove+=("$p") # only in the other version: it would keep the set inconsistent
        else
            echo "qemu.sh: $p is not available at qemu $target_src" >&2
            return 1
        fi
    done
    ((${#install[@]} + ${#remove[@]})) || return 0
    DEB_SUDO=""
    [[ $(id -u) -eq 0 ]] || DEB_SUDO=sudo
    printf '==> making qemu consistent at %s: %s%s\n' "$target_src" "${install[*]}" \
        "${remove[*]:+ (removing ${remove[*]})}" >&2
    if ((${#remove[@]})); then
        deb_apt_get remove -y -qq "${remove[@]}" >/dev/null
    fi
    if ((DEB_UPDATED == 0)); then
        deb_apt_get update -qq
        DEB_UPDATED=1
    fi
    deb_apt_get install -y -qq --allow-downgrades "${install[@]}" >/dev/null
}
