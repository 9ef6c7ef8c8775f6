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
// Where the CPU has AVX-512 VNNI the same sum runs as vpdpbusd (64 products an instruction):
// weights made unsigned by flipping their top bit (w + 128), multiplied by the signed
// activations, and 128 * sum(x) of each block subtracted once per token (it is the same for
// every row). The integer block sums are exact either way; the f32 accumulation differs only
// in rounding. q8_isa(0) forces the AVX2 path (tests compare the two).
//
// q8_swiglu computes one expert's SwiGLU (gate, up, silu * up, down) in one parallel region:
// activations quantized once for gate and up, one thread wake-up per expert instead of three.
//
// Plain C with no torch headers: it compiles in about a second (edgemoe/fastkernels.py),
// and is called through ctypes with the GIL released. Rows are split over the kernels' own
// thread team (see "the decode team" below), not OpenMP's: torch's pool waits passively,
// and sleeping and waking at every region cost a decode step 2-3 ms here.
#define _GNU_SOURCE  // sched_getcpu, CPU_SET, pthread_setaffinity_np
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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

// The activations of T tokens as the gemms take them: xq [T, K] int8, xs [T, K/32] f32, and
// for the VNNI path sv [T, P, 16] (P = ceil(K / 64): each 64-byte step's two block scales,
// 8 lanes each) and corr [T] (sum over blocks of xs * 128 * sum(xq)).
typedef struct {
  const int8_t* xq;
  const float* xs;
  float* sv;
  float* corr;
  int64_t T, K;
} Acts;

static int isa = -1;  // 1: AVX-512 VNNI, 0: AVX2

// want -1: the path in use (detected on first call); 0: force AVX2; 1: the best this CPU has.
int q8_isa(int want) {
  if (isa < 0 || want == 1) {
    __builtin_cpu_init();
    isa = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  }
  if (want == 0) isa = 0;
  return isa;
}

// Rows computed ahead of the ones they prefetch, in blocks of 4 (see rows_vnni).
#ifndef PF_BLOCKS
#define PF_BLOCKS 1
#endif

// Rows [r0, r1) of one weight: y[t * ldy + (n - r0)] = ws[n] * sum_k w[n, k] x[t, k].
static void rows_avx2(const Acts* a, const int8_t* w, const float* ws, int64_t r0, int64_t r1,
                      float* y, int64_t ldy) {
  const int64_t K = a->K, nb = K / QK;
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t n = r0;
  for (; n + 4 <= r1; n += 4) {
    const int8_t* w0 = w + n * K;
    const int8_t* w1 = w0 + K;
    const int8_t* w2 = w1 + K;
    const int8_t* w3 = w2 + K;
    const int8_t* pf = PF_BLOCKS > 0 && n + 4 * (PF_BLOCKS + 1) <= r1 ? w0 + 4 * PF_BLOCKS * K : NULL;
    for (int64_t t = 0; t < a->T; ++t) {
      const int8_t* xt = a->xq + t * K;
      const float* st = a->xs + t * nb;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k = b * QK;
        if (pf && t == 0 && (k & 63) == 0) {  // see rows_vnni
          _mm_prefetch((const char*)(pf + k), _MM_HINT_T0);
          _mm_prefetch((const char*)(pf + K + k), _MM_HINT_T0);
          _mm_prefetch((const char*)(pf + 2 * K + k), _MM_HINT_T0);
          _mm_prefetch((const char*)(pf + 3 * K + k), _MM_HINT_T0);
        }
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + k));
        const __m256 d = _mm256_set1_ps(st[b]);
        a0 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(w0 + k)), xv, ones), d, a0);
        a1 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(w1 + k)), xv, ones), d, a1);
        a2 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(w2 + k)), xv, ones), d, a2);
        a3 = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(w3 + k)), xv, ones), d, a3);
      }
      float* yt = y + t * ldy + (n - r0);
      yt[0] = hsum(a0) * ws[n];
      yt[1] = hsum(a1) * ws[n + 1];
      yt[2] = hsum(a2) * ws[n + 2];
      yt[3] = hsum(a3) * ws[n + 3];
    }
  }
  for (; n < r1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t t = 0; t < a->T; ++t) {
      const int8_t* xt = a->xq + t * K;
      const float* st = a->xs + t * nb;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + b * QK));
        acc = _mm256_fmadd_ps(dot32(_mm256_loadu_si256((const __m256i*)(row + b * QK)), xv, ones),
                              _mm256_set1_ps(st[b]), acc);
      }
      y[t * ldy + (n - r0)] = hsum(acc) * ws[n];
    }
  }
}

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))

// sv and corr of each token (see Acts).
VNNI static void prep_vnni(Acts* a) {
  const int64_t K = a->K, nb = K / QK, P = (K + 63) / 64;
  for (int64_t t = 0; t < a->T; ++t) {
    const int8_t* xt = a->xq + t * K;
    const float* st = a->xs + t * nb;
    float* v = a->sv + t * P * 16;
    double c = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s = 0;
      for (int j = 0; j < QK; ++j) s += xt[b * QK + j];
      c += (double)st[b] * 128.0 * (double)s;
      for (int j = 0; j < 8; ++j) v[b * 8 + j] = st[b];
    }
    if (nb & 1)
      for (int j = 0; j < 8; ++j) v[nb * 8 + j] = 0.0f;
    a->corr[t] = (float)c;
  }
}

VNNI static inline __m512i load64(const int8_t* p, int64_t left) {
  return left >= 64 ? _mm512_loadu_si512((const void*)p)
                    : _mm512_maskz_loadu_epi8((__mmask64)((1ULL << left) - 1), p);
}

VNNI static inline __m512 step_vnni(__m512 acc, const int8_t* w, __m512i xv, __m512 d,
                                    __m512i flip, int64_t left) {
  const __m512i wu = _mm512_xor_si512(load64(w, left), flip);  // w + 128 as unsigned
  const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc);
}

VNNI static void rows_vnni(const Acts* a, const int8_t* w, const float* ws, int64_t r0,
                           int64_t r1, float* y, int64_t ldy) {
  const int64_t K = a->K, P = (K + 63) / 64;
  // a masked tail's flipped zero bytes are 128 * x = 128 * 0: x is zero-filled there too
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  int64_t n = r0;
  for (; n + 4 <= r1; n += 4) {
    const int8_t* w0 = w + n * K;
    // the block PF_BLOCKS ahead, fetched while this one computes: the hardware prefetcher
    // stops at each 4 KiB page (read slabs are in 4 KiB pages), this does not
    const int8_t* pf = PF_BLOCKS > 0 && n + 4 * (PF_BLOCKS + 1) <= r1 ? w0 + 4 * PF_BLOCKS * K : NULL;
    for (int64_t t = 0; t < a->T; ++t) {
      const int8_t* xt = a->xq + t * K;
      const float* v = a->sv + t * P * 16;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t k = p * 64, left = K - k;
        if (pf && t == 0) {
          _mm_prefetch((const char*)(pf + k), _MM_HINT_T0);
          _mm_prefetch((const char*)(pf + K + k), _MM_HINT_T0);
          _mm_prefetch((const char*)(pf + 2 * K + k), _MM_HINT_T0);
          _mm_prefetch((const char*)(pf + 3 * K + k), _MM_HINT_T0);
        }
        const __m512i xv = load64(xt + k, left);
        const __m512 d = _mm512_loadu_ps(v + p * 16);
        a0 = step_vnni(a0, w0 + k, xv, d, flip, left);
        a1 = step_vnni(a1, w0 + K + k, xv, d, flip, left);
        a2 = step_vnni(a2, w0 + 2 * K + k, xv, d, flip, left);
        a3 = step_vnni(a3, w0 + 3 * K + k, xv, d, flip, left);
      }
      float* yt = y + t * ldy + (n - r0);
      const float c = a->corr[t];
      yt[0] = (_mm512_reduce_add_ps(a0) - c) * ws[n];
      yt[1] = (_mm512_reduce_add_ps(a1) - c) * ws[n + 1];
      yt[2] = (_mm512_reduce_add_ps(a2) - c) * ws[n + 2];
      yt[3] = (_mm512_reduce_add_ps(a3) - c) * ws[n + 3];
    }
  }
  for (; n < r1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t t = 0; t < a->T; ++t) {
      const int8_t* xt = a->xq + t * K;
      const float* v = a->sv + t * P * 16;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t k = p * 64, left = K - k;
        acc = step_vnni(acc, row + k, load64(xt + k, left), _mm512_loadu_ps(v + p * 16), flip,
                        left);
      }
      y[t * ldy + (n - r0)] = (_mm512_reduce_add_ps(acc) - a->corr[t]) * ws[n];
    }
  }
}

