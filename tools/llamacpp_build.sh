#!/usr/bin/env bash
# Build llama.cpp's llama-bench (only that target) from the llama-cpp-python source
# distribution on PyPI and print the binary's path. CPU only: no CUDA, no curl,
# -DGGML_NATIVE=ON so it uses this machine's SIMD (AVX2 / AVX-512) like edgemoe does.
# The build is cached per version under CACHE_DIR; a second call only prints the path.
# It takes 5-35 minutes on 2 cores. `edgemoe bench` finds the binary in the default
# cache (~/.cache/edgemoe) or through $EDGEMOE_LLAMA_BENCH.
#
# Usage: tools/llamacpp_build.sh [CACHE_DIR] [VERSION] [JOBS]
#   tools/llamacpp_build.sh ~/.cache/edgemoe            # -> .../llama-bench
set -euo pipefail

cache=${1:-$HOME/.cache/edgemoe}
version=${2:-0.3.36}  # the same tree tools/llamacpp_convert.sh unpacks
jobs=${3:-2}
top="llama_cpp_python-$version"
src="$cache/$top/vendor/llama.cpp"
build="$cache/llama-bench-$version"
bin="$build/bin/llama-bench"

if [ ! -x "$bin" ]; then
    mkdir -p "$cache"
    sdist="$cache/$top.tar.gz"
    if [ ! -f "$sdist" ]; then
        python -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$version" -d "$cache" >&2
    fi
    if [ ! -f "$src/CMakeLists.txt" ]; then
        tar -xzf "$sdist" -C "$cache" "$top/vendor/llama.cpp"
    fi
    t0=$(date +%s)
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$build" --config Release --target llama-bench -j "$jobs" >&2
    echo "llama-bench built in $(($(date +%s) - t0)) s" >&2
fi
realpath "$bin"
