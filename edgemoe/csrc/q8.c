// INT8 weights x INT8 activations on AVX2, the way ggml's Q8_0 dot product works.
//
// y[t, n] = ws[n] * sum_b xs[t, b] * sum_{k in block b} w[n, k] * xq[t, k]
//
// Weights are edgemoe's per-output-row symmetric INT8 (w ~ q * ws[n]); each token's
// activations are quantized to INT8 in blocks of 32 with one f32 scale per block (as
// llama.cpp quantizes them for its Q8_0 matmul), so the inner loop is integer: 32 products
// per _mm256_maddubs_epi16 instead of 8 per FMA after widening weights to f32. On this
// 2-core AVX2 EPYC torch's _weight_int8pack_mm takes 3-9 ms for a 5632x2048 matrix and one
// token; see docs/BENCHMARKS.md (kernel table) for this loop's figures.
//
// Plain C with no torch headers: it compiles in about a second (edgemoe/fastkernels.py),
// and is called through ctypes with the GIL released. Rows are split over OpenMP threads;
// libgomp's soname is the one torch loads, so both share one runtime and one thread pool.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define QK 32

// xq[t, k] = round(x[t, k] / xs[t, k / 32]), xs = max |x| / 127 per block of 32.
void q8_quantize(const float* x, int64_t T, int64_t K, int8_t* xq, float* xs) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < K / QK; ++b) {
      const float* p = x + t * K + b * QK;
      __m256 v[4];
      __m256 m = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(p + 8 * j);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float d = amax / 127.0f;
      xs[t * (K / QK) + b] = d;
      const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
      __m256i i[4];
      for (int j = 0; j < 4; ++j)
        i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_ROUND_NEAREST));
      // pack 4 x 8 int32 -> 32 int8, undoing the lane interleave of the pack instructions
      __m256i a = _mm256_packs_epi32(i[0], i[1]);
      __m256i c = _mm256_packs_epi32(i[2], i[3]);
      a = _mm256_packs_epi16(a, c);
      const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      a = _mm256_permutevar8x32_epi32(a, perm);
      _mm256_storeu_si256((__m256i*)(xq + t * K + b * QK), a);
    }
  }
}

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

// 8 int32 partial sums of w[0:32] . x[0:32] (w signed, x signed): |w| * sign(x, w)
static inline __m256 dot32(__m256i w, __m256i x, __m256i ones) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

// y [T, N] f32 += nothing: y is written. w [N, K] int8 row-major, ws [N] f32.
void q8_gemm(const int8_t* xq, const float* xs, int64_t T, int64_t K, const int8_t* w,
             const float* ws, int64_t N, float* y, int threads) {
  const int64_t nb = K / QK;
  const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t rb = 0; rb < blocks; ++rb) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t n0 = rb * 4;
    const int64_t rows = N - n0 < 4 ? N - n0 : 4;
    if (rows == 4) {
      const int8_t* r0 = w + n0 * K;
      const int8_t* r1 = r0 + K;
      const int8_t* r2 = r1 + K;
      const int8_t* r3 = r2 + K;
      for (int64_t t = 0; t < T; ++t) {
        const int8_t* xt = xq + t * K;
        const float* st = xs + t * nb;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t k = b * QK;
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + k));
          const __m256 d = _mm256_set1_ps(st[b]);
          a0 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(r0 + k)), xv, ones), d, a0);
          a1 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(r1 + k)), xv, ones), d, a1);
          a2 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(r2 + k)), xv, ones), d, a2);
          a3 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(r3 + k)), xv, ones), d, a3);
        }
        float* yt = y + t * N + n0;
        yt[0] = hsum(a0) * ws[n0];
        yt[1] = hsum(a1) * ws[n0 + 1];
        yt[2] = hsum(a2) * ws[n0 + 2];
        yt[3] = hsum(a3) * ws[n0 + 3];
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* row = w + (n0 + r) * K;
        for (int64_t t = 0; t < T; ++t) {
          const int8_t* xt = xq + t * K;
          const float* st = xs + t * nb;
          __m256 a = _mm256_setzero_ps();
          for (int64_t b = 0; b < nb; ++b) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + b * QK));
            a = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(row + b * QK)), xv, ones),
                                _mm256_set1_ps(st[b]), a);
          }
          y[t * N + n0 + r] = hsum(a) * ws[n0 + r];
        }
      }
    }
  }
}