static void rows(const Acts* a, const int8_t* w, const float* ws, int64_t r0, int64_t r1,
                 float* y, int64_t ldy) {
  if (isa == 1)
    rows_vnni(a, w, ws, r0, r1, y, ldy);
  else
    rows_avx2(a, w, ws, r0, r1, y, ldy);
}

// Thread tid's share [r0, r1) of N rows in blocks of 4, of nth threads.
static void share_t(int64_t N, int tid, int nth, int64_t* r0, int64_t* r1) {
  const int64_t blocks = (N + 3) / 4;
  const int64_t b0 = blocks * tid / nth, b1 = blocks * (tid + 1) / nth;
  *r0 = b0 * 4;
  *r1 = b1 * 4 < N ? b1 * 4 : N;
}


// Acts for T tokens of width K: quantized here (xq, xs, sv, corr in one malloc'd block).
static void* acts_alloc(Acts* a, int64_t T, int64_t K) {
  const int64_t nb = K / QK, P = (K + 63) / 64;
  const size_t bytes = (size_t)(T * K + 64) + sizeof(float) * (size_t)(T * nb + T * P * 16 + T);
  char* m = malloc(bytes + 64);
  if (!m) return NULL;
  float* f = (float*)(((uintptr_t)m + 63) & ~(uintptr_t)63);
  a->xs = f;
  a->sv = f + T * nb;
  a->corr = a->sv + T * P * 16;
  a->xq = (int8_t*)(a->corr + T);
  a->T = T;
  a->K = K;
  return m;
}

static void acts_fill(Acts* a, const float* x) {
  q8_quantize(x, a->T, a->K, (int8_t*)a->xq, (float*)a->xs);
  if (isa == 1) prep_vnni(a);
}

typedef struct {
  const Acts* a;
  const int8_t* w;
  const float* ws;
  int64_t N;
  float* y;
} Gemm;

static void team_run(void (*fn)(void*, int, int), void* ctx, int nth);

static void gemm_job(void* p, int tid, int nth) {
  const Gemm* c = p;
  int64_t r0, r1;
  share_t(c->N, tid, nth, &r0, &r1);
  rows(c->a, c->w, c->ws, r0, r1, c->y + r0, c->N);
}

