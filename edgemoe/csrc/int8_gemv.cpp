// y[t, n] = scale[n] * sum_k q[n, k] * x[t, k] for a few tokens t: INT8 weights, f32 activations.
//
// torch's _weight_int8pack_mm takes 3-23 ms for a [5632, 2048] expert matrix and one token on
// this AVX2 CPU (no AVX-512, no VNNI); reading its 11.5 MB from memory takes under 1 ms. This
// loop widens 8 int8 weights at a time to f32 and multiplies them with FMA, 4 rows at once
// so each activation load serves 4 rows; a 4-row block (4 x K bytes) stays in L1 while every
// token of a small batch runs over it. Rows are split over OpenMP threads.
#include <torch/extension.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

static inline __m256 widen(const int8_t* p) {
  __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8));
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: f32 [T, K]");
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q: int8 [N, K]");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous(), "scale: f32 [N]");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && scale.numel() == N && K % 8 == 0, "shapes");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * 4;
    const int64_t rows = std::min<int64_t>(4, N - n0);
    if (rows == 4) {
      const int8_t* r0 = qp + n0 * K;
      const int8_t* r1 = r0 + K;
      const int8_t* r2 = r1 + K;
      const int8_t* r3 = r2 + K;
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = xp + t * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
          __m256 xv = _mm256_loadu_ps(xt + k);
          a0 = _mm256_fmadd_ps(widen(r0 + k), xv, a0);
          a1 = _mm256_fmadd_ps(widen(r1 + k), xv, a1);
          a2 = _mm256_fmadd_ps(widen(r2 + k), xv, a2);
          a3 = _mm256_fmadd_ps(widen(r3 + k), xv, a3);
        }
        float* yt = yp + t * N + n0;
        yt[0] = hsum(a0) * sp[n0];
        yt[1] = hsum(a1) * sp[n0 + 1];
        yt[2] = hsum(a2) * sp[n0 + 2];
        yt[3] = hsum(a3) * sp[n0 + 3];
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* row = qp + (n0 + r) * K;
        for (int64_t t = 0; t < T; ++t) {
          const float* xt = xp + t * K;
          __m256 a = _mm256_setzero_ps();
          for (int64_t k = 0; k < K; k += 8) a = _mm256_fmadd_ps(widen(row + k), _mm256_loadu_ps(xt + k), a);
          yp[t * N + n0 + r] = hsum(a) * sp[n0 + r];
        }
      }
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int8_gemv", &int8_gemv, "INT8 x f32 GEMV (AVX2)"); }
