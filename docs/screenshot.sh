#!/usr/bin/env bash
# The committed screenshot of the rendered GUFT guide (docs/guft_guide.png), taken offline:
# MathJax from npm (served locally instead of from a CDN) and headless Chromium (Debian package).
#   bash docs/screenshot.sh          # needs: npm, chromium (apt-get install chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
(cd "$tmp" && npm install --silent mathjax@3 >/dev/null)
GUFT_DOCS_MATHJAX="mathjax/tex-chtml.js" JAX_PLATFORMS=cpu .venv/bin/python docs/generate.py
GUFT_DOCS_MATHJAX="mathjax/tex-chtml.js" JAX_PLATFORMS=cpu \
  .venv/bin/python -m sphinx -W -q -b html docs "$tmp/html"
cp -r "$tmp/node_modules/mathjax/es5" "$tmp/html/_static/mathjax"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,3700 \
  --virtual-time-budget=20000 --screenshot="$PWD/docs/guft_guide.png" "file://$tmp/html/guft.html"
rm -rf "$tmp"