// y [T, N] = x [T, K] (already quantized: xq, xs) times w [N, K] int8 with row scales ws [N].
// Returns 0, or -1 when scratch memory could not be allocated.
int q8_gemm(const int8_t* xq, const float* xs, int64_t T, int64_t K, const int8_t* w,
            const float* ws, int64_t N, float* y, int threads) {
  q8_isa(-1);
  Acts a = {xq, xs, NULL, NULL, T, K};
  void* m = NULL;
  if (isa == 1) {
    const int64_t P = (K + 63) / 64;
    m = malloc(sizeof(float) * (size_t)(T * P * 16 + T));
    if (!m) return -1;
    a.sv = m;
    a.corr = a.sv + T * P * 16;
    prep_vnni(&a);
  }
  Gemm c = {&a, w, ws, N, y};
  team_run(gemm_job, &c, threads);
  free(m);
  return 0;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

// exp of 8 floats (Cephes' expf: 2^n * a degree-5 polynomial on the remainder, ~1 ulp).
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// h[i] = silu(h[i]) * u[i] for i in [0, n)
static void silu_mul(float* h, const float* u, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(h + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) h[i] = silu(h[i]) * u[i];
}

// Tokens [t0, t1) of an Acts: quantized, and the VNNI path's scales prepared.
static void acts_fill_range(Acts* a, const float* x, int64_t t0, int64_t t1) {
  Acts part = *a;
  const int64_t nb = a->K / QK, P = (a->K + 63) / 64;
  part.xq = a->xq + t0 * a->K;
  part.xs = a->xs + t0 * nb;
  part.sv = a->sv + t0 * P * 16;
  part.corr = a->corr + t0;
  part.T = t1 - t0;
  acts_fill(&part, x + t0 * a->K);
}

typedef struct {
  const float* x;
  int64_t T, D, I;
  const int8_t* wg;
  const float* sg;
  const int8_t* wu;
  const float* su;
  const int8_t* wd;
  const float* sd;
  float *y, *h, *u;
  Acts *ax, *ah;
} Swiglu;

typedef struct {
  _Atomic uint32_t count, gen;
} Barrier;
static void bar_wait(Barrier* b, int nth);
static Barrier* team_barrier(void);

// The expert's first half: x quantized, h = silu(gate x) * (up x) for this thread's rows.
static void gateup_phase(const Swiglu* c, int tid, int nth) {
  const int64_t T = c->T, I = c->I;
  const int64_t t0 = T * tid / nth, t1 = T * (tid + 1) / nth;  // this thread's tokens
  if (t1 > t0) acts_fill_range(c->ax, c->x, t0, t1);
  bar_wait(team_barrier(), nth);
  int64_t r0, r1;
  share_t(I, tid, nth, &r0, &r1);
  rows(c->ax, c->wg, c->sg, r0, r1, c->h + r0, I);
  rows(c->ax, c->wu, c->su, r0, r1, c->u + r0, I);
  for (int64_t t = 0; t < T; ++t) silu_mul(c->h + t * I + r0, c->u + t * I + r0, r1 - r0);
}

// The second half: h quantized, y = down h for this thread's rows.
static void down_phase(const Swiglu* c, int tid, int nth) {
  const int64_t T = c->T, D = c->D;
  const int64_t t0 = T * tid / nth, t1 = T * (tid + 1) / nth;
  if (t1 > t0) acts_fill_range(c->ah, c->h, t0, t1);
  bar_wait(team_barrier(), nth);
  int64_t r0, r1;
  share_t(D, tid, nth, &r0, &r1);
  rows(c->ah, c->wd, c->sd, r0, r1, c->y + r0, D);
}

static void swiglu_job(void* p, int tid, int nth) {
  gateup_phase(p, tid, nth);
  bar_wait(team_barrier(), nth);
  down_phase(p, tid, nth);
}

static void gateup_job(void* p, int tid, int nth) { gateup_phase(p, tid, nth); }
static void down_job(void* p, int tid, int nth) { down_phase(p, tid, nth); }

// One SwiGLU expert for T tokens: y [T, D] = down(silu(gate(x)) * up(x)), x [T, D] f32,
// gate and up [I, D], down [D, I], each int8 with f32 row scales. D and I multiples of 32.
// One parallel region: x quantized once, gate and up rows side by side, h = silu(g) * u
// quantized, then the down rows. Returns 0, or -1 when scratch memory could not be allocated.
int q8_swiglu(const float* x, int64_t T, int64_t D, int64_t I, const int8_t* wg, const float* sg,
              const int8_t* wu, const float* su, const int8_t* wd, const float* sd, float* y,
              int threads) {
  q8_isa(-1);
  Acts ax, ah;
  void* mx = acts_alloc(&ax, T, D);
  void* mh = acts_alloc(&ah, T, I);
  float* h = malloc(sizeof(float) * (size_t)(T * I));
  float* u = malloc(sizeof(float) * (size_t)(T * I));
  int ok = mx && mh && h && u;
  if (ok) {
    Swiglu c = {x, T, D, I, wg, sg, wu, su, wd, sd, y, h, u, &ax, &ah};
    team_run(swiglu_job, &c, threads);
  }
  free(u);
  free(h);
  free(mh);
  free(mx);
  return ok ? 0 : -1;
}

// q8_swiglu in two calls, for an expert whose down rows are still being read when its gate
// and up rows have landed: q8_gateup writes h [T, I] (f32), q8_down then gives y [T, D] from
// it. The two give q8_swiglu's y bit for bit.
int q8_gateup(const float* x, int64_t T, int64_t D, int64_t I, const int8_t* wg, const float* sg,
              const int8_t* wu, const float* su, float* h, int threads) {
  q8_isa(-1);
  Acts ax;
  void* mx = acts_alloc(&ax, T, D);
  float* u = malloc(sizeof(float) * (size_t)(T * I));
  int ok = mx && u;
  if (ok) {
    Swiglu c = {x, T, D, I, wg, sg, wu, su, NULL, NULL, NULL, h, u, &ax, NULL};
    team_run(gateup_job, &c, threads);
  }
  free(u);
  free(mx);
  return ok ? 0 : -1;
}

int q8_down(const float* h, int64_t T, int64_t D, int64_t I, const int8_t* wd, const float* sd,
            float* y, int threads) {
  q8_isa(-1);
  Acts ah;
  void* mh = acts_alloc(&ah, T, I);
  if (!mh) return -1;
  Swiglu c = {NULL, T, D, I, NULL, NULL, NULL, NULL, wd, sd, y, (float*)h, NULL, NULL, &ah};
  team_run(down_job, &c, threads);
  free(mh);
  return 0;
}

// ---------------------------------------------------------------- mwq, computed as stored
//
// A weight in D²MoE's MWQ (formats/codecs/mwq.py) at level L is
//     W = (Q1 - z1) * s1 + sum_{l=2..L} s_l * B_l,   Q1 = sum_p 2^p bit_p, B_l = 2 bit_l - 1,
// with b1 code planes and one sign plane per further level, each plane one bit per weight in
// row-major order (little-endian bits), and f16 scales per group of `group` weights [N, G].
// With activations x = xs * xq (INT8 per block of 32) a row's dot product is
//     sum_j s1 sum_b xs_b sum_p 2^p P_p(b) + sum_l 2 s_l sum_b xs_b P_l(b)
//     - sum_j XS_j (s1 z1 + sum_l s_l),     P(b) = sum of xq_k over block b where the bit is 1,
// XS_j = sum over group j of x. P comes from vpdpbusd on the activations masked by the plane's
// bits (a 64-bit mask straight from the plane's bytes), so the weight is read as stored: a
// level costs its own bits and nothing is unpacked or repacked. AVX-512 VNNI where the CPU has
// it, else AVX2 (the bits expanded to byte masks). Needs K % 64 == 0, group % 64 == 0.

VNNI static void mwq_rows(const int8_t* xq, const float* sv, const float* XS, int64_t T,
                          int64_t K, const uint8_t* const* planes, int b1, int nplanes,
                          const uint16_t* const* scales, int64_t group, int64_t r0, int64_t r1,
                          float* y, int64_t ldy) {
  const int64_t G = K / group, P = K / 64, steps = group / 64;
  const int levels = nplanes - b1 + 1;  // 1 + sign levels
  __m512i pw[8];
  for (int p = 0; p < 8; ++p) pw[p] = _mm512_set1_epi8((char)(1 << p));
  const __m512i ones = pw[0];
  for (int64_t n = r0; n < r1; ++n) {
    const uint16_t* s1 = scales[0] + n * G;
    const uint16_t* z1 = scales[1] + n * G;
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* xt = xq + t * K;
      const float* vt = sv + t * P * 16;
      const float* XSt = XS + t * G;
      __m512 acc = _mm512_setzero_ps();
      float corr = 0.0f;
      for (int64_t j = 0; j < G; ++j) {
        float s[8];
        s[0] = _cvtsh_ss(s1[j]);
        float c = s[0] * _cvtsh_ss(z1[j]);
        for (int l = 1; l < levels; ++l) {
          s[l] = _cvtsh_ss(scales[l + 1][n * G + j]);
          c += s[l];
        }
        corr -= c * XSt[j];
        for (int64_t st = 0; st < steps; ++st) {
          const int64_t k = j * group + st * 64, bit = n * K + k;  // bit index of the weight
          const __m512i xv = _mm512_loadu_si512((const void*)(xt + k));
          const __m512 d = _mm512_loadu_ps(vt + (k / 64) * 16);
          __m512i base = _mm512_setzero_si512();
          for (int p = 0; p < b1; ++p) {
            const __mmask64 m = _cvtu64_mask64(*(const uint64_t*)(planes[p] + bit / 8));
            base = _mm512_dpbusd_epi32(base, pw[p], _mm512_maskz_mov_epi8(m, xv));
          }
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(base), _mm512_mul_ps(d, _mm512_set1_ps(s[0])),
                                acc);
          for (int l = 1; l < levels; ++l) {
            const __mmask64 m = _cvtu64_mask64(*(const uint64_t*)(planes[b1 + l - 1] + bit / 8));
            const __m512i pl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                                   _mm512_maskz_mov_epi8(m, xv));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pl),
                                  _mm512_mul_ps(d, _mm512_set1_ps(2.0f * s[l])), acc);
          }
        }
      }
      y[t * ldy + (n - r0)] = _mm512_reduce_add_ps(acc) + corr;
    }
  }
}

