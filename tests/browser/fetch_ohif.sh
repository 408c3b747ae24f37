#!/bin/sh
# Fetch the OHIF viewer's built files (npm package @ohif/app ships them in dist/)
# into tests/browser/ohif/<version>/dist. Only the package itself is needed, not its
# dependencies, so `npm pack` (registry download + integrity check) is enough.
set -eu
VERSION="${OHIF_VERSION:-3.13.2}"
HERE="$(cd "$(dirname "$0")" && pwd)"
TARGET="$HERE/ohif/$VERSION"
if [ -f "$TARGET/dist/index.html" ]; then
    echo "OHIF $VERSION already at $TARGET/dist"
    exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
npm pack --silent "@ohif/app@$VERSION" --pack-destination "$WORK" >/dev/null
tar xzf "$WORK/ohif-app-$VERSION.tgz" -C "$WORK"
test -f "$WORK/package/dist/index.html"
rm -rf "$TARGET"
mkdir -p "$TARGET"
mv "$WORK/package/dist" "$TARGET/dist"
echo "OHIF $VERSION at $TARGET/dist"
