#!/usr/bin/env bash
# Puts the sources of abseil, GoogleTest, nlohmann-json and CLI11 under third_party/ (ignored by
# git), from Debian's source packages (or this machine's installed headers), for machines that have
# a compiler and CMake but not these libraries (the GPU machines). CMake uses them only when it
# finds no installed copy.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dst="$here/third_party"
mkdir -p "$dst"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

need_src() {
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ 2>/dev/null; then
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/debian-src.sources
    apt-get update -qq
  fi
}

if [ ! -f "$dst/abseil-cpp/CMakeLists.txt" ]; then
  need_src
  (cd "$work" && apt-get source -qq --download-only abseil >/dev/null) || {
    echo "error: could not fetch the abseil source package from Debian's registry" >&2; exit 1; }
  mkdir -p "$dst/abseil-cpp"
  tar -xzf "$work"/abseil_*.orig.tar.gz -C "$dst/abseil-cpp" --strip-components=1
fi
if [ ! -f "$dst/googletest/CMakeLists.txt" ]; then
  if [ -f /usr/src/googletest/CMakeLists.txt ]; then
    cp -r /usr/src/googletest "$dst/googletest"
  else
    need_src
    (cd "$work" && apt-get source -qq --download-only googletest >/dev/null)
    mkdir -p "$dst/googletest"
    tar -xf "$work"/googletest_*.orig.tar.* -C "$dst/googletest" --strip-components=1
  fi
fi
if [ ! -f "$dst/nlohmann/include/nlohmann/json.hpp" ]; then
  mkdir -p "$dst/nlohmann/include"
  if [ -f /usr/include/nlohmann/json.hpp ]; then
    cp -r /usr/include/nlohmann "$dst/nlohmann/include/"
  else
    need_src
    (cd "$work" && apt-get source -qq --download-only nlohmann-json3 >/dev/null)
    mkdir -p "$work/nl" && tar -xf "$work"/nlohmann-json3_*.orig.tar.* -C "$work/nl" --strip-components=1
    cp -r "$work/nl/single_include/nlohmann" "$dst/nlohmann/include/"
  fi
fi
if [ ! -f "$dst/CLI11/include/CLI/CLI.hpp" ]; then
  mkdir -p "$dst/CLI11/include"
  if [ -f /usr/include/CLI/CLI.hpp ]; then
    cp -r /usr/include/CLI "$dst/CLI11/include/"
  else
    need_src
    (cd "$work" && apt-get source -qq --download-only cli11 >/dev/null) || {
      echo "error: could not fetch the cli11 source package from Debian's registry" >&2; exit 1; }
    mkdir -p "$work/cli11" && tar -xf "$work"/cli11_*.orig.tar.* -C "$work/cli11" --strip-components=1
    cp -r "$work/cli11/include/CLI" "$dst/CLI11/include/"
  fi
fi
echo "third_party/: $(ls "$dst" | tr '\n' ' ')"