// One token's sums over groups [j0, j1) of R rows unpacked to bytes (u: R x levels rows of
// K; s, c: each row's scales and corrections, 64 groups a row): out[r].
VNNI static inline __attribute__((always_inline)) void mwq_token(
    const int8_t* xt, const float* vt, const float* XSt, const uint8_t* u, int64_t K,
    int64_t group, int64_t j0, int64_t j1, const float* s, const float* c, const int levels,
    const int R, float* out) {
  const int64_t steps = group / 64;
  __m512 acc[4];
  float corr[4];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), corr[r] = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    __m512 lv[4][4];
    for (int r = 0; r < R; ++r) {
      corr[r] -= c[r * 64 + (j - j0)] * XSt[j];
      for (int l = 0; l < levels; ++l) lv[r][l] = _mm512_setzero_ps();
    }
    for (int64_t st = 0; st < steps; ++st) {
      const int64_t k = j * group + st * 64;
      const __m512i xv = _mm512_loadu_si512((const void*)(xt + k));
      const __m512 d = _mm512_loadu_ps(vt + (k / 64) * 16);
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < levels; ++l) {
          const __m512i w = _mm512_loadu_si512((const void*)(u + (r * levels + l) * K + k));
          const __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
          lv[r][l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), d, lv[r][l]);
        }
    }
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < levels; ++l)
        acc[r] = _mm512_fmadd_ps(lv[r][l], _mm512_set1_ps(s[(r * 64 + (j - j0)) * 8 + l]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + corr[r];
}

// The same for several tokens (prefill): rows are first unpacked to bytes, 4 at a time, the
// codes Q1 (sum_p 2^p bit_p) and each sign plane's bits, so a token costs one vpdpbusd per
// level and 64 weights instead of one per plane, and each activation load serves 4 rows;
// each level's products are summed over the group with the activation scales, then scaled by
// the group's s once. `u` is the thread's scratch of 4 * levels * K bytes. Levels 1-4 only
// (the caller checks).
VNNI static void mwq_rows_unpacked(const int8_t* xq, const float* sv, const float* XS, int64_t T,
                                   int64_t K, const uint8_t* const* planes, int b1, int nplanes,
                                   const uint16_t* const* scales, int64_t group, int64_t r0,
                                   int64_t r1, float* y, int64_t ldy, uint8_t* u) {
  const int64_t G = K / group, P = K / 64;
  const int levels = nplanes - b1 + 1;
  float s[4 * 64 * 8], c[4 * 64];  // each row's scales (2 s_l for signs) and corrections
  for (int64_t n0 = r0; n0 < r1; n0 += 4) {
    const int R = r1 - n0 < 4 ? (int)(r1 - n0) : 4;
    for (int r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; k += 64) {
        const int64_t bit = (n0 + r) * K + k;
        __m512i q = _mm512_setzero_si512();
        for (int p = 0; p < b1; ++p) {
          const __mmask64 m = _cvtu64_mask64(*(const uint64_t*)(planes[p] + bit / 8));
          q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(m, _mm512_set1_epi8((char)(1 << p))));
        }
        _mm512_storeu_si512((void*)(u + (r * levels) * K + k), q);
        for (int l = 1; l < levels; ++l) {
          const __mmask64 m = _cvtu64_mask64(*(const uint64_t*)(planes[b1 + l - 1] + bit / 8));
          _mm512_storeu_si512((void*)(u + (r * levels + l) * K + k),
                              _mm512_maskz_mov_epi8(m, _mm512_set1_epi8(1)));
        }
      }
    for (int64_t j0 = 0; j0 < G; j0 += 64) {
      const int64_t j1 = j0 + 64 < G ? j0 + 64 : G;
      for (int r = 0; r < R; ++r)
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t n = n0 + r;
          float* sj = s + (r * 64 + (j - j0)) * 8;
          sj[0] = _cvtsh_ss(scales[0][n * G + j]);
          float cj = sj[0] * _cvtsh_ss(scales[1][n * G + j]);
          for (int l = 1; l < levels; ++l) {
            sj[l] = _cvtsh_ss(scales[l + 1][n * G + j]);
            cj += sj[l];
            sj[l] *= 2.0f;
          }
          c[r * 64 + (j - j0)] = cj;
        }
      for (int64_t t = 0; t < T; ++t) {
        float got[4];
        const int8_t* xt = xq + t * K;
        const float* vt = sv + t * P * 16;
        const float* XSt = XS + t * G;
#define MWQ_TOKEN(L, RR) mwq_token(xt, vt, XSt, u, K, group, j0, j1, s, c, L, RR, got)
        if (R == 4) {
          switch (levels) {  // constant counts: the accumulators stay in registers
            case 1: MWQ_TOKEN(1, 4); break;
            case 2: MWQ_TOKEN(2, 4); break;
            case 3: MWQ_TOKEN(3, 4); break;
            default: MWQ_TOKEN(4, 4);
          }
        } else {
          MWQ_TOKEN(levels, R);
        }
#undef MWQ_TOKEN
        for (int r = 0; r < R; ++r) {
          float* yt = y + t * ldy + (n0 + r - r0);
          *yt = j0 == 0 ? got[r] : *yt + got[r];
        }
      }
    }
  }
}

// The bits of m (32 weights) as bytes: 0xFF where the bit is 1.
static inline __m256i expand_bits(uint32_t m) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
                                        2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), shuf);
  return _mm256_cmpeq_epi8(_mm256_and_si256(b, sel), sel);
}

// The same sum on AVX2, a block of 32 at a time: each plane's bits expanded to a byte mask
// (shuffle, and, compare), the masked activations summed by maddubs (the code planes weighted
// 2^p in one int16 sum: at most 2 * 127 * (2^7 - 1) = 32258, no saturation).
static void mwq_rows_avx2(const int8_t* xq, const float* xs, const float* XS, int64_t T,
                          int64_t K, const uint8_t* const* planes, int b1, int nplanes,
                          const uint16_t* const* scales, int64_t group, int64_t r0, int64_t r1,
                          float* y, int64_t ldy) {
  const int64_t G = K / group, nb = K / QK, per = group / QK;
  const int levels = nplanes - b1 + 1;
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t n = r0; n < r1; ++n) {
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* xt = xq + t * K;
      const float* st = xs + t * nb;
      __m256 acc = _mm256_setzero_ps();
      float corr = 0.0f;
      for (int64_t j = 0; j < G; ++j) {
        float s[8];
        s[0] = _cvtsh_ss(scales[0][n * G + j]);
        float c = s[0] * _cvtsh_ss(scales[1][n * G + j]);
        for (int l = 1; l < levels; ++l) {
          s[l] = _cvtsh_ss(scales[l + 1][n * G + j]);
          c += s[l];
        }
        corr -= c * XS[t * G + j];
        for (int64_t b = j * per; b < (j + 1) * per; ++b) {
          const int64_t bit = n * K + b * QK;
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + b * QK));
          __m256i base = _mm256_setzero_si256();
          for (int p = 0; p < b1; ++p) {
            const uint32_t m = *(const uint32_t*)(planes[p] + bit / 8);
            const __m256i xm = _mm256_and_si256(expand_bits(m), xv);
            base = _mm256_add_epi16(base, _mm256_maddubs_epi16(_mm256_set1_epi8((char)(1 << p)), xm));
          }
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(base, ones16)),
                                _mm256_set1_ps(st[b] * s[0]), acc);
          for (int l = 1; l < levels; ++l) {
            const uint32_t m = *(const uint32_t*)(planes[b1 + l - 1] + bit / 8);
            const __m256i xm = _mm256_and_si256(expand_bits(m), xv);
            const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, xm), ones16);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), _mm256_set1_ps(2.0f * st[b] * s[l]), acc);
          }
        }
      }
      y[t * ldy + (n - r0)] = hsum(acc) + corr;
    }
  }
}

// From this many tokens on, rows are unpacked first (measured: see tools/kernel_table.py).
#ifndef MWQ_UNPACK_T
#define MWQ_UNPACK_T 4
#endif

typedef struct {
  const Acts* a;
  const float* XS;
  int64_t T, K;
  const uint8_t* const* planes;
  int b1, nplanes;
  const uint16_t* const* scales;
  int64_t N, group;
  float* y;
} Mwq;

static void mwq_job(void* p, int tid, int nth) {
  const Mwq* c = p;
  const int64_t N = c->N, T = c->T, K = c->K, r0 = N * tid / nth, r1 = N * (tid + 1) / nth;
  const int levels = c->nplanes - c->b1 + 1;
  uint8_t* u = (isa == 1 && T >= MWQ_UNPACK_T && levels <= 4) ? malloc((size_t)(4 * levels) * K)
                                                              : NULL;
  if (u)
    mwq_rows_unpacked(c->a->xq, c->a->sv, c->XS, T, K, c->planes, c->b1, c->nplanes, c->scales,
                      c->group, r0, r1, c->y + r0, N, u);
  else if (isa == 1)
    mwq_rows(c->a->xq, c->a->sv, c->XS, T, K, c->planes, c->b1, c->nplanes, c->scales, c->group,
             r0, r1, c->y + r0, N);
  else
    mwq_rows_avx2(c->a->xq, c->a->xs, c->XS, T, K, c->planes, c->b1, c->nplanes, c->scales,
                  c->group, r0, r1, c->y + r0, N);
  free(u);
}

// y [T, N] = x [T, K] f32 times an mwq weight at level `levels` (1 + the sign planes given):
// planes[0..b1) the code planes, planes[b1..) the sign planes, scales = s1, z1, s2, ... (f16
// [N, G] each). Returns 0, or -1 when scratch memory could not be allocated.
// XS [T, K / group]: each group's sum of the INT8-rounded activations (see mwq_rows).
static void mwq_xs(const Acts* a, int64_t group, float* XS) {
  const int64_t T = a->T, K = a->K, G = K / group, per = group / QK;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < G; ++j) {
      double s = 0.0;
      for (int64_t b = j * per; b < (j + 1) * per; ++b) {
        int32_t q = 0;
        for (int i = 0; i < QK; ++i) q += a->xq[t * K + b * QK + i];
        s += (double)a->xs[t * (K / QK) + b] * q;
      }
      XS[t * G + j] = (float)s;
    }
}

