#!/usr/bin/env bash
# Fetch llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and gguf-py)
# from the llama-cpp-python source distribution on PyPI and print the script's path.
# Nothing is built or installed: pip only downloads the sdist, and three paths of it
# are unpacked. The script needs torch, transformers and numpy, which edgemoe's venv has.
#
# Usage: tools/llamacpp_convert.sh CACHE_DIR [VERSION]
#   EDGEMOE_LLAMACPP_CONVERT=$(tools/llamacpp_convert.sh ~/.cache/edgemoe) \
#     python -m pytest -m llamacpp tests/formats/test_convert_gguf.py
set -euo pipefail

cache=${1:?usage: $0 CACHE_DIR [VERSION]}
version=${2:-0.3.36}  # the llama.cpp tree tests/formats/gguf_fixtures.py was checked against
top="llama_cpp_python-$version"
script="$cache/$top/vendor/llama.cpp/convert_hf_to_gguf.py"

if [ ! -f "$script" ]; then
    mkdir -p "$cache"
    sdist="$cache/$top.tar.gz"
    if [ ! -f "$sdist" ]; then
        python -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$version" -d "$cache" >&2
    fi
    tar -xzf "$sdist" -C "$cache" \
        "$top/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "$top/vendor/llama.cpp/conversion" \
        "$top/vendor/llama.cpp/gguf-py"
fi
realpath "$script"
