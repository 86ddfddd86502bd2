#!/usr/bin/env bash
# The Debian package builds, installs cleanly, and the installed binary and config work.
# Root installs it on the machine with dpkg -i and purges it afterwards; others unpack it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deb=$(scripts/package-deb --dev | tail -1)
[[ -f "$deb" ]] || { echo "package test: no .deb built ($deb)" >&2; exit 1; }
# (Captured first: `grep -q` closing the pipe early would trip pipefail.)
info=$(dpkg-deb --info "$deb")
grep -q 'Package: frontdesk' <<<"$info"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
grep -qx /etc/frontdesk/frontdesk.yaml <<<"$conffiles"
contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/frontdesk ./lib/systemd/system/frontdesk.service ./usr/share/man/man1/frontdesk.1.gz \
    ./usr/share/bash-completion/completions/frontdesk ./usr/share/doc/frontdesk/frontdesk.example.yaml; do
    grep -q " $f\$" <<<"$contents" || { echo "package test: $f missing" >&2; exit 1; }
done

if [[ $(id -u) -eq 0 ]]; then
    trap 'dpkg --purge frontdesk >/dev/null 2>&1 || true' EXIT
    dpkg -i "$deb"
    /usr/bin/frontdesk --version
    /usr/bin/frontdesk check /etc/frontdesk/frontdesk.yaml
    man_src=$(zcat /usr/share/man/man1/frontdesk.1.gz)
    grep -q '^.TH frontdesk' <<<"$man_src"
else
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    dpkg-deb -x "$deb" "$root"
    "$root/usr/bin/frontdesk" --version
    "$root/usr/bin/frontdesk" check "$root/etc/frontdesk/frontdesk.yaml"
fi
echo "package test: ok ($deb)"