int mwq_gemm(const float* x, int64_t T, int64_t K, const uint8_t* const* planes, int b1,
             int nplanes, const uint16_t* const* scales, int64_t N, int64_t group, float* y,
             int threads) {
  q8_isa(-1);
  Acts a;
  const int64_t G = K / group;
  void* m = acts_alloc(&a, T, K);
  float* XS = malloc(sizeof(float) * (size_t)(T * G));
  if (!m || !XS) {
    free(m);
    free(XS);
    return -1;
  }
  acts_fill(&a, x);
  mwq_xs(&a, group, XS);
  Mwq c = {&a, XS, T, K, planes, b1, nplanes, scales, N, group, y};
  team_run(mwq_job, &c, threads);
  free(XS);
  free(m);
  return 0;
}


// ---------------------------------------------------------------- the decode team
//
// A decode step calls a kernel every few tens of microseconds. With OpenMP's passive wait
// (edgemoe sets it: a spinning pool cut decode 3x when another process used the second
// core) every region start and every barrier puts a thread to sleep and wakes it again,
// ~30-50 us each on this VM: 2-3 ms of a 40 ms token. libgomp's spin count is one setting
// for every region, torch's included: 30000 spins sped decode 12% on a quiet machine and
// slowed it 45% with the other core busy (measured). The fused decode kernels run on their
// own team instead, whose threads spin for a bounded time (SPIN_NS) before they sleep on a
// futex: a barrier the other thread reaches within microseconds costs no sleep, and a
// thread waits at most SPIN_NS of CPU for work that does not come. The team is made on
// first use (threads - 1 workers) and again after a fork.
//
// Where its workers wake: on any CPU the process may use but the caller's (the caller runs
// its own share of every job). Left to the scheduler, a worker woken after an I/O stall was
// often placed on the caller's CPU, and the two shares of a job ran one after the other:
// two cached experts of the bench model took 5.3 ms in a 50%-cap decode against 2.6 ms
// uncapped, and 5.29 ms against 2.93 ms with the worker kept off the caller's CPU, called
// after 30 ms waits as a decode calls it after its stalls (tools/team_placement.py,
// docs/BENCHMARKS.md). In 50%-cap decode (traced) a
// layer on two cached experts went from 5.0-5.5 to 2.8-3.2 ms, the gap between MoE layers
// (attention) from 1.4-1.5 to 0.8-1.0 ms; decode +4% at 50%, +3% at 25% (cold, paired). The caller is not pinned (that
// cost cold prefill 16%: threads it starts inherit its mask), nor is any other
// thread: each job checks the caller's CPU (sched_getcpu, no system call) and moves the
// workers' mask only when it changed. EDGEMOE_TEAM_PLACE=0 leaves placement to the
// scheduler.

#define SPIN_NS 50000
#define MAX_TEAM 64

static __thread int team_tid = -1;  // this thread's place in the job it runs (-1: none)
static uint64_t team_waited[MAX_TEAM];  // ns each team thread waited in the current job's barriers
static uint64_t team_worked[MAX_TEAM];  // ns each team thread spent on the current job, waits excluded

static long futex(_Atomic uint32_t* a, int op, uint32_t v) {
  return syscall(SYS_futex, (uint32_t*)a, op, v, NULL, NULL, 0);
}

static inline uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

// Wait until *a != old: spin SPIN_NS, then sleep on the futex.
static void wait_change(_Atomic uint32_t* a, uint32_t old) {
  if (atomic_load(a) != old) return;
  const uint64_t t0 = now_ns();
  for (int i = 0;; ++i) {
    if (atomic_load(a) != old) return;
    _mm_pause();
    if ((i & 63) == 63 && now_ns() - t0 > SPIN_NS) break;
  }
  while (atomic_load(a) == old) futex(a, FUTEX_WAIT_PRIVATE, old);
}

static void bar_wait(Barrier* b, int nth) {
  if (nth <= 1) return;
  const uint32_t g = atomic_load(&b->gen);
  if (atomic_fetch_add(&b->count, 1) + 1 == (uint32_t)nth) {
    atomic_store(&b->count, 0);
    atomic_fetch_add(&b->gen, 1);
    futex(&b->gen, FUTEX_WAKE_PRIVATE, MAX_TEAM);
    return;
  }
  if (team_tid < 0) {
    wait_change(&b->gen, g);
    return;
  }
  const uint64_t t0 = now_ns();
  wait_change(&b->gen, g);
  team_waited[team_tid] += now_ns() - t0;
}

typedef void (*job_fn)(void* ctx, int tid, int nth);

static struct {
  pthread_mutex_t lock;  // one job at a time (kernels may be called from several threads)
  int workers;  // threads started
  pid_t pid;  // the process that started them (a forked child starts its own)
  _Atomic uint32_t gen, left;  // job number; workers still in the current job
  job_fn fn;
  void* ctx;
  int nth;
  Barrier bar;
  uint32_t born[MAX_TEAM];  // the job number when each worker was started: it waits for the next
  pthread_t tids[MAX_TEAM];
  int place;  // keep the workers off the caller's CPU (see above); -1: not read yet
  int off;  // the CPU the workers' mask leaves out now (-1: none)
  int backoff;  // jobs left before placing the workers again (see team_judge)
} team = {PTHREAD_MUTEX_INITIALIZER, 0, 0};

// Every worker's CPU mask (call with team.lock held).
static void team_mask(const cpu_set_t* m) {
  for (int k = 1; k <= team.workers; ++k) pthread_setaffinity_np(team.tids[k], sizeof *m, m);
}

// Keep the workers off the CPU the caller runs on (call with team.lock held).
static void team_place(void) {
  if (team.place < 0) {
    const char* e = getenv("EDGEMOE_TEAM_PLACE");
    team.place = !(e && e[0] == '0');
    team.off = -1;
  }
  if (!team.place || team.workers == 0) return;
  if (team.backoff > 0) {
    team.backoff--;
    return;
  }
  const int cpu = sched_getcpu();
  if (cpu < 0 || cpu == team.off) return;
  cpu_set_t m;
  if (sched_getaffinity(0, sizeof m, &m) != 0 || !CPU_ISSET(cpu, &m) || CPU_COUNT(&m) < 2) return;
  CPU_CLR(cpu, &m);
  team_mask(&m);
  team.off = cpu;
}

// After a job: when a worker took more than twice as long as the caller over its share of
// the job, waits excluded (its CPU is busy with another process, which it now shares), give
// the workers every CPU again for 64 jobs, then place them again. With a busy loop on the
// second core, placing them every job cost uncapped decode 7% (17.4 against 18.7 tok/s);
// with this rule it is 18.3 against 18.0 (3 cold runs each, paired). A worker that is only
// slow to wake does not count (its start is not in its time): a CPU that comes back from
// idle after an I/O stall is the case placement is for. The first rule tried, the caller's
// waits against its work, took wake-ups for contention and undid the placement in decode.
static void team_judge(int nth) {
  const uint64_t worked = team_worked[0];
  uint64_t slowest = 0;
  for (int k = 1; k < nth; ++k)
    if (team_worked[k] > slowest) slowest = team_worked[k];
  if (team.off < 0 || worked < 200000 || slowest <= 2 * worked) return;
  cpu_set_t m;
  if (sched_getaffinity(0, sizeof m, &m) != 0) return;
  team_mask(&m);
  team.off = -1;
  team.backoff = 64;
}

static Barrier* team_barrier(void) { return &team.bar; }

static void* team_worker(void* arg) {
  const int tid = (int)(intptr_t)arg;
  uint32_t seen = team.born[tid];
  team_tid = tid;
  for (;;) {
    wait_change(&team.gen, seen);
    seen = atomic_load(&team.gen);
    if (tid < team.nth) {
      team_waited[tid] = 0;
      const uint64_t t0 = now_ns();
      team.fn(team.ctx, tid, team.nth);
      team_worked[tid] = now_ns() - t0 - team_waited[tid];
    }
    if (atomic_fetch_sub(&team.left, 1) == 1) futex(&team.left, FUTEX_WAKE_PRIVATE, 1);
  }
  return NULL;
}

