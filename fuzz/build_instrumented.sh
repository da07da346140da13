#!/usr/bin/env bash
# Build what the atheris targets use to see inside the compiled core (docs/fuzzing.md):
#
#   build/fuzz/core/_core*.so       fastim/_core.pyx compiled by clang with AddressSanitizer
#                                   and libFuzzer coverage (8-bit counters, PC table, compares)
#   build/fuzz/asan_with_fuzzer.so  ASan's runtime and libFuzzer in one library, preloaded by
#                                   the targets (the runtime's own weak coverage hooks removed,
#                                   so the counters reach libFuzzer)
#
# Needs clang with its compiler-rt archives (Debian/Ubuntu: apt-get install clang).
# Without this build the targets still run, on the normal build, guided by Python coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=build/fuzz
command -v clang >/dev/null || { echo "fuzz/build_instrumented.sh needs clang (apt-get install clang)" >&2; exit 1; }

find_rt() {  # compiler-rt archive: lib/linux/libclang_rt.NAME-x86_64.a (clang <= 15) or the per-target layout
    local res f
    res=$(clang -print-resource-dir)
    for f in "$res/lib/linux/libclang_rt.$1-x86_64.a" "$res/lib/x86_64-unknown-linux-gnu/libclang_rt.$1.a"; do
        [ -f "$f" ] && { echo "$f"; return; }
    done
    echo "no libclang_rt.$1 under $res (install clang's compiler-rt)" >&2
    exit 1
}

mkdir -p "$OUT/core" "$OUT/rt"
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ext=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

echo "==> cythonize fastim/_core.pyx" >&2
"$PY" -m cython -3 fastim/_core.pyx -o "$OUT/_core.c"
echo "==> clang: ASan + coverage -> $OUT/core/_core$ext" >&2
clang -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address \
    -fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp \
    -I"$inc" "$OUT/_core.c" -o "$OUT/core/_core$ext"

echo "==> ASan runtime + libFuzzer -> $OUT/asan_with_fuzzer.so" >&2
rt=$OUT/rt
cp "$(find_rt asan)" "$rt/asan.a"
cp "$(find_rt fuzzer_no_main)" "$rt/fuzzer.a"
chmod u+w "$rt"/*.a
# ASan defines the coverage callbacks as weak no-ops; libFuzzer defines the real ones
nm "$rt/asan.a" 2>/dev/null | awk '$2 == "W" && $3 ~ /^__sanitizer_cov_/ {print $3}' | sort -u >"$rt/weak"
nm "$rt/fuzzer.a" 2>/dev/null | awk '$2 == "T" && $3 ~ /^__sanitizer_cov_/ {print $3}' | sort -u >"$rt/strong"
comm -12 "$rt/weak" "$rt/strong" | sed 's/^/--strip-symbol=/' >"$rt/strip"
objcopy $(cat "$rt/strip") "$rt/asan.a" "$rt/asan-stripped.a"
ar d "$rt/asan-stripped.a" asan_preinit.cpp.o 2>/dev/null || true  # .preinit_array: not in a DSO
clang++ -shared -o "$OUT/asan_with_fuzzer.so" \
    -Wl,--whole-archive "$rt/asan-stripped.a" "$rt/fuzzer.a" -Wl,--no-whole-archive \
    -ldl -lrt -lpthread -lm
echo "built: $OUT/core/_core$ext $OUT/asan_with_fuzzer.so" >&2