// Run fn(ctx, tid, nth) on nth threads (this one is tid 0) and return when all are done.
static void team_run(job_fn fn, void* ctx, int nth) {
  if (nth > MAX_TEAM) nth = MAX_TEAM;
  pthread_mutex_lock(&team.lock);
  if (team.pid != getpid()) {  // first use, or a forked child: its parent's workers are gone
    team.workers = 0;
    team.pid = getpid();
    team.place = -1;
    atomic_store(&team.gen, 0);
  }
  while (team.workers < nth - 1) {
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    team.born[team.workers + 1] = atomic_load(&team.gen);
    if (pthread_create(&t, &at, team_worker, (void*)(intptr_t)(team.workers + 1)) != 0) {
      pthread_attr_destroy(&at);
      break;
    }
    pthread_attr_destroy(&at);
    team.tids[++team.workers] = t;
    team.off = -1;  // the new worker's mask is the caller's whole one
  }
  if (nth > team.workers + 1) nth = team.workers + 1;
  if (nth > 1) {
    team_place();
    team.fn = fn;
    team.ctx = ctx;
    team.nth = nth;
    atomic_store(&team.bar.count, 0);
    atomic_store(&team.left, (uint32_t)team.workers);
    atomic_fetch_add(&team.gen, 1);
    futex(&team.gen, FUTEX_WAKE_PRIVATE, MAX_TEAM);
  }
  team_tid = 0;
  team_waited[0] = 0;
  const uint64_t t0 = now_ns();
  fn(ctx, 0, nth);
  team_worked[0] = now_ns() - t0 - team_waited[0];
  if (nth > 1) {
    for (uint32_t v; (v = atomic_load(&team.left)) != 0;) wait_change(&team.left, v);
    team_judge(nth);
  }
  team_tid = -1;
  pthread_mutex_unlock(&team.lock);
}

// ---------------------------------------------------------------- one token through a layer
//
// A decode step of one sequence spends as long in the glue between kernels as in small
// kernels: norms, rotary, the KV store, attention over a few hundred keys, the router, one
// kernel call and one thread wake-up per matrix and per expert. layer1_attn runs a layer's
// attention half for one token in one parallel region, and q8_moe1 all of a token's routed
// experts of a layer in another (edgemoe/fused.py). Where the model computes in bfloat16
// (`rnd`) every value is rounded where torch rounds it on the same path (models/base.py),
// so the step follows the one it replaces but for the order of float sums.

static inline float bf16r(float f) {  // to bfloat16, nearest even, as torch's .to(bfloat16)
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

static inline float rd(float f, int rnd) { return rnd ? bf16r(f) : f; }

// 8 cached numbers from index i (Dh is a multiple of 8)
static inline __m256 kv8(const void* base, int64_t i, int kv16) {
  if (!kv16) return _mm256_loadu_ps((const float*)base + i);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline void kv_put(void* base, int64_t i, float f, int kv16) {
  if (!kv16) {
    ((float*)base)[i] = f;
    return;
  }
  uint32_t u;
  memcpy(&u, &f, 4);  // f is already a bfloat16 value: its top half is exact
  ((uint16_t*)base)[i] = (uint16_t)(u >> 16);
}

// y = rms_norm(x) * w, as models/base.py computes it (f32 sum, one rounding at the end).
static void rms1(const float* x, const float* w, int64_t D, float eps, int rnd, float* y) {
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.0f / sqrtf(ss / (float)D + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = rd(w[i] * (x[i] * r), rnd);
}

typedef struct {
  int64_t D, H, Hkv, Dh, E;
  float eps, scale;
  const float *ln1, *ln2;  // f32 [D]
  const int8_t *wq, *wk, *wv, *wo;  // int8 codes [H*Dh, D], [Hkv*Dh, D] x2, [D, H*Dh]
  const float *sq, *sk, *sv, *so;  // their f32 row scales
  const float* router;  // f32 [E, D]
  int rnd;  // 1: the model computes in bfloat16
  int topk, norm;  // routing in the kernel: softmax, the top k (renormalised when norm); 0: none
} Layer1;

// One token through a layer's attention half, in place on the residual x [D] (f32 holding the
// model dtype's values): x += o(attend(rope(q), rope(k) and v stored at `pos` of this slot's
// cache kc/vc [Hkv, max_len, Dh])); then xn = norm2(x) and logits [E] = router . xn (f32).
// cosv/sinv [Dh]: the position's rotary table in the model's dtype. With L->topk, the token's
// routing too: ids [topk] int64 and their weights wts [topk]. Each thread takes whole
// heads (its q heads' rows, rotary and attention; its KV heads' rows and store) and repeats
// the cheap serial steps (norms, quantizing a vector) on its own copy, so the team waits at
// three barriers: keys stored, heads attended, residual updated. Returns 0, or -1 when
// scratch memory could not be allocated.
typedef struct {
  const Layer1* L;
  float *x, *xn, *logits, *q, *k, *v, *o, *y, *own, *sc, *wts;
  int64_t* ids;
  const float *cosv, *sinv;
  void *kc, *vc;
  int64_t max_len, pos, per;
  int kv16;
  Acts* ax;
} Attn1;

static void attn1_job(void* p, int tid, int nth) {
  const Attn1* c = p;
  const Layer1* L = c->L;
  const int64_t D = L->D, Dh = L->Dh, H = L->H, Hkv = L->Hkv, Nq = H * Dh, Nkv = Hkv * Dh;
  const int64_t len = c->pos + 1, group = H / Hkv, half = Dh / 2, max_len = c->max_len;
  const int rnd = L->rnd, kv16 = c->kv16;
  float *x = c->x, *q = c->q, *k = c->k, *v = c->v, *o = c->o, *y = c->y;
  float* h = c->own + tid * c->per;  // norm1 output, then norm2 output
  Acts* a = &c->ax[2 * tid];
  const int64_t h0 = H * tid / nth, h1 = H * (tid + 1) / nth;  // this thread's q heads
  const int64_t g0 = Hkv * tid / nth, g1 = Hkv * (tid + 1) / nth;  // and KV heads
  rms1(x, L->ln1, D, L->eps, rnd, h);
  acts_fill(a, h);
  rows(a, L->wq, L->sq, h0 * Dh, h1 * Dh, q + h0 * Dh, Nq);
  rows(a, L->wk, L->sk, g0 * Dh, g1 * Dh, k + g0 * Dh, Nkv);
  rows(a, L->wv, L->sv, g0 * Dh, g1 * Dh, v + g0 * Dh, Nkv);
  // rotate-half rotary in the model's dtype: x * cos + rotate_half(x) * sin, each product and
  // the sum rounded as torch's bfloat16 ops round them
  float tmp[Dh];
  for (int64_t hd = 0; hd < (h1 - h0) + (g1 - g0); ++hd) {
    float* t = hd < h1 - h0 ? q + (h0 + hd) * Dh : k + (g0 + hd - (h1 - h0)) * Dh;
    for (int64_t i = 0; i < Dh; ++i) tmp[i] = rd(t[i], rnd);
    for (int64_t i = 0; i < Dh; ++i) {
      const float rot = i < half ? -tmp[i + half] : tmp[i - half];
      t[i] = rd(rd(tmp[i] * c->cosv[i], rnd) + rd(rot * c->sinv[i], rnd), rnd);
    }
  }
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t i = 0; i < Dh; ++i) {
      kv_put(c->kc, (g * max_len + c->pos) * Dh + i, k[g * Dh + i], kv16);
      kv_put(c->vc, (g * max_len + c->pos) * Dh + i, rd(v[g * Dh + i], rnd), kv16);
    }
  bar_wait(&team.bar, nth);
  for (int64_t hd = h0; hd < h1; ++hd) {
    const int64_t g = hd / group;
    const float* qh = q + hd * Dh;
    float* s = c->sc + hd * len;
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t at = (g * max_len + j) * Dh;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < Dh; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), kv8(c->kc, at + i, kv16), acc);
      s[j] = hsum(acc) * L->scale;
      if (s[j] > m) m = s[j];
    }
    float z = 0.0f;
    for (int64_t j = 0; j < len; ++j) z += (s[j] = expf(s[j] - m));
    float* oh = o + hd * Dh;
    for (int64_t i = 0; i < Dh; i += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < len; ++j)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), kv8(c->vc, (g * max_len + j) * Dh + i, kv16),
                              acc);
      _mm256_storeu_ps(oh + i, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / z)));
    }
    for (int64_t i = 0; i < Dh; ++i) oh[i] = rd(oh[i], rnd);
  }
  bar_wait(&team.bar, nth);
  int64_t r0, r1;
  acts_fill(&c->ax[2 * tid + 1], o);
  share_t(D, tid, nth, &r0, &r1);
  rows(&c->ax[2 * tid + 1], L->wo, L->so, r0, r1, y + r0, D);
  for (int64_t i = r0; i < r1; ++i) x[i] = rd(x[i] + rd(y[i], rnd), rnd);
  bar_wait(&team.bar, nth);
  rms1(x, L->ln2, D, L->eps, rnd, h);
  if (tid != 0 || !L->router) return;
  memcpy(c->xn, h, sizeof(float) * (size_t)D);
  for (int64_t e = 0; e < L->E; ++e) {  // router logits, f32
    const float* w = L->router + e * D;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(h + i), acc);
    float d = hsum(acc);
    for (; i < D; ++i) d += w[i] * h[i];
    c->logits[e] = d;
  }
  if (L->topk <= 0) return;
  // softmax over all experts, the top k (ties to the lower expert), renormalised if asked:
  // moe/router.py softmax_topk
  float m = -INFINITY, z = 0.0f;
  for (int64_t e = 0; e < L->E; ++e) m = c->logits[e] > m ? c->logits[e] : m;
  float pr[L->E];
  for (int64_t e = 0; e < L->E; ++e) z += (pr[e] = expf(c->logits[e] - m));
  for (int64_t e = 0; e < L->E; ++e) pr[e] /= z;
  float sum = 0.0f;
  for (int j = 0; j < L->topk; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < L->E; ++e) {
      int taken = 0;
      for (int i = 0; i < j; ++i) taken |= c->ids[i] == e;
      if (!taken && (best < 0 || pr[e] > pr[best])) best = e;
    }
    c->ids[j] = best;
    c->wts[j] = pr[best];
    sum += pr[best];
  }
  if (L->norm)
    for (int j = 0; j < L->topk; ++j) c->wts[j] /= sum;
}

int layer1_attn(const Layer1* L, float* x, float* xn, float* logits, int64_t* ids, float* wts,
                const float* cosv, const float* sinv, void* kc, void* vc, int64_t max_len,
                int64_t pos, int kv16, int threads) {
  q8_isa(-1);
  const int64_t D = L->D, Nq = L->H * L->Dh, Nkv = L->Hkv * L->Dh;
  if (threads < 1) threads = 1;
  if (threads > MAX_TEAM) threads = MAX_TEAM;
  const int64_t per = 2 * D + Nq;  // a thread's own norm outputs
  float* buf = malloc(sizeof(float) * (size_t)(Nq + 2 * Nkv + Nq + D + threads * per));
  float* sc = malloc(sizeof(float) * (size_t)(L->H * (pos + 1)));
  Acts* ax = calloc((size_t)(2 * threads), sizeof(Acts));
  void** mem = calloc((size_t)(2 * threads), sizeof(void*));
  int ok = buf && sc && ax && mem;
  for (int i = 0; ok && i < threads; ++i)
    ok = (mem[2 * i] = acts_alloc(&ax[2 * i], 1, D)) &&
         (mem[2 * i + 1] = acts_alloc(&ax[2 * i + 1], 1, Nq));
  if (ok) {
    Attn1 c = {L, x, xn, logits, buf, buf + Nq, buf + Nq + Nkv, buf + Nq + 2 * Nkv,
               buf + 2 * Nq + 2 * Nkv, buf + 2 * Nq + 2 * Nkv + D, sc, wts, ids, cosv, sinv,
               kc, vc, max_len, pos, per, kv16, ax};
    team_run(attn1_job, &c, threads);
  }
  for (int i = 0; mem && i < 2 * threads; ++i) free(mem[i]);
  free(mem);
  free(ax);
  free(sc);
  free(buf);
  return ok ? 0 : -1;
}

// One token's routed experts of a layer: out [D] += sum_e coef[e] * down_e(silu(gate_e(x)) *
// up_e(x)), x [D] f32, each expert's three int8 weights and f32 row scales given by pointer.
// One team job for all n experts: x quantized by each thread, every expert's gate and up rows,
// then every expert's down rows, each thread adding its rows of every expert into out in
// expert order (the sum moe/combine.py makes). rnd: each expert's output is rounded to
// bfloat16 first (the model computes in it). Returns 0, or -1 when scratch memory could not
// be allocated.
typedef struct {
  const float* x;
  int64_t D, I;
  int n, rnd;
  const int8_t *const *wg, *const *wu, *const *wd;
  const float *const *sg, *const *su, *const *sd;
  const float* coef;
  float *out, *h, *u, *y;
  Acts *ax, *ah;
} Moe1;

static void moe1_job(void* p, int tid, int nth) {
  const Moe1* c = p;
  const int64_t D = c->D, I = c->I;
  int64_t r0, r1;
  acts_fill(&c->ax[tid], c->x);
  share_t(I, tid, nth, &r0, &r1);
  for (int e = 0; e < c->n; ++e) {
    rows(&c->ax[tid], c->wg[e], c->sg[e], r0, r1, c->h + e * I + r0, I);
    rows(&c->ax[tid], c->wu[e], c->su[e], r0, r1, c->u + e * I + r0, I);
    silu_mul(c->h + e * I + r0, c->u + e * I + r0, r1 - r0);
  }
  bar_wait(&team.bar, nth);
  for (int e = tid; e < c->n; e += nth) acts_fill(&c->ah[e], c->h + e * I);
  bar_wait(&team.bar, nth);
  share_t(D, tid, nth, &r0, &r1);
  for (int e = 0; e < c->n; ++e) rows(&c->ah[e], c->wd[e], c->sd[e], r0, r1, c->y + e * D + r0, D);
  for (int e = 0; e < c->n; ++e)
    for (int64_t i = r0; i < r1; ++i) c->out[i] += c->coef[e] * rd(c->y[e * D + i], c->rnd);
}

// The scratch of one token's experts (q8_moe1, mwq_moe1): activations of x per thread and
// of each expert's hidden state, h and u [n, I] and the experts' outputs y [n, D].
typedef struct {
  Acts *ax, *ah;
  void** mem;
  float* h;
  int n, threads;
} Room1;

static int room1(Room1* r, int n, int threads, int64_t D, int64_t I) {
  r->n = n;
  r->threads = threads < 1 ? 1 : threads > MAX_TEAM ? MAX_TEAM : threads;
  r->ax = calloc((size_t)r->threads, sizeof(Acts));
  r->ah = calloc((size_t)n, sizeof(Acts));
  r->mem = calloc((size_t)(n + r->threads), sizeof(void*));
  r->h = malloc(sizeof(float) * (size_t)(2 * n * I + n * D));
  int ok = r->ax && r->ah && r->mem && r->h;
  for (int e = 0; ok && e < n; ++e) ok = (r->mem[e] = acts_alloc(&r->ah[e], 1, I)) != NULL;
  for (int t = 0; ok && t < r->threads; ++t)
    ok = (r->mem[n + t] = acts_alloc(&r->ax[t], 1, D)) != NULL;
  return ok;
}

static void room1_free(Room1* r) {
  for (int i = 0; r->mem && i < r->n + r->threads; ++i) free(r->mem[i]);
  free(r->mem);
  free(r->h);
  free(r->ah);
  free(r->ax);
}

int q8_moe1(const float* x, int64_t D, int64_t I, int n, const int8_t* const* wg,
            const float* const* sg, const int8_t* const* wu, const float* const* su,
            const int8_t* const* wd, const float* const* sd, const float* coef, int rnd,
            float* out, int threads) {
  q8_isa(-1);
  Room1 r;
  const int ok = room1(&r, n, threads, D, I);
  if (ok) {
    Moe1 c = {x, D, I, n, rnd, wg, wu, wd, sg, su, sd, coef, out, r.h, r.h + n * I,
              r.h + 2 * n * I, r.ax, r.ah};
    team_run(moe1_job, &c, r.threads);
  }
  room1_free(&r);
  return ok ? 0 : -1;
}

// ---------------------------------------------------------------- a token's mwq experts
//
// out [D] += sum_e coef[e] * down_e(silu(gate_e(x)) * up_e(x)) for one token, every weight
// an mwq one at its own level (MwqW: its planes and scales as mwq_gemm takes them), in one
// call as q8_moe1 does for INT8: x quantized once per thread, one wake-up of the team. The
// gate and up weights share one group size, the down weights another.
#define MWQ_MAXP 16
typedef struct {
  const uint8_t* planes[MWQ_MAXP];
  const uint16_t* scales[MWQ_MAXP + 2];
  int b1, nplanes;
  int64_t group;
} MwqW;

static void mwq_any(const Acts* a, const float* XS, const MwqW* w, int64_t r0, int64_t r1,
                    float* y, int64_t ldy) {
  if (isa == 1)
    mwq_rows(a->xq, a->sv, XS, a->T, a->K, w->planes, w->b1, w->nplanes, w->scales, w->group,
             r0, r1, y, ldy);
  else
    mwq_rows_avx2(a->xq, a->xs, XS, a->T, a->K, w->planes, w->b1, w->nplanes, w->scales,
                  w->group, r0, r1, y, ldy);
}

typedef struct {
  const float* x;
  int64_t D, I;
  int n, rnd;
  const MwqW* w;  // [n][3]: gate, up, down
  const float* coef;
  float* out;
  float *h, *u, *y;  // [n, I], [n, I], [n, D]
  Acts *ax, *ah;     // x per thread, h per expert
  float *xsx, *xsh;  // their group sums
} MwqMoe1;

static void mwq_moe1_job(void* p, int tid, int nth) {
  const MwqMoe1* c = p;
  const int64_t D = c->D, I = c->I, GD = D / c->w[0].group, GI = I / c->w[2].group;
  int64_t r0, r1;
  acts_fill(&c->ax[tid], c->x);
  mwq_xs(&c->ax[tid], c->w[0].group, c->xsx + tid * GD);
  share_t(I, tid, nth, &r0, &r1);
  for (int e = 0; e < c->n; ++e) {
    mwq_any(&c->ax[tid], c->xsx + tid * GD, &c->w[3 * e], r0, r1, c->h + e * I + r0, I);
    mwq_any(&c->ax[tid], c->xsx + tid * GD, &c->w[3 * e + 1], r0, r1, c->u + e * I + r0, I);
    silu_mul(c->h + e * I + r0, c->u + e * I + r0, r1 - r0);
  }
  bar_wait(&team.bar, nth);
  for (int e = tid; e < c->n; e += nth) {
    acts_fill(&c->ah[e], c->h + e * I);
    mwq_xs(&c->ah[e], c->w[2].group, c->xsh + e * GI);
  }
  bar_wait(&team.bar, nth);
  share_t(D, tid, nth, &r0, &r1);
  for (int e = 0; e < c->n; ++e)
    mwq_any(&c->ah[e], c->xsh + e * GI, &c->w[3 * e + 2], r0, r1, c->y + e * D + r0, D);
  for (int e = 0; e < c->n; ++e)
    for (int64_t i = r0; i < r1; ++i) c->out[i] += c->coef[e] * rd(c->y[e * D + i], c->rnd);
}

int mwq_moe1(const float* x, int64_t D, int64_t I, int n, const MwqW* w, const float* coef,
             int rnd, float* out, int threads) {
  q8_isa(-1);
  Room1 r;
  int ok = room1(&r, n, threads, D, I);
  const int64_t gd = D / w[0].group, gi = I / w[2].group;
  float* xs = ok ? malloc(sizeof(float) * (size_t)(r.threads * gd + n * gi)) : NULL;
  if (xs) {
    MwqMoe1 c = {x, D, I, n, rnd, w, coef, out, r.h, r.h + n * I, r.h + 2 * n * I, r.ax, r.ah,
                 xs, xs + r.threads * gd};
    team_run(mwq_moe1_job, &c, r.threads);
  }
  free(xs);
  room1_free(&r);
  return xs ? 0 : -1;
}

// ---------------------------------------------------------------- a decode step's layers
//
// One token through layers [0, n) while every expert it routes to is in memory: each layer's
// attention half (layer1_attn), then its experts in expert order (q8_moe1, the order
// moe/dispatch.py gives), then x = x + out in the model's dtype, as DecoderLayer adds them.
// Where a chosen expert is not in the layer's table (wg[e] NULL: not cached, or not a whole
// Q8 expert) it stops after that layer's attention half: x holds the residual, xn, logits,
// and that layer's ids/wts its routing, and *done the layer; the caller serves its experts
// (reads, the cache) and calls again from the next. ids/wts [n, topk]: each layer's routing.
typedef struct {
  Layer1 L;
  void *kc, *vc;  // this slot's cache rows of this layer [Hkv, max_len, Dh]
  int64_t I;  // expert width
  const int8_t *const *wg, *const *wu, *const *wd;  // [E] each; NULL: not available
  const float *const *sg, *const *su, *const *sd;
} Chain1;

int decode_chain(const Chain1* layers, int n, float* x, float* xn, float* logits, int64_t* ids,
                 float* wts, const float* cosv, const float* sinv, int64_t max_len, int64_t pos,
                 int kv16, int threads, int* done) {
  *done = 0;
  if (n <= 0) return 0;
  const int64_t D = layers[0].L.D;
  float* out = malloc(sizeof(float) * (size_t)D);
  if (!out) return -1;
  for (int l = 0; l < n; ++l) {
    const Chain1* c = &layers[l];
    const int K = c->L.topk;
    int64_t* id = ids + (int64_t)l * K;
    float* w = wts + (int64_t)l * K;
    if (layer1_attn(&c->L, x, xn, logits, id, w, cosv, sinv, c->kc, c->vc, max_len, pos, kv16,
                    threads) != 0) {
      free(out);
      return -1;
    }
    int ok = 1;
    for (int j = 0; j < K; ++j) ok &= c->wg[id[j]] != NULL;
    if (!ok) {
      *done = l;
      free(out);
      return 0;
    }
    const int8_t *g[64], *u[64], *d[64];
    const float *gs[64], *us[64], *ds[64];
    float coef[64];
    int order[64];
    for (int j = 0; j < K; ++j) order[j] = j;
    for (int a = 1; a < K; ++a)  // ascending expert (insertion sort of K indices)
      for (int b = a; b > 0 && id[order[b]] < id[order[b - 1]]; --b) {
        const int t = order[b];
        order[b] = order[b - 1];
        order[b - 1] = t;
      }
    for (int j = 0; j < K; ++j) {
      const int64_t e = id[order[j]];
      g[j] = c->wg[e], u[j] = c->wu[e], d[j] = c->wd[e];
      gs[j] = c->sg[e], us[j] = c->su[e], ds[j] = c->sd[e];
      coef[j] = w[order[j]];
    }
    memset(out, 0, sizeof(float) * (size_t)D);
    if (q8_moe1(xn, D, c->I, K, g, gs, u, us, d, ds, coef, c->L.rnd, out, threads) != 0) {
      free(out);
      return -1;
    }
    for (int64_t i = 0; i < D; ++i) x[i] = rd(x[i] + rd(out[i], c->L.rnd), c->L.rnd);
  }
  *done = n;
  free(out);
  return 0;
}
