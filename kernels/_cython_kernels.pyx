# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Compiled kernels of the Cython backend (wrapped by ``fastbn.kernels.cpu_cython``).

Every function works on the canonical view ``x`` of shape ``(O, C, I)``
(outer, channels, inner) with arbitrary strides, in one of two loop nests:

* ``*_cf`` (channels-first, ``I > 1``): work items are ``(o, c, chunk of I)``
  runs, shared among the threads in memory order; the innermost loop walks
  ``I``.  Reductions store one summary per run, merged per channel after.
* ``*_cl`` (channels-last, ``I == 1``): work items are (row group, channel
  block) tasks over tiles of rows of the ``(O, C)`` matrix; the innermost
  loop walks ``C``.

``train_small``, ``infer_small`` and ``backward_small`` fuse a whole small
training forward, inference forward and training backward into one serial
call each (``infer_small`` also runs in parallel, on larger inputs).

Element types are the fused ``real_t``: float32, float64, or float16 passed
as its uint16 bit pattern (converted in C, below).  All arithmetic is float64.
Statistics are two-pass per run/tile (the second pass re-reads it from
L1/L2) merged with Chan's formula; each parallel task owns its partial
results, so no accumulator is shared between threads, and the work split
depends on the sizes only, so results do not depend on the thread count.
The caller (the wrapper) validates shapes, strides and sizes: nothing here
checks bounds.
"""

from cython.parallel cimport prange, threadid
from libc.math cimport isfinite, sqrt
from libc.stdlib cimport malloc, free

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    #if defined(__x86_64__) || defined(_M_X64) || defined(__SSE__)
    #include <immintrin.h>
    #endif
    #ifdef _OPENMP
    #include <omp.h>
    static int fbn_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fbn_max_threads(void) { return 1; }
    #endif

    /* Streaming (non-temporal) stores for float32 outputs (see _stream.py for
       why): y[i] = q[i*ps]*(x[i] - m[i*ps]) + r[i*ps] (+ p[i*ps]*u[i]) in
       float64, rounded once, for i < n; ps = 0 (one channel's run) or 1 (a
       row of channels).  Ordinary stores up to y's first 16-byte boundary and
       for the tail; the same values as the ordinary loops, bit for bit. */
    #if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
    #include <immintrin.h>
    #define FBN_STREAM 1
    #define FBN_AFF(i) (q[(i) * ps] * ((double)x[i] - m[(i) * ps]) + r[(i) * ps])
    static inline void fbn_stream_affine_f32(const float* x, float* y, const float* u,
                                             Py_ssize_t n, Py_ssize_t ps, const double* m,
                                             const double* q, const double* r,
                                             const double* p) {
        Py_ssize_t i = 0;
        Py_ssize_t head = ((uintptr_t)y & 3) ? n : (Py_ssize_t)((16 - ((uintptr_t)y & 15)) & 15) / 4;
        if (head > n) head = n;
        if (u == NULL) {
            for (; i < head; i++) y[i] = (float)FBN_AFF(i);
            for (; i + 4 <= n; i += 4) {
                float v[4];
                for (int k = 0; k < 4; k++) v[k] = (float)FBN_AFF(i + k);
                _mm_stream_ps(y + i, _mm_loadu_ps(v));
            }
            for (; i < n; i++) y[i] = (float)FBN_AFF(i);
        } else {
            for (; i < head; i++) y[i] = (float)(FBN_AFF(i) + p[i * ps] * (double)u[i]);
            for (; i + 4 <= n; i += 4) {
                float v[4];
                for (int k = 0; k < 4; k++)
                    v[k] = (float)(FBN_AFF(i + k) + p[(i + k) * ps] * (double)u[i + k]);
                _mm_stream_ps(y + i, _mm_loadu_ps(v));
            }
            for (; i < n; i++) y[i] = (float)(FBN_AFF(i) + p[i * ps] * (double)u[i]);
        }
    }
    /* Streaming stores are weakly ordered: each task fences after its last one,
       before the parallel region's end lets anyone read the output. */
    static inline void fbn_sfence(void) { _mm_sfence(); }
    #else
    static inline void fbn_sfence(void) {}
    #define FBN_STREAM 0
    static inline void fbn_stream_affine_f32(const float* x, float* y, const float* u,
                                             Py_ssize_t n, Py_ssize_t ps, const double* m,
                                             const double* q, const double* r,
                                             const double* p) {}
    #endif

    /* y[i] = q*(x[i] - m) + r (+ p*u[i]) over n contiguous float32 values of
       one channel, in float64, rounded once.  With AVX2+FMA, four values per
       conversion straight from and to memory (vcvtps2pd/vcvtpd2ps on xmm
       halves, 10 instructions per 8 values), where GCC's own vectorisation of
       the loop converts whole ymm registers and shuffles their halves (13):
       0.30 -> 0.23 ns a value in L1 here.  The FMAs are the ones GCC contracts
       the scalar expression to, so the tail (and every other path) gives the
       same bits. */
    static inline void fbn_affine_f32(const float* x, float* y, const float* u, Py_ssize_t n,
                                      double m, double q, double r, double p) {
        Py_ssize_t i = 0;
    #if defined(__AVX2__) && defined(__FMA__)
        const __m256d vm = _mm256_set1_pd(m), vq = _mm256_set1_pd(q), vr = _mm256_set1_pd(r);
        const __m256d vp = _mm256_set1_pd(p);
        for (; i + 8 <= n; i += 8) {   /* both loads before either store: y may be x or u */
            __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), vm);
            __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)), vm);
            a = _mm256_fmadd_pd(vq, a, vr);
            b = _mm256_fmadd_pd(vq, b, vr);
            if (u != NULL) {
                a = _mm256_fmadd_pd(vp, _mm256_cvtps_pd(_mm_loadu_ps(u + i)), a);
                b = _mm256_fmadd_pd(vp, _mm256_cvtps_pd(_mm_loadu_ps(u + i + 4)), b);
            }
            _mm_storeu_ps(y + i, _mm256_cvtpd_ps(a));
            _mm_storeu_ps(y + i + 4, _mm256_cvtpd_ps(b));
        }
    #endif
        if (u == NULL)
            for (; i < n; i++) y[i] = (float)(q * ((double)x[i] - m) + r);
        else
            for (; i < n; i++) y[i] = (float)(q * ((double)x[i] - m) + r + p * (double)u[i]);
    }

    /* fbn_affine_f32 along a row of n channels: y[j] = q[j]*(x[j] - m[j]) + r[j]
       (+ p[j]*u[j]), the per-channel values read four at a time too. */
    static inline void fbn_affine_f32_row(const float* x, float* y, const float* u,
                                          Py_ssize_t n, const double* m, const double* q,
                                          const double* r, const double* p) {
        Py_ssize_t j = 0;
    #if defined(__AVX2__) && defined(__FMA__)
        for (; j + 4 <= n; j += 4) {
            __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j)), _mm256_loadu_pd(m + j));
            a = _mm256_fmadd_pd(_mm256_loadu_pd(q + j), a, _mm256_loadu_pd(r + j));
            if (u != NULL)
                a = _mm256_fmadd_pd(_mm256_loadu_pd(p + j), _mm256_cvtps_pd(_mm_loadu_ps(u + j)), a);
            _mm_storeu_ps(y + j, _mm256_cvtpd_ps(a));
        }
    #endif
        if (u == NULL)
            for (; j < n; j++) y[j] = (float)(q[j] * ((double)x[j] - m[j]) + r[j]);
        else
            for (; j < n; j++)
                y[j] = (float)(q[j] * ((double)x[j] - m[j]) + r[j] + p[j] * (double)u[j]);
    }

    /* A 64-byte (cache line) aligned pointer into a block malloc'd 64 bytes
       larger: per-thread scratch must not share a line with another thread's
       (false sharing made two threads slower than one). */
    static inline double* fbn_align64(void* raw) {
        return (double*)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    }

    /* sum(g) and sum(g*(x - m)) over n contiguous values.  GCC vectorises two
       float64 reductions in one loop only when told it may reorder them (an
       OpenMP simd reduction: no -ffast-math, NaN still propagates). */
    #define FBN_DY_SUMS(T, NAME)                                                  \
    static inline void NAME(const T* g, const T* x, Py_ssize_t n, double m,   \
                            double* s1, double* s2) {                         \
        double a = 0.0, b = 0.0;                                              \
        _Pragma("omp simd reduction(+:a,b)")                                  \
        for (Py_ssize_t i = 0; i < n; i++) {                                  \
            double gi = (double)g[i];                                         \
            a += gi;                                                          \
            b += gi * ((double)x[i] - m);                                     \
        }                                                                     \
        *s1 = a;                                                              \
        *s2 = b;                                                              \
    }
    FBN_DY_SUMS(float, fbn_dy_sums_f32)
    FBN_DY_SUMS(double, fbn_dy_sums_f64)

    /* Two-pass mean and m2 of n contiguous values.  The first pass sums the
       values shifted by the first one, x0 (0 if not finite: inf - inf would
       make NaN of an inf mean): a constant run gets its mean exactly and a
       run of 1.7e308 does not overflow.  For float64 data the second pass
       also sums the deviations ("corrected two-pass"): their mean corrects
       the rounding of the first-pass mean, which for float64 data is as
       coarse as the data (a non-finite correction, from inf data, is not
       applied).  float32 and float16 data sum exactly enough in float64 not
       to need it, and the extra reduction would cost ~20% of the in-cache time. */
    #define FBN_STATS(T, NAME, CORRECT)                                           \
    static inline void NAME(const T* p, Py_ssize_t n, double* mean, double* m2) { \
        double x0 = (double)p[0], s = 0.0, c = 0.0, q = 0.0, mu, d;           \
        if (!(x0 - x0 == 0.0)) x0 = 0.0;                                      \
        _Pragma("omp simd reduction(+:s)")                                    \
        for (Py_ssize_t i = 0; i < n; i++) s += (double)p[i] - x0;            \
        mu = x0 + s / (double)n;                                              \
        if (CORRECT) {                                                        \
            _Pragma("omp simd reduction(+:c,q)")                              \
            for (Py_ssize_t i = 0; i < n; i++) {                              \
                double e = (double)p[i] - mu;                                 \
                c += e;                                                       \
                q += e * e;                                                   \
            }                                                                 \
            d = c / (double)n;                                                \
            *mean = (d - d == 0.0) ? mu + d : mu;                             \
            /* q = inf with a finite c: squares of finite data overflowed     \
               (values near 1e300): inf, as NumPy, not inf - inf */          \
            *m2 = (q - q != 0.0 && c - c == 0.0) ? q : q - c * d;             \
        } else {                                                              \
            _Pragma("omp simd reduction(+:q)")                                \
            for (Py_ssize_t i = 0; i < n; i++) {                              \
                double e = (double)p[i] - mu;                                 \
                q += e * e;                                                   \
            }                                                                 \
            *mean = mu;                                                       \
            *m2 = q;                                                          \
        }                                                                     \
    }
    FBN_STATS(float, fbn_stats_f32, 0)
    FBN_STATS(double, fbn_stats_f64, 1)

    /* IEEE binary16 <-> binary64, exact / rounded once to nearest-even
       (the algorithm of NumPy's npy_half_to_double / npy_double_to_half). */
    static inline double fbn_h2d_sw(uint16_t h) {
        uint64_t sgn = ((uint64_t)(h & 0x8000u)) << 48, bits;
        uint32_t e = h & 0x7c00u, m = h & 0x03ffu;
        double v;
        if (e == 0) {                      /* zero or subnormal: m * 2^-24 */
            v = (double)m * 5.9604644775390625e-08;
            memcpy(&bits, &v, 8);
            bits |= sgn;
        } else if (e == 0x7c00u) {         /* inf / nan, payload kept */
            bits = sgn | 0x7ff0000000000000ULL | ((uint64_t)m << 42);
        } else {
            bits = sgn | (((uint64_t)(h & 0x7fffu) + 0xfc000u) << 42);
        }
        memcpy(&v, &bits, 8);
        return v;
    }

    static inline uint16_t fbn_d2h_sw(double d) {
        uint64_t b, d_exp, d_sig;
        uint16_t h_sgn, h_exp, h_sig;
        memcpy(&b, &d, 8);
        h_sgn = (uint16_t)((b & 0x8000000000000000ULL) >> 48);
        d_exp = b & 0x7ff0000000000000ULL;
        if (d_exp >= 0x40f0000000000000ULL) {            /* inf, nan, overflow */
            if (d_exp == 0x7ff0000000000000ULL) {
                d_sig = b & 0x000fffffffffffffULL;
                if (d_sig != 0) {
                    uint16_t r = (uint16_t)(0x7c00u + (d_sig >> 42));
                    if (r == 0x7c00u) r++;                /* stay a nan */
                    return (uint16_t)(h_sgn + r);
                }
            }
            return (uint16_t)(h_sgn + 0x7c00u);
        }
        if (d_exp <= 0x3f00000000000000ULL) {            /* subnormal half or zero */
            if (d_exp < 0x3e60000000000000ULL) return h_sgn;
            d_exp >>= 52;
            d_sig = 0x0010000000000000ULL + (b & 0x000fffffffffffffULL);
            d_sig <<= (d_exp - 998);
            if ((d_sig & 0x003fffffffffffffULL) != 0x0010000000000000ULL)
                d_sig += 0x0010000000000000ULL;
            h_sig = (uint16_t)(d_sig >> 53);
            return (uint16_t)(h_sgn + h_sig);
        }
        h_exp = (uint16_t)((d_exp - 0x3f00000000000000ULL) >> 42);
        d_sig = b & 0x000fffffffffffffULL;
        if ((d_sig & 0x000007ffffffffffULL) != 0x0000020000000000ULL)
            d_sig += 0x0000020000000000ULL;
        h_sig = (uint16_t)(d_sig >> 42);
        h_sig += h_exp;                                   /* a carry gives inf: correct */
        return (uint16_t)(h_sgn + h_sig);
    }

    /* float64 -> float32 rounded to odd (truncate, then set the last bit if
       inexact).  float32 has 13 more bits than float16, so rounding this to
       float16 (nearest even) rounds the float64 value once, correctly.  Done
       in v's bits: the 29 low significand bits that float32 drops are
       cleared, and the lowest kept one is set if any of them was ((b & low) +
       low has bit 29 set exactly then, and stays below bit 30); the float32
       conversion is then exact.  Below float32's normal range it rounds
       again, but such values are 0 in float16 either way; inf is unchanged
       and NaN stays NaN. */
    #define FBN_LOW29 ((uint64_t)0x1fffffff)
    static inline float fbn_d2f_odd(double v) {
        uint64_t b;
        memcpy(&b, &v, 8);
        b = (b | ((b & FBN_LOW29) + FBN_LOW29)) & ~FBN_LOW29;
        memcpy(&v, &b, 8);
        return (float)v;
    }

    /* float16 <-> float32 in hardware where the build targets F16C (the x86-64-v3
       and v4 builds): vcvtph2ps / vcvtps2ph, 8 values per instruction on
       contiguous blocks.  float16 -> float32 is exact. */
    #if defined(__F16C__)
    #define FBN_F16C 1
    static inline double fbn_h2d(uint16_t h) { return (double)_cvtsh_ss(h); }
    static inline uint16_t fbn_d2h(double d) {
        return (uint16_t)_cvtss_sh(fbn_d2f_odd(d), _MM_FROUND_TO_NEAREST_INT);
    }
    static inline void fbn_h2f(const uint16_t* s, Py_ssize_t st, float* d, Py_ssize_t n) {
        Py_ssize_t i = 0;
        if (st == 1)
            for (; i + 8 <= n; i += 8)
                _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
        for (; i < n; i++) d[i] = _cvtsh_ss(s[i * st]);
    }
    static inline void fbn_f2h(const float* s, uint16_t* d, Py_ssize_t st, Py_ssize_t n) {
        Py_ssize_t i = 0;
        if (st == 1)
            for (; i + 8 <= n; i += 8)
                _mm_storeu_si128((__m128i*)(d + i),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) d[i * st] = (uint16_t)_cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
    }
    #else
    #define FBN_F16C 0
    static inline double fbn_h2d(uint16_t h) { return fbn_h2d_sw(h); }
    static inline uint16_t fbn_d2h(double d) { return fbn_d2h_sw(d); }
    static inline void fbn_h2f(const uint16_t* s, Py_ssize_t st, float* d, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) d[i] = (float)fbn_h2d_sw(s[i * st]);
    }
    static inline void fbn_f2h(const float* s, uint16_t* d, Py_ssize_t st, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) d[i * st] = fbn_d2h_sw((double)s[i]);
    }
    #endif

    /* float16 runs, in blocks of FBN_HB values converted to float32 (exact) on
       the stack: no copy of the array, and the float64 loops on the block
       vectorise as for float32 data. */
    #define FBN_HB 1024
    /* Block reductions, each with its own accumulators (GCC left the omp simd
       loops scalar when their accumulators lived across the block loop). */
    static inline double fbn_blk_sum(const float* b, Py_ssize_t n, double x0) {
        double s = 0.0;
        _Pragma("omp simd reduction(+:s)")
        for (Py_ssize_t i = 0; i < n; i++) s += (double)b[i] - x0;
        return s;
    }
    static inline double fbn_blk_sq(const float* b, Py_ssize_t n, double mu) {
        double q = 0.0;
        _Pragma("omp simd reduction(+:q)")
        for (Py_ssize_t i = 0; i < n; i++) {
            double e = (double)b[i] - mu;
            q += e * e;
        }
        return q;
    }
    static inline void fbn_stats_f16_blk(const uint16_t* p, Py_ssize_t st, Py_ssize_t n,
                                         double* mean, double* m2) {
        float b[FBN_HB];
        double x0 = fbn_h2d(p[0]), s = 0.0, q = 0.0, mu;
        if (!(x0 - x0 == 0.0)) x0 = 0.0;
        for (Py_ssize_t k = 0; k < n; k += FBN_HB) {
            Py_ssize_t L = n - k < FBN_HB ? n - k : FBN_HB;
            fbn_h2f(p + k * st, st, b, L);
            s += fbn_blk_sum(b, L, x0);
        }
        mu = x0 + s / (double)n;
        for (Py_ssize_t k = 0; k < n; k += FBN_HB) {
            Py_ssize_t L = n - k < FBN_HB ? n - k : FBN_HB;
            fbn_h2f(p + k * st, st, b, L);
            q += fbn_blk_sq(b, L, mu);
        }
        *mean = mu;
        *m2 = q;
    }

    static inline void fbn_dy_sums_f16_blk(const uint16_t* g, Py_ssize_t sg, const uint16_t* x,
                                           Py_ssize_t sx, Py_ssize_t n, double m,
                                           double* s1, double* s2) {
        float bg[FBN_HB], bx[FBN_HB];
        double a = 0.0, c = 0.0, ab, cb;
        for (Py_ssize_t k = 0; k < n; k += FBN_HB) {
            Py_ssize_t L = n - k < FBN_HB ? n - k : FBN_HB;
            fbn_h2f(g + k * sg, sg, bg, L);
            fbn_h2f(x + k * sx, sx, bx, L);
            fbn_dy_sums_f32(bg, bx, L, m, &ab, &cb);
            a += ab;
            c += cb;
        }
        *s1 = a;
        *s2 = c;
    }

    /* Contiguous float16 runs with AVX2 + F16C written out (GCC left the block
       loops above scalar): 8 values per vcvtph2ps, widened to two float64
       vectors, independent accumulators.  Other builds and strided runs use
       the block versions. */
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    static inline __m256 fbn_ld8h(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    }
    static inline double fbn_hsum4(__m256d v) {
        __m128d a = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
        return _mm_cvtsd_f64(_mm_add_sd(a, _mm_unpackhi_pd(a, a)));
    }
    #define FBN_LO(v) _mm256_cvtps_pd(_mm256_castps256_ps128(v))
    #define FBN_HI(v) _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))
    static inline void fbn_stats_f16(const uint16_t* p, Py_ssize_t st, Py_ssize_t n,
                                     double* mean, double* m2) {
        double x0, s, q, mu;
        Py_ssize_t i;
        __m256d a0, a1, a2, a3, v0;
        if (st != 1) { fbn_stats_f16_blk(p, st, n, mean, m2); return; }
        x0 = fbn_h2d(p[0]);
        if (!(x0 - x0 == 0.0)) x0 = 0.0;
        v0 = _mm256_set1_pd(x0);
        a0 = a1 = a2 = a3 = _mm256_setzero_pd();
        for (i = 0; i + 16 <= n; i += 16) {
            __m256 u = fbn_ld8h(p + i), w = fbn_ld8h(p + i + 8);
            a0 = _mm256_add_pd(a0, _mm256_sub_pd(FBN_LO(u), v0));
            a1 = _mm256_add_pd(a1, _mm256_sub_pd(FBN_HI(u), v0));
            a2 = _mm256_add_pd(a2, _mm256_sub_pd(FBN_LO(w), v0));
            a3 = _mm256_add_pd(a3, _mm256_sub_pd(FBN_HI(w), v0));
        }
        s = fbn_hsum4(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
        for (Py_ssize_t j = i; j < n; j++) s += fbn_h2d(p[j]) - x0;
        mu = x0 + s / (double)n;
        v0 = _mm256_set1_pd(mu);
        a0 = a1 = a2 = a3 = _mm256_setzero_pd();
        for (i = 0; i + 16 <= n; i += 16) {
            __m256 u = fbn_ld8h(p + i), w = fbn_ld8h(p + i + 8);
            __m256d d0 = _mm256_sub_pd(FBN_LO(u), v0), d1 = _mm256_sub_pd(FBN_HI(u), v0);
            __m256d d2 = _mm256_sub_pd(FBN_LO(w), v0), d3 = _mm256_sub_pd(FBN_HI(w), v0);
            a0 = _mm256_fmadd_pd(d0, d0, a0);
            a1 = _mm256_fmadd_pd(d1, d1, a1);
            a2 = _mm256_fmadd_pd(d2, d2, a2);
            a3 = _mm256_fmadd_pd(d3, d3, a3);
        }
        q = fbn_hsum4(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
        for (Py_ssize_t j = i; j < n; j++) {
            double e = fbn_h2d(p[j]) - mu;
            q += e * e;
        }
        *mean = mu;
        *m2 = q;
    }
    static inline void fbn_dy_sums_f16(const uint16_t* g, Py_ssize_t sg, const uint16_t* x,
                                       Py_ssize_t sx, Py_ssize_t n, double m,
                                       double* s1, double* s2) {
        Py_ssize_t i;
        double a, c;
        __m256d a0, a1, c0, c1, vm = _mm256_set1_pd(m);
        if (sg != 1 || sx != 1) { fbn_dy_sums_f16_blk(g, sg, x, sx, n, m, s1, s2); return; }
        a0 = a1 = c0 = c1 = _mm256_setzero_pd();
        for (i = 0; i + 8 <= n; i += 8) {
            __m256 gv = fbn_ld8h(g + i), xv = fbn_ld8h(x + i);
            __m256d g0 = FBN_LO(gv), g1 = FBN_HI(gv);
            a0 = _mm256_add_pd(a0, g0);
            a1 = _mm256_add_pd(a1, g1);
            c0 = _mm256_fmadd_pd(g0, _mm256_sub_pd(FBN_LO(xv), vm), c0);
            c1 = _mm256_fmadd_pd(g1, _mm256_sub_pd(FBN_HI(xv), vm), c1);
        }
        a = fbn_hsum4(_mm256_add_pd(a0, a1));
        c = fbn_hsum4(_mm256_add_pd(c0, c1));
        for (; i < n; i++) {
            double gi = fbn_h2d(g[i]);
            a += gi;
            c += gi * (fbn_h2d(x[i]) - m);
        }
        *s1 = a;
        *s2 = c;
    }
    #else
    #define fbn_stats_f16 fbn_stats_f16_blk
    #define fbn_dy_sums_f16 fbn_dy_sums_f16_blk
    #endif

    /* y[i] = q[i*ps]*(x[i] - m[i*ps]) + r[i*ps] (+ p[i*ps]*u[i]) for n float16 values
       (strides sx, sy, su), in float64, rounded once (fbn_d2f_odd, then F16C). */
    static inline void fbn_affine_f16_blk(const uint16_t* x, Py_ssize_t sx, uint16_t* y,
                                      Py_ssize_t sy, const uint16_t* u, Py_ssize_t su,
                                      Py_ssize_t n, Py_ssize_t ps, const double* m,
                                      const double* q, const double* r, const double* p) {
        float bx[FBN_HB], bu[FBN_HB], by[FBN_HB];
        for (Py_ssize_t k = 0; k < n; k += FBN_HB) {
            Py_ssize_t L = n - k < FBN_HB ? n - k : FBN_HB;
            const double *mk = m + k * ps, *qk = q + k * ps, *rk = r + k * ps;
            fbn_h2f(x + k * sx, sx, bx, L);
            if (u == NULL) {
                if (ps == 0) {
                    double mm = m[0], qq = q[0], rr = r[0];
                    for (Py_ssize_t i = 0; i < L; i++)
                        by[i] = fbn_d2f_odd(qq * ((double)bx[i] - mm) + rr);
                } else {
                    for (Py_ssize_t i = 0; i < L; i++)
                        by[i] = fbn_d2f_odd(qk[i] * ((double)bx[i] - mk[i]) + rk[i]);
                }
            } else {
                const double* pk = p + k * ps;
                fbn_h2f(u + k * su, su, bu, L);
                if (ps == 0) {
                    double mm = m[0], qq = q[0], rr = r[0], pp = p[0];
                    for (Py_ssize_t i = 0; i < L; i++)
                        by[i] = fbn_d2f_odd(qq * ((double)bx[i] - mm) + rr + pp * (double)bu[i]);
                } else {
                    for (Py_ssize_t i = 0; i < L; i++)
                        by[i] = fbn_d2f_odd(qk[i] * ((double)bx[i] - mk[i]) + rk[i]
                                            + pk[i] * (double)bu[i]);
                }
            }
            fbn_f2h(by, y + k * sy, sy, L);
        }
    }

    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    /* 4 float64 -> 4 float32 rounded to odd (see fbn_d2f_odd), in AVX2: four
       integer ops in the float64 lanes, then an exact conversion (comparing
       the float32 back in float64 needed mask-narrowing permutes). */
    static inline __m128 fbn_odd4(__m256d v) {
        const __m256i low = _mm256_set1_epi64x((long long)FBN_LOW29);
        __m256i b = _mm256_castpd_si256(v);
        b = _mm256_andnot_si256(low, _mm256_or_si256(b, _mm256_add_epi64(_mm256_and_si256(b, low),
                                                                           low)));
        return _mm256_cvtpd_ps(_mm256_castsi256_pd(b));
    }
    static inline void fbn_affine_f16(const uint16_t* x, Py_ssize_t sx, uint16_t* y,
                                      Py_ssize_t sy, const uint16_t* u, Py_ssize_t su,
                                      Py_ssize_t n, Py_ssize_t ps, const double* m,
                                      const double* q, const double* r, const double* p) {
        Py_ssize_t i = 0;
        if (sx != 1 || sy != 1 || (u != NULL && su != 1)) {
            fbn_affine_f16_blk(x, sx, y, sy, u, su, n, ps, m, q, r, p);
            return;
        }
    #if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
        /* AVX-512: round to odd is a conversion toward zero (embedded rounding)
           plus the inexact bit from a mask compare -- 16 values per step. */
        for (; i + 16 <= n; i += 16) {
            __m512d m0, m1, q0, q1, r0, r1, y0, y1, x0, x1;
            __m512 xv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + i)));
            __m256 f0, f1;
            __m256i b0, b1;
            const __m256i one = _mm256_set1_epi32(1);
            x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(xv));
            x1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(xv, 1));
            if (ps == 0) {
                m0 = m1 = _mm512_set1_pd(m[0]);
                q0 = q1 = _mm512_set1_pd(q[0]);
                r0 = r1 = _mm512_set1_pd(r[0]);
            } else {
                m0 = _mm512_loadu_pd(m + i); m1 = _mm512_loadu_pd(m + i + 8);
                q0 = _mm512_loadu_pd(q + i); q1 = _mm512_loadu_pd(q + i + 8);
                r0 = _mm512_loadu_pd(r + i); r1 = _mm512_loadu_pd(r + i + 8);
            }
            y0 = _mm512_fmadd_pd(q0, _mm512_sub_pd(x0, m0), r0);
            y1 = _mm512_fmadd_pd(q1, _mm512_sub_pd(x1, m1), r1);
            if (u != NULL) {
                __m512 uv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(u + i)));
                __m512d p0 = ps == 0 ? _mm512_set1_pd(p[0]) : _mm512_loadu_pd(p + i);
                __m512d p1 = ps == 0 ? p0 : _mm512_loadu_pd(p + i + 8);
                y0 = _mm512_fmadd_pd(p0, _mm512_cvtps_pd(_mm512_castps512_ps256(uv)), y0);
                y1 = _mm512_fmadd_pd(p1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(uv, 1)), y1);
            }
            f0 = _mm512_cvt_roundpd_ps(y0, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            f1 = _mm512_cvt_roundpd_ps(y1, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            b0 = _mm256_mask_or_epi32(_mm256_castps_si256(f0),
                                      _mm512_cmp_pd_mask(_mm512_cvtps_pd(f0), y0, _CMP_NEQ_UQ),
                                      _mm256_castps_si256(f0), one);
            b1 = _mm256_mask_or_epi32(_mm256_castps_si256(f1),
                                      _mm512_cmp_pd_mask(_mm512_cvtps_pd(f1), y1, _CMP_NEQ_UQ),
                                      _mm256_castps_si256(f1), one);
            _mm256_storeu_si256((__m256i*)(y + i), _mm512_cvtps_ph(
                _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_castsi256_ps(b0)),
                                   _mm256_castsi256_ps(b1), 1), _MM_FROUND_TO_NEAREST_INT));
        }
    #endif
        for (; i + 8 <= n; i += 8) {
            __m256d m0, m1, q0, q1, r0, r1, y0, y1;
            __m256 xv = fbn_ld8h(x + i);
            if (ps == 0) {
                m0 = m1 = _mm256_set1_pd(m[0]);
                q0 = q1 = _mm256_set1_pd(q[0]);
                r0 = r1 = _mm256_set1_pd(r[0]);
            } else {
                m0 = _mm256_loadu_pd(m + i); m1 = _mm256_loadu_pd(m + i + 4);
                q0 = _mm256_loadu_pd(q + i); q1 = _mm256_loadu_pd(q + i + 4);
                r0 = _mm256_loadu_pd(r + i); r1 = _mm256_loadu_pd(r + i + 4);
            }
            y0 = _mm256_fmadd_pd(q0, _mm256_sub_pd(FBN_LO(xv), m0), r0);
            y1 = _mm256_fmadd_pd(q1, _mm256_sub_pd(FBN_HI(xv), m1), r1);
            if (u != NULL) {
                __m256 uv = fbn_ld8h(u + i);
                __m256d p0 = ps == 0 ? _mm256_set1_pd(p[0]) : _mm256_loadu_pd(p + i);
                __m256d p1 = ps == 0 ? p0 : _mm256_loadu_pd(p + i + 4);
                y0 = _mm256_fmadd_pd(p0, FBN_LO(uv), y0);
                y1 = _mm256_fmadd_pd(p1, FBN_HI(uv), y1);
            }
            _mm_storeu_si128((__m128i*)(y + i), _mm256_cvtps_ph(
                _mm256_set_m128(fbn_odd4(y1), fbn_odd4(y0)), _MM_FROUND_TO_NEAREST_INT));
        }
        if (i < n)
            fbn_affine_f16_blk(x + i, 1, y + i, 1, u == NULL ? NULL : u + i, 1, n - i, ps,
                               m + i * ps, q + i * ps, r + i * ps, p == NULL ? NULL : p + i * ps);
    }
    #else
    #define fbn_affine_f16 fbn_affine_f16_blk
    #endif

    /* sum(g) and sum(g*(x - m)) over nr runs of n contiguous values (run k at
       g + k*sg and x + k*sx): one channel of the fused backward.  The vector
       accumulators are carried across the runs and their lanes summed once:
       the per-run reductions (FBN_DY_SUMS) spend about as long summing their
       lanes as a 64-value run takes.  Four accumulators of 4 lanes each: one
       would wait on the latency of its adds. */
    #if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    #define FBN_DY_CHAN(T, NAME, LD)                                              \
    static inline void NAME(const T* g, Py_ssize_t sg, const T* x, Py_ssize_t sx, \
                            Py_ssize_t nr, Py_ssize_t n, double m,            \
                            double* s1, double* s2) {                         \
        __m256d a[4], c[4], vm = _mm256_set1_pd(m);                           \
        double at = 0.0, ct = 0.0;                                            \
        for (int j = 0; j < 4; j++) a[j] = c[j] = _mm256_setzero_pd();        \
        for (Py_ssize_t k = 0; k < nr; k++) {                                 \
            const T* gk = g + k * sg;                                         \
            const T* xk = x + k * sx;                                         \
            Py_ssize_t i = 0;                                                 \
            for (; i + 16 <= n; i += 16) {                                    \
                for (int j = 0; j < 4; j++) {                                 \
                    __m256d gv = LD(gk + i + 4 * j), xv = LD(xk + i + 4 * j); \
                    a[j] = _mm256_add_pd(a[j], gv);                           \
                    c[j] = _mm256_fmadd_pd(gv, _mm256_sub_pd(xv, vm), c[j]);  \
                }                                                             \
            }                                                                 \
            for (; i + 4 <= n; i += 4) {                                      \
                __m256d gv = LD(gk + i), xv = LD(xk + i);                     \
                a[0] = _mm256_add_pd(a[0], gv);                               \
                c[0] = _mm256_fmadd_pd(gv, _mm256_sub_pd(xv, vm), c[0]);      \
            }                                                                 \
            for (; i < n; i++) {                                              \
                double gi = (double)gk[i];                                    \
                at += gi;                                                     \
                ct += gi * ((double)xk[i] - m);                               \
            }                                                                 \
        }                                                                     \
        *s1 = at + fbn_hsum4(_mm256_add_pd(_mm256_add_pd(a[0], a[1]),         \
                                           _mm256_add_pd(a[2], a[3])));       \
        *s2 = ct + fbn_hsum4(_mm256_add_pd(_mm256_add_pd(c[0], c[1]),         \
                                           _mm256_add_pd(c[2], c[3])));       \
    }
    #define FBN_LD4F(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
    FBN_DY_CHAN(float, fbn_dy_chan_f32, FBN_LD4F)
    FBN_DY_CHAN(double, fbn_dy_chan_f64, _mm256_loadu_pd)
    #else
    #define FBN_DY_CHAN(T, NAME, RUN)                                             \
    static inline void NAME(const T* g, Py_ssize_t sg, const T* x, Py_ssize_t sx, \
                            Py_ssize_t nr, Py_ssize_t n, double m,            \
                            double* s1, double* s2) {                         \
        double a = 0.0, c = 0.0, ak, ck;                                      \
        for (Py_ssize_t k = 0; k < nr; k++) {                                 \
            RUN(g + k * sg, x + k * sx, n, m, &ak, &ck);                      \
            a += ak;                                                          \
            c += ck;                                                          \
        }                                                                     \
        *s1 = a;                                                              \
        *s2 = c;                                                              \
    }
    FBN_DY_CHAN(float, fbn_dy_chan_f32, fbn_dy_sums_f32)
    FBN_DY_CHAN(double, fbn_dy_chan_f64, fbn_dy_sums_f64)
    #endif
    """
    double* fbn_align64(void* raw) nogil
    void fbn_stats_f32(const float* p, Py_ssize_t n, double* mean, double* m2) nogil
    void fbn_stats_f64(const double* p, Py_ssize_t n, double* mean, double* m2) nogil
    void fbn_dy_sums_f32(const float* g, const float* x, Py_ssize_t n, double m,
                         double* s1, double* s2) nogil
    void fbn_dy_sums_f64(const double* g, const double* x, Py_ssize_t n, double m,
                         double* s1, double* s2) nogil
    int fbn_max_threads() nogil
    int FBN_STREAM
    void fbn_stream_affine_f32(const float* x, float* y, const float* u, Py_ssize_t n,
                               Py_ssize_t ps, const double* m, const double* q,
                               const double* r, const double* p) nogil
    void fbn_sfence() nogil
    void fbn_affine_f32(const float* x, float* y, const float* u, Py_ssize_t n, double m,
                        double q, double r, double p) nogil
    void fbn_affine_f32_row(const float* x, float* y, const float* u, Py_ssize_t n,
                            const double* m, const double* q, const double* r,
                            const double* p) nogil
    double fbn_h2d(unsigned short h) nogil
    unsigned short fbn_d2h(double d) nogil
    int FBN_F16C
    void fbn_h2f(const unsigned short* s, Py_ssize_t st, float* d, Py_ssize_t n) nogil
    void fbn_stats_f16(const unsigned short* p, Py_ssize_t st, Py_ssize_t n, double* mean,
                       double* m2) nogil
    void fbn_dy_sums_f16(const unsigned short* g, Py_ssize_t sg, const unsigned short* x,
                         Py_ssize_t sx, Py_ssize_t n, double m, double* s1, double* s2) nogil
    void fbn_affine_f16(const unsigned short* x, Py_ssize_t sx, unsigned short* y,
                        Py_ssize_t sy, const unsigned short* u, Py_ssize_t su, Py_ssize_t n,
                        Py_ssize_t ps, const double* m, const double* q, const double* r,
                        const double* p) nogil
    void fbn_dy_chan_f32(const float* g, Py_ssize_t sg, const float* x, Py_ssize_t sx,
                         Py_ssize_t nr, Py_ssize_t n, double m, double* s1, double* s2) nogil
    void fbn_dy_chan_f64(const double* g, Py_ssize_t sg, const double* x, Py_ssize_t sx,
                         Py_ssize_t nr, Py_ssize_t n, double m, double* s1, double* s2) nogil


ctypedef unsigned short half_t   # float16 bits

ctypedef fused real_t:
    float
    double
    half_t


# Unroll width of the contiguous reductions: independent float64 accumulators
# let the compiler vectorise a sum it may not reassociate (no -ffast-math);
# 16 (4 AVX2 vectors) hides the add latency, 8 does not.
cdef enum:
    U = 16
    # Values per scheduling chunk of the channels-first loops.  Guided (not
    # static) scheduling: on a shared machine one preempted thread must not
    # hold the other at the end-of-loop barrier while work is left.
    SCHED = 32768
    # Run summaries merged in a parallel loop only from this many on: a
    # parallel region costs a thread wake-up (a scheduler tick on a busy machine).
    MERGE_PAR = 65536


cdef inline Py_ssize_t pad8(Py_ssize_t n) noexcept nogil:
    """n rounded up to whole cache lines of float64."""
    return (n + 7) // 8 * 8


def max_threads():
    """OpenMP's thread count for a parallel region (1 without OpenMP)."""
    return fbn_max_threads()


def has_stream():
    """True if this build writes with streaming stores (x86)."""
    return FBN_STREAM == 1


def has_f16c():
    """True if this build converts float16 in hardware (F16C), else in software."""
    return FBN_F16C == 1


# -- element access -----------------------------------------------------------

cdef inline double ld(real_t v) noexcept nogil:
    if real_t is float or real_t is double:
        return v
    else:
        return fbn_h2d(v)


cdef inline void st(real_t* dst, double v) noexcept nogil:
    """Round the float64 ``v`` once to ``dst``'s type."""
    if real_t is float:
        dst[0] = <float>v
    elif real_t is double:
        dst[0] = v
    else:
        dst[0] = fbn_d2h(v)


cdef inline void chan(double* n, double* mean, double* m2,
                      double nb, double mb, double m2b) noexcept nogil:
    """Merge the summary (nb, mb, m2b) into (n, mean, m2) (Chan et al.)."""
    cdef double tot, d, frac
    if nb == 0.0:
        return
    if n[0] == 0.0:
        n[0] = nb
        mean[0] = mb
        m2[0] = m2b
        return
    tot = n[0] + nb
    d = mb - mean[0]
    frac = nb / tot
    if isfinite(d):
        mean[0] = mean[0] + d * frac
    else:  # an inf mean: inf - inf in d would give NaN where NumPy gives inf
        mean[0] = mean[0] * (1.0 - frac) + mb * frac
    m2[0] = m2[0] + m2b + d * d * n[0] * frac
    n[0] = tot


# -- moments ------------------------------------------------------------------

cdef void run_stats(const real_t* p, Py_ssize_t n, Py_ssize_t s,
                    double* mean, double* m2) noexcept nogil:
    """Two-pass mean and sum of squared deviations of n values at stride s
    (contiguous float32/64: in C, above, where an OpenMP simd reduction lets
    GCC vectorise without -ffast-math)."""
    cdef double acc[U]
    cdef double mu, tot, d, x0
    cdef Py_ssize_t b, i, j, n8 = n - n % U
    if real_t is half_t:
        fbn_stats_f16(p, s, n, mean, m2)
        return
    if s == 1:
        if real_t is float:
            fbn_stats_f32(p, n, mean, m2)
            return
        elif real_t is double:
            fbn_stats_f64(p, n, mean, m2)
            return
    x0 = ld(p[0])               # shifted first pass, as FBN_STATS
    if not isfinite(x0):
        x0 = 0.0
    for j in range(U):
        acc[j] = 0.0
    if s == 1:
        for b in range(n8 // U):
            i = b * U
            for j in range(U):
                acc[j] += ld(p[i + j]) - x0
        for i in range(n8, n):
            acc[0] += ld(p[i]) - x0
    else:
        for i in range(n):
            acc[0] += ld(p[i * s]) - x0
    tot = 0.0
    for j in range(U):
        tot += acc[j]
    mu = x0 + tot / n
    for j in range(U):
        acc[j] = 0.0
    if s == 1:
        for b in range(n8 // U):
            i = b * U
            for j in range(U):
                d = ld(p[i + j]) - mu
                acc[j] += d * d
        for i in range(n8, n):
            d = ld(p[i]) - mu
            acc[0] += d * d
    else:
        for i in range(n):
            d = ld(p[i * s]) - mu
            acc[0] += d * d
    tot = 0.0
    for j in range(U):
        tot += acc[j]
    mean[0] = mu
    m2[0] = tot


cdef void merge_runs(const double* pmean, const double* pm2, Py_ssize_t O, Py_ssize_t nk,
                     Py_ssize_t I, Py_ssize_t chunk, double* mean, double* m2) noexcept nogil:
    """Chan-merge one channel's O*nk run summaries (run j is chunk j % nk of a row)."""
    cdef double n = 0.0, mu = 0.0, q = 0.0
    cdef Py_ssize_t j
    for j in range(O * nk):
        chan(&n, &mu, &q, <double>min(chunk, I - (j % nk) * chunk), pmean[j], pm2[j])
    mean[0] = mu
    m2[0] = q


def moments_cf(const real_t[:, :, :] x, double[::1] mean, double[::1] m2,
               Py_ssize_t chunk, int nthreads):
    """Per-channel mean and m2 of x (O, C, I).

    I is cut in ``chunk``-long runs; the O*C*nk runs are taken in memory
    order (so each thread streams through a contiguous part of x), each
    run's two-pass (mean, m2) is stored, then merged per channel.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t so, sc, si, nk, per, R, t, c, k, oc, o
    cdef const real_t* base
    cdef double* part
    if O == 0 or C == 0 or I == 0:
        return
    base = &x[0, 0, 0]
    so = x.strides[0] // sizeof(real_t)
    sc = x.strides[1] // sizeof(real_t)
    si = x.strides[2] // sizeof(real_t)
    nk = (I + chunk - 1) // chunk
    per = max(1, SCHED // min(chunk, I))
    R = O * nk                   # runs per channel
    part = <double*>malloc(C * R * 2 * sizeof(double))
    if part == NULL:
        raise MemoryError()
    try:
        for t in prange(O * C * nk, nogil=True, schedule="guided", chunksize=per,
                        num_threads=nthreads):
            oc = t // nk
            k = t - oc * nk
            o = oc // C
            c = oc - o * C
            run_stats(base + o * so + c * sc + k * chunk * si, min(chunk, I - k * chunk), si,
                      part + c * R + o * nk + k, part + C * R + c * R + o * nk + k)
        for c in prange(C, nogil=True, schedule="static",
                        num_threads=nthreads if C > 1 and C * R >= MERGE_PAR else 1):
            merge_runs(part + c * R, part + C * R + c * R, O, nk, I, chunk, &mean[c], &m2[c])
    finally:
        free(part)


cdef void task_moments_cl(const real_t* x, Py_ssize_t so, Py_ssize_t sc, Py_ssize_t r0,
                          Py_ssize_t r1, Py_ssize_t rows, Py_ssize_t nc, double* out_mean,
                          double* out_m2, double* work) noexcept nogil:
    """Rows r0..r1 of channels x[:, 0:nc] in tiles of ``rows`` -> out_mean/out_m2[0:nc].

    work: 7*nc doubles of this thread's own scratch (the tile's mean, m2,
    sum of deviations and shift, the running mean and m2), so the hot writes
    stay in private cache lines.  The first pass sums values shifted by the
    tile's first row (see FBN_STATS).  For float64 data the sum of deviations corrects the
    tile's mean and m2 for the rounding of its first-pass mean ("corrected
    two-pass"): a constant channel gets m2 = 0, not the square of a rounding
    error.  float32/float16 data sum exactly enough in float64 without it.
    """
    cdef Py_ssize_t r, j, t0, t1
    cdef double n = 0.0, nb, tot, frac, d
    cdef const real_t* pr
    cdef double* tm = work
    cdef double* tq = work + nc
    cdef double* rm = work + 2 * nc
    cdef double* rq = work + 3 * nc
    cdef double* tc = work + 4 * nc
    cdef double* ts = work + 5 * nc
    cdef float* fb = <float*>(work + 6 * nc)   # float16: the row, converted (F16C)
    for j in range(nc):
        rm[j] = 0.0
        rq[j] = 0.0
    t0 = r0
    while t0 < r1:
        t1 = min(t0 + rows, r1)
        nb = <double>(t1 - t0)
        pr = x + t0 * so
        for j in range(nc):
            tm[j] = 0.0
            tq[j] = 0.0
            tc[j] = 0.0
            ts[j] = ld(pr[j * sc])
            if not isfinite(ts[j]):
                ts[j] = 0.0
        for r in range(t0, t1):
            pr = x + r * so
            if real_t is half_t:
                fbn_h2f(pr, sc, fb, nc)
                for j in range(nc):
                    tm[j] += fb[j] - ts[j]
            elif sc == 1:
                for j in range(nc):
                    tm[j] += ld(pr[j]) - ts[j]
            else:
                for j in range(nc):
                    tm[j] += ld(pr[j * sc]) - ts[j]
        for j in range(nc):
            tm[j] = ts[j] + tm[j] / nb
        if real_t is double:      # corrected two-pass (see FBN_STATS)
            for r in range(t0, t1):
                pr = x + r * so
                if sc == 1:
                    for j in range(nc):
                        d = ld(pr[j]) - tm[j]
                        tc[j] += d
                        tq[j] += d * d
                else:
                    for j in range(nc):
                        d = ld(pr[j * sc]) - tm[j]
                        tc[j] += d
                        tq[j] += d * d
            for j in range(nc):
                if isfinite(tq[j]) or not isfinite(tc[j]):  # else overflowed squares: inf
                    tq[j] = tq[j] - tc[j] * (tc[j] / nb)
                d = tc[j] / nb
                if d - d == 0.0:  # finite: an inf channel keeps its inf mean, not NaN
                    tm[j] = tm[j] + d
        else:
            for r in range(t0, t1):
                pr = x + r * so
                if real_t is half_t:
                    fbn_h2f(pr, sc, fb, nc)
                    for j in range(nc):
                        d = fb[j] - tm[j]
                        tq[j] += d * d
                elif sc == 1:
                    for j in range(nc):
                        d = ld(pr[j]) - tm[j]
                        tq[j] += d * d
                else:
                    for j in range(nc):
                        d = ld(pr[j * sc]) - tm[j]
                        tq[j] += d * d
        if n == 0.0:            # the first tile: d^2 * 0 is NaN for means near 1e308
            for j in range(nc):
                rm[j] = tm[j]
                rq[j] = tq[j]
            n = nb
            t0 = t1
            continue
        tot = n + nb
        frac = nb / tot
        for j in range(nc):
            d = tm[j] - rm[j]
            rq[j] = rq[j] + tq[j] + d * d * n * frac
            if isfinite(d):
                rm[j] = rm[j] + d * frac
            else:  # an inf mean (see chan)
                rm[j] = rm[j] * (1.0 - frac) + tm[j] * frac
        n = tot
        t0 = t1
    for j in range(nc):
        out_mean[j] = rm[j]
        out_m2[j] = rq[j]


def moments_cl(const real_t[:, :, :] x, double[::1] mean, double[::1] m2,
               Py_ssize_t rows, Py_ssize_t cblock, Py_ssize_t groups, int nthreads):
    """Per-channel mean and m2 of x (O, C, 1): the O rows are cut into tiles of
    ``rows``, the tiles split among ``groups`` row groups, the channels into
    blocks of ``cblock``; one parallel task per (row group, channel block)."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t so, sc, ntiles, ncb, t, g, c, Cp, S, G = groups
    cdef const real_t* base
    cdef void* raw
    cdef double* pmean
    cdef double* pm2
    cdef double* scratch
    cdef double* cnt
    cdef double n, mu, q
    if O == 0 or C == 0 or x.shape[2] == 0:
        return
    base = &x[0, 0, 0]
    so = x.strides[0] // sizeof(real_t)
    sc = x.strides[1] // sizeof(real_t)
    ntiles = (O + rows - 1) // rows
    ncb = (C + cblock - 1) // cblock
    Cp = pad8(C)                  # partial rows padded to whole cache lines
    S = pad8(7 * cblock)          # per-thread scratch, likewise
    nthreads = max(nthreads, 1)
    raw = malloc((2 * G * Cp + nthreads * S + G) * sizeof(double) + 64)
    if raw == NULL:
        raise MemoryError()
    pmean = fbn_align64(raw)
    pm2 = pmean + G * Cp
    scratch = pm2 + G * Cp
    cnt = scratch + nthreads * S
    try:
        for g in range(G):
            cnt[g] = <double>(min((g + 1) * ntiles // G * rows, O) - min(g * ntiles // G * rows, O))
        for t in prange(G * ncb, nogil=True, schedule="dynamic", num_threads=nthreads):
            task_moments_cl(base + (t % ncb) * cblock * sc, so, sc,
                            min((t // ncb) * ntiles // G * rows, O),
                            min((t // ncb + 1) * ntiles // G * rows, O), rows,
                            min(cblock, C - (t % ncb) * cblock),
                            pmean + (t // ncb) * Cp + (t % ncb) * cblock,
                            pm2 + (t // ncb) * Cp + (t % ncb) * cblock,
                            scratch + threadid() * S)
        with nogil:
            for c in range(C):
                n = 0.0
                mu = 0.0
                q = 0.0
                for g in range(G):
                    chan(&n, &mu, &q, cnt[g], pmean[g * Cp + c], pm2[g * Cp + c])
                mean[c] = mu
                m2[c] = q
    finally:
        free(raw)


# -- elementwise: out = q*(x - m) + r (+ p*u) ---------------------------------

cdef void run_affine(const real_t* px, Py_ssize_t sx, real_t* po, Py_ssize_t so,
                     const real_t* pu, Py_ssize_t su, Py_ssize_t n,
                     double m, double q, double r, double p, int stream) noexcept nogil:
    """One run of n values of one channel; pu == NULL: no u term; stream: write
    contiguous float32 runs with streaming stores."""
    cdef Py_ssize_t i
    if real_t is half_t:
        fbn_affine_f16(px, sx, po, so, pu, su, n, 0, &m, &q, &r, &p)
        return
    if real_t is float:
        if sx == 1 and so == 1 and (pu == NULL or su == 1):
            if stream:
                fbn_stream_affine_f32(px, po, pu, n, 0, &m, &q, &r, &p)
                fbn_sfence()
            else:
                fbn_affine_f32(px, po, pu, n, m, q, r, p)
            return
    if pu == NULL:
        if sx == 1 and so == 1:
            for i in range(n):
                st(po + i, q * (ld(px[i]) - m) + r)
        else:
            for i in range(n):
                st(po + i * so, q * (ld(px[i * sx]) - m) + r)
    else:
        if sx == 1 and so == 1 and su == 1:
            for i in range(n):
                st(po + i, q * (ld(px[i]) - m) + r + p * ld(pu[i]))
        else:
            for i in range(n):
                st(po + i * so, q * (ld(px[i * sx]) - m) + r + p * ld(pu[i * su]))


def affine_cf(const real_t[:, :, :] x, real_t[:, :, :] out, const real_t[:, :, :] u,
              const double[::1] m, const double[::1] q, const double[::1] r,
              const double[::1] p, Py_ssize_t chunk, int nthreads, int stream=0):
    """out = q*(x - m) + r (+ p*u) for x, out, u (O, C, I), u may be None;
    parallel over (o, c, chunk of I) runs.  out may be x itself.  stream:
    streaming stores for float32 (see fbn_stream_affine_f32)."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t nk, per, t, k, o, c, i0, oc
    cdef Py_ssize_t x0, x1, x2, o0, o1, o2, u0 = 0, u1 = 0, u2 = 0
    cdef const real_t* bx
    cdef const real_t* bu = NULL
    cdef real_t* bo
    cdef double pc
    if O == 0 or C == 0 or I == 0:
        return
    bx = &x[0, 0, 0]
    bo = &out[0, 0, 0]
    x0 = x.strides[0] // sizeof(real_t)
    x1 = x.strides[1] // sizeof(real_t)
    x2 = x.strides[2] // sizeof(real_t)
    o0 = out.strides[0] // sizeof(real_t)
    o1 = out.strides[1] // sizeof(real_t)
    o2 = out.strides[2] // sizeof(real_t)
    if u is not None:
        bu = &u[0, 0, 0]
        u0 = u.strides[0] // sizeof(real_t)
        u1 = u.strides[1] // sizeof(real_t)
        u2 = u.strides[2] // sizeof(real_t)
    nk = (I + chunk - 1) // chunk
    per = max(1, SCHED // min(chunk, I))
    for t in prange(O * C * nk, nogil=True, schedule="guided", chunksize=per,
                    num_threads=nthreads):
        oc = t // nk
        k = t - oc * nk
        o = oc // C
        c = oc - o * C
        i0 = k * chunk
        if bu == NULL:
            pc = 0.0
            run_affine(bx + o * x0 + c * x1 + i0 * x2, x2, bo + o * o0 + c * o1 + i0 * o2, o2,
                       NULL, 0, min(chunk, I - i0), m[c], q[c], r[c], pc, stream)
        else:
            pc = p[c]
            run_affine(bx + o * x0 + c * x1 + i0 * x2, x2, bo + o * o0 + c * o1 + i0 * o2, o2,
                       bu + o * u0 + c * u1 + i0 * u2, u2, min(chunk, I - i0),
                       m[c], q[c], r[c], pc, stream)


cdef void rows_affine(const real_t* px, Py_ssize_t x0, Py_ssize_t x1,
                      real_t* po, Py_ssize_t o0, Py_ssize_t o1,
                      const real_t* pu, Py_ssize_t u0, Py_ssize_t u1, Py_ssize_t r0,
                      Py_ssize_t nrows, Py_ssize_t c0, Py_ssize_t C, const double* m,
                      const double* q, const double* r, const double* p,
                      int stream) noexcept nogil:
    """Rows r0 .. r0+nrows, channels c0 .. c0+C; pu == NULL: no u term; stream:
    streaming stores for contiguous float32 rows."""
    cdef Py_ssize_t row, j
    cdef const real_t* xr
    cdef const real_t* ur
    cdef real_t* orow
    px = px + r0 * x0 + c0 * x1
    po = po + r0 * o0 + c0 * o1
    m = m + c0
    q = q + c0
    r = r + c0
    if pu != NULL:
        pu = pu + r0 * u0 + c0 * u1
        p = p + c0
    if real_t is float:
        if stream and x1 == 1 and o1 == 1 and (pu == NULL or u1 == 1):
            for row in range(nrows):
                fbn_stream_affine_f32(px + row * x0, po + row * o0,
                                      NULL if pu == NULL else pu + row * u0, C, 1, m, q, r, p)
            fbn_sfence()
            return
    if real_t is half_t:
        for row in range(nrows):
            fbn_affine_f16(px + row * x0, x1, po + row * o0, o1,
                           NULL if pu == NULL else pu + row * u0, u1, C, 1, m, q, r, p)
        return
    if real_t is float:
        if x1 == 1 and o1 == 1 and (pu == NULL or u1 == 1):
            for row in range(nrows):
                fbn_affine_f32_row(px + row * x0, po + row * o0,
                                   NULL if pu == NULL else pu + row * u0, C, m, q, r, p)
            return
    for row in range(nrows):
        xr = px + row * x0
        orow = po + row * o0
        if pu == NULL:
            if x1 == 1 and o1 == 1:
                for j in range(C):
                    st(orow + j, q[j] * (ld(xr[j]) - m[j]) + r[j])
            else:
                for j in range(C):
                    st(orow + j * o1, q[j] * (ld(xr[j * x1]) - m[j]) + r[j])
        else:
            ur = pu + row * u0
            if x1 == 1 and o1 == 1 and u1 == 1:
                for j in range(C):
                    st(orow + j, q[j] * (ld(xr[j]) - m[j]) + r[j] + p[j] * ld(ur[j]))
            else:
                for j in range(C):
                    st(orow + j * o1, q[j] * (ld(xr[j * x1]) - m[j]) + r[j] + p[j] * ld(ur[j * u1]))


def affine_cl(const real_t[:, :, :] x, real_t[:, :, :] out, const real_t[:, :, :] u,
              const double[::1] m, const double[::1] q, const double[::1] r,
              const double[::1] p, Py_ssize_t rows, Py_ssize_t cblock, int nthreads,
              int stream=0):
    """out = q*(x - m) + r (+ p*u) for x, out, u (O, C, 1), u may be None;
    parallel over tiles of ``rows`` rows x ``cblock`` channels.  out may be x.
    stream: streaming stores for float32 (see fbn_stream_affine_f32)."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t t, r0, c0, ncb, x0, x1, o0, o1, u0 = 0, u1 = 0
    cdef const real_t* bx
    cdef const real_t* bu = NULL
    cdef real_t* bo
    cdef const double* pp = NULL
    if O == 0 or C == 0 or x.shape[2] == 0:
        return
    bx = &x[0, 0, 0]
    bo = &out[0, 0, 0]
    x0 = x.strides[0] // sizeof(real_t)
    x1 = x.strides[1] // sizeof(real_t)
    o0 = out.strides[0] // sizeof(real_t)
    o1 = out.strides[1] // sizeof(real_t)
    if u is not None:
        bu = &u[0, 0, 0]
        u0 = u.strides[0] // sizeof(real_t)
        u1 = u.strides[1] // sizeof(real_t)
        pp = &p[0]
    ncb = (C + cblock - 1) // cblock
    for t in prange((O + rows - 1) // rows * ncb, nogil=True, schedule="guided",
                    num_threads=nthreads):
        r0 = t // ncb * rows
        c0 = (t % ncb) * cblock
        rows_affine(bx, x0, x1, bo, o0, o1, bu, u0, u1, r0, min(rows, O - r0),
                    c0, min(cblock, C - c0), &m[0], &q[0], &r[0], pp, stream)


# -- backward sums: sum(dy), sum(dy*(x - m)) ----------------------------------

cdef void run_dy_sums(const real_t* pg, Py_ssize_t sg, const real_t* px, Py_ssize_t sx,
                      Py_ssize_t n, double m, double* s1, double* s2) noexcept nogil:
    """s1 = sum(g), s2 = sum(g*(x - m)) over one run of n values."""
    cdef double a1[U]
    cdef double a2[U]
    cdef double g
    cdef Py_ssize_t b, i, j, n8 = n - n % U
    if real_t is half_t:
        fbn_dy_sums_f16(pg, sg, px, sx, n, m, s1, s2)
        return
    if sg == 1 and sx == 1:
        if real_t is float:
            fbn_dy_sums_f32(pg, px, n, m, s1, s2)
            return
        elif real_t is double:
            fbn_dy_sums_f64(pg, px, n, m, s1, s2)
            return
    for j in range(U):
        a1[j] = 0.0
        a2[j] = 0.0
    if sg == 1 and sx == 1:
        # float16: two loops of one reduction each (the run is in L1/L2 for
        # the second): GCC does not vectorise two reductions in one loop.
        for b in range(n8 // U):
            i = b * U
            for j in range(U):
                a1[j] += ld(pg[i + j])
        for b in range(n8 // U):
            i = b * U
            for j in range(U):
                a2[j] += ld(pg[i + j]) * (ld(px[i + j]) - m)
        for i in range(n8, n):
            g = ld(pg[i])
            a1[0] += g
            a2[0] += g * (ld(px[i]) - m)
    else:
        for i in range(n):
            g = ld(pg[i * sg])
            a1[0] += g
            a2[0] += g * (ld(px[i * sx]) - m)
    s1[0] = 0.0
    s2[0] = 0.0
    for j in range(U):
        s1[0] += a1[j]
        s2[0] += a2[j]


cdef void sum_runs(const double* p1, const double* p2, Py_ssize_t R,
                   double* s1, double* s2) noexcept nogil:
    cdef double a = 0.0, b = 0.0
    cdef Py_ssize_t j
    for j in range(R):
        a += p1[j]
        b += p2[j]
    s1[0] = a
    s2[0] = b


def dy_sums_cf(const real_t[:, :, :] dy, const real_t[:, :, :] x, const double[::1] m,
               double[::1] sum_dy, double[::1] sum_dy_xc, Py_ssize_t chunk, int nthreads):
    """Per-channel sum(dy) and sum(dy*(x - m)) for dy, x (O, C, I); runs as moments_cf."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t g0, g1, g2, x0, x1, x2, nk, per, R, t, c, k, oc, o
    cdef const real_t* bg
    cdef const real_t* bx
    cdef double* part
    if O == 0 or C == 0 or I == 0:
        return
    bg = &dy[0, 0, 0]
    bx = &x[0, 0, 0]
    g0 = dy.strides[0] // sizeof(real_t)
    g1 = dy.strides[1] // sizeof(real_t)
    g2 = dy.strides[2] // sizeof(real_t)
    x0 = x.strides[0] // sizeof(real_t)
    x1 = x.strides[1] // sizeof(real_t)
    x2 = x.strides[2] // sizeof(real_t)
    nk = (I + chunk - 1) // chunk
    per = max(1, SCHED // min(chunk, I))
    R = O * nk
    part = <double*>malloc(C * R * 2 * sizeof(double))
    if part == NULL:
        raise MemoryError()
    try:
        for t in prange(O * C * nk, nogil=True, schedule="guided", chunksize=per,
                        num_threads=nthreads):
            oc = t // nk
            k = t - oc * nk
            o = oc // C
            c = oc - o * C
            run_dy_sums(bg + o * g0 + c * g1 + k * chunk * g2, g2,
                        bx + o * x0 + c * x1 + k * chunk * x2, x2,
                        min(chunk, I - k * chunk), m[c],
                        part + c * R + o * nk + k, part + C * R + c * R + o * nk + k)
        for c in prange(C, nogil=True, schedule="static",
                        num_threads=nthreads if C > 1 and C * R >= MERGE_PAR else 1):
            sum_runs(part + c * R, part + C * R + c * R, R, &sum_dy[c], &sum_dy_xc[c])
    finally:
        free(part)


cdef void task_dy_sums_cl(const real_t* pg, Py_ssize_t g0, Py_ssize_t g1,
                          const real_t* px, Py_ssize_t x0, Py_ssize_t x1,
                          Py_ssize_t nrows, Py_ssize_t nc, const double* m,
                          double* out1, double* out2, double* work) noexcept nogil:
    """Sums over nrows rows of nc channels -> out1/out2[0:nc]; work: 2*nc
    doubles of this thread's own scratch, then 2*nc floats (private cache lines for
    the hot writes)."""
    cdef Py_ssize_t row, j
    cdef const real_t* gr
    cdef const real_t* xr
    cdef double g
    cdef double* s1 = work
    cdef double* s2 = work + nc
    cdef float* fg = <float*>(work + 2 * nc)   # float16: the rows, converted (F16C)
    cdef float* fx = fg + nc
    for j in range(nc):
        s1[j] = 0.0
        s2[j] = 0.0
    for row in range(nrows):
        gr = pg + row * g0
        xr = px + row * x0
        if real_t is half_t:
            fbn_h2f(gr, g1, fg, nc)
            fbn_h2f(xr, x1, fx, nc)
            for j in range(nc):
                s1[j] += fg[j]
                s2[j] += fg[j] * (fx[j] - m[j])
        elif g1 == 1 and x1 == 1:
            for j in range(nc):
                g = ld(gr[j])
                s1[j] += g
                s2[j] += g * (ld(xr[j]) - m[j])
        else:
            for j in range(nc):
                g = ld(gr[j * g1])
                s1[j] += g
                s2[j] += g * (ld(xr[j * x1]) - m[j])
    for j in range(nc):
        out1[j] = s1[j]
        out2[j] = s2[j]


def dy_sums_cl(const real_t[:, :, :] dy, const real_t[:, :, :] x, const double[::1] m,
               double[::1] sum_dy, double[::1] sum_dy_xc,
               Py_ssize_t rows, Py_ssize_t cblock, Py_ssize_t groups, int nthreads):
    """Per-channel sum(dy) and sum(dy*(x - m)) for dy, x (O, C, 1); tasks as moments_cl."""
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t g0, g1, x0, x1, ntiles, ncb, t, g, c, r0, r1, c0, Cp, S, G = groups
    cdef const real_t* bg
    cdef const real_t* bx
    cdef void* raw
    cdef double* p1
    cdef double* p2
    cdef double* scratch
    cdef double a, b
    if O == 0 or C == 0 or x.shape[2] == 0:
        return
    bg = &dy[0, 0, 0]
    bx = &x[0, 0, 0]
    g0 = dy.strides[0] // sizeof(real_t)
    g1 = dy.strides[1] // sizeof(real_t)
    x0 = x.strides[0] // sizeof(real_t)
    x1 = x.strides[1] // sizeof(real_t)
    ntiles = (O + rows - 1) // rows
    ncb = (C + cblock - 1) // cblock
    Cp = pad8(C)
    S = pad8(3 * cblock)
    nthreads = max(nthreads, 1)
    raw = malloc((2 * G * Cp + nthreads * S) * sizeof(double) + 64)
    if raw == NULL:
        raise MemoryError()
    p1 = fbn_align64(raw)
    p2 = p1 + G * Cp
    scratch = p2 + G * Cp
    try:
        for t in prange(G * ncb, nogil=True, schedule="dynamic", num_threads=nthreads):
            r0 = min((t // ncb) * ntiles // G * rows, O)
            r1 = min((t // ncb + 1) * ntiles // G * rows, O)
            c0 = (t % ncb) * cblock
            task_dy_sums_cl(bg + r0 * g0 + c0 * g1, g0, g1, bx + r0 * x0 + c0 * x1, x0, x1,
                            r1 - r0, min(cblock, C - c0), &m[c0],
                            p1 + (t // ncb) * Cp + c0, p2 + (t // ncb) * Cp + c0,
                            scratch + threadid() * S)
        with nogil:
            for c in range(C):
                a = 0.0
                b = 0.0
                for g in range(G):
                    a = a + p1[g * Cp + c]
                    b = b + p2[g * Cp + c]
                sum_dy[c] = a
                sum_dy_xc[c] = b
    finally:
        free(raw)


# -- small inputs: the whole training forward in one serial call ----------------

ctypedef fused prm_t:   # per-channel vectors: float32 for float16 data, else x's dtype
    float
    double


def train_small(const real_t[:, :, :] x, const prm_t[::1] scale, const prm_t[::1] offset,
                double eps, double momentum, prm_t[::1] rm, prm_t[::1] rv,
                real_t[:, :, :] out, prm_t[::1] mean_out, prm_t[::1] invstd_out,
                Py_ssize_t chunk, Py_ssize_t rows):
    """Fused training forward for a small x (O, C, I), serial, one call.

    Same per-run / per-tile two-pass statistics and the same elementwise pass
    as the parallel kernels (so the same numbers), without their per-call
    Python work.  x/out: float32, float64 or float16 as its uint16 bits; the
    vectors float32 or float64.  scale/offset/rm/rv may be None; out may be x.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t so, sc, si, oo, oc_, oi, nk, k, o, c, L
    cdef const real_t* bx
    cdef real_t* bo
    cdef void* raw
    cdef double* mean
    cdef double* m2
    cdef double* a
    cdef double* b
    cdef double* zero
    cdef double n, cnt, mu, q, inv, bm = 0.0, bq = 0.0
    cdef bint has_scale = scale is not None, has_offset = offset is not None
    cdef bint has_rm = rm is not None, has_rv = rv is not None
    if O == 0 or C == 0 or I == 0:
        raise ValueError("train_small: empty input")
    bx = &x[0, 0, 0]
    bo = &out[0, 0, 0]
    so = x.strides[0] // sizeof(real_t)
    sc = x.strides[1] // sizeof(real_t)
    si = x.strides[2] // sizeof(real_t)
    oo = out.strides[0] // sizeof(real_t)
    oc_ = out.strides[1] // sizeof(real_t)
    oi = out.strides[2] // sizeof(real_t)
    n = <double>(O * I)
    raw = malloc((12 * pad8(C)) * sizeof(double) + 64)
    if raw == NULL:
        raise MemoryError()
    mean = fbn_align64(raw)
    m2 = mean + pad8(C)
    a = m2 + pad8(C)
    b = a + pad8(C)
    zero = b + pad8(C)          # then 7*C of scratch for task_moments_cl
    try:
        with nogil:
            if I == 1:
                task_moments_cl(bx, so, sc, 0, O, rows, C, mean, m2, zero + pad8(C))
            else:
                nk = (I + chunk - 1) // chunk
                for c in range(C):
                    cnt = 0.0
                    mu = 0.0
                    q = 0.0
                    for o in range(O):
                        for k in range(nk):
                            L = min(chunk, I - k * chunk)
                            run_stats(bx + o * so + c * sc + k * chunk * si, L, si, &bm, &bq)
                            chan(&cnt, &mu, &q, <double>L, bm, bq)
                    mean[c] = mu
                    m2[c] = q
            for c in range(C):
                # var + eps == 0 (constant channel, eps = 0): invstd 0, y = offset
                inv = m2[c] / n + eps
                inv = 0.0 if inv == 0.0 else 1.0 / sqrt(inv)
                a[c] = inv * scale[c] if has_scale else inv
                b[c] = offset[c] if has_offset else 0.0
                zero[c] = 0.0
                mean_out[c] = <prm_t>mean[c]
                invstd_out[c] = <prm_t>inv
                if has_rm:
                    rm[c] = <prm_t>((1.0 - momentum) * rm[c] + momentum * mean[c])
                if has_rv:
                    rv[c] = <prm_t>((1.0 - momentum) * rv[c] + momentum * (m2[c] / (n - 1.0)))
            if I == 1:
                rows_affine(bx, so, sc, bo, oo, oc_, <const real_t*>NULL, 0, 0, 0, O, 0, C,
                            mean, a, b, zero, 0)
            else:
                for o in range(O):
                    for c in range(C):
                        run_affine(bx + o * so + c * sc, si, bo + o * oo + c * oc_, oi,
                                   <const real_t*>NULL, 0, I, mean[c], a[c], b[c], 0.0, 0)
    finally:
        free(raw)


# -- small inputs: inference and backward in one serial call --------------------
# What the general path does in several calls (per-channel coefficients in NumPy,
# then the elementwise kernel; for the backward the sums kernel first), fused:
# for a few KB the calls cost far more than the arithmetic.  The per-channel
# vectors come in whatever float dtype the caller has (a float64 mean with float32
# data: the layers keep their statistics in float64), so they get fused types of
# their own; the loops these functions call are specialised on x's type only.
#
# Two loop nests.  Runs: channels-first, one run of I values per (o, c), as
# affine_cf.  Rows: each o a row of B = C*I values (channels-last, I == 1; or
# channels-first with short runs, folded as the general path folds them), k rows
# taken as one wide row of W = k*B values where the rows follow each other in
# memory, with the per-channel values spread along it; as affine_cl and
# dy_sums_cl.  Short runs cost more in per-run set-up than in arithmetic.

ctypedef fused stat_t:   # mean/var/invstd: float32 or float64 for any x
    float
    double

ctypedef fused grad_t:   # dscale/doffset: the per-channel dtype of x
    float
    double


cdef inline Py_ssize_t widen(Py_ssize_t B) noexcept nogil:
    """Rows of B values per wide row: k*B >= 64 and a multiple of 16 values, so
    that the inner loop is long and whole vectors even for B = 4 (the loop
    set-up per row cost more than the row; as cpu_numba._widen)."""
    cdef Py_ssize_t g = 16, k
    if B <= 0 or B > 256:
        return 1
    while B % g:
        g = g // 2
    k = 16 // g
    while k * B < 64:
        k = 2 * k
    return k


cdef inline void spread(const double* v, Py_ssize_t B, Py_ssize_t I, double* w,
                        Py_ssize_t W) noexcept nogil:
    """w[j] = v[(j % B) // I] for j < W: the per-channel values v along a wide
    row of W // B rows of B = C*I values (each channel's I values together)."""
    cdef Py_ssize_t j, i
    for j in range(B // I):
        for i in range(I):
            w[j * I + i] = v[j]
    for j in range(B, W):
        w[j] = w[j - B]


cdef struct Rows:
    Py_ssize_t B   # values per row: C*I
    Py_ssize_t k   # rows per wide row
    Py_ssize_t R   # wide rows (the O - R*k rows after them are taken one by one)
    Py_ssize_t W   # values per wide row (B if R == 0)


cdef inline bint as_rows(Py_ssize_t O, Py_ssize_t C, Py_ssize_t I, Py_ssize_t fold,
                         const Py_ssize_t* s, Py_ssize_t narrays, Rows* rows) noexcept nogil:
    """Plan the rows nest for arrays of shape (O, C, I) with strides (in items)
    s[3*a : 3*a + 3], a < narrays; False to take the runs nest instead
    (I > fold; fewer than 4 rows, which do not pay for spreading the per-channel
    values along a row; or a (C, I) block that is not one evenly strided row)."""
    cdef Py_ssize_t a, cs
    cdef bint wide = True
    rows.B = C * I
    rows.k = 1
    rows.R = 0
    rows.W = rows.B
    if I > 1 and (I > fold or O < 4):
        return False
    for a in range(narrays):
        cs = s[3 * a + 1] if I == 1 else s[3 * a + 2]   # stride along a row
        if I > 1 and s[3 * a + 1] != I * cs:
            return False
        wide = wide and s[3 * a] == rows.B * cs
    rows.k = widen(rows.B) if wide else 1
    rows.R = O // rows.k if rows.k > 1 else 0
    rows.W = rows.k * rows.B if rows.R > 0 else rows.B
    return True


def infer_small(const real_t[:, :, :] x, const prm_t[::1] scale, const prm_t[::1] offset,
                const stat_t[::1] mean, const stat_t[::1] var, double eps,
                real_t[:, :, :] out, Py_ssize_t fold, int nthreads=1):
    """Fused inference forward of x (O, C, I) in one call, on ``nthreads`` OpenMP
    threads (1: serial).

    ``out = q*(x - mean) + r`` with ``q = scale/sqrt(var + eps)``, ``r = offset``
    (core.infer_coefficients), in float64, rounded once; runs of I > ``fold``
    values, else rows (see above); in parallel, blocks of wide rows or of runs.
    x/out: float32, float64 or float16 as its uint16 bits, out may be x;
    scale/offset (C,) float32 or float64, or None; mean/var (C,) float32 or float64.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t s[6]
    cdef Py_ssize_t o, c, cx, co, W = 0, t, nb, a0, a1, wk, oc
    cdef Rows plan
    cdef bint by_rows, spreads
    cdef const real_t* bx
    cdef real_t* bo
    cdef void* raw
    cdef double* m
    cdef double* q
    cdef double* r
    cdef double* mw
    cdef double* qw
    cdef double* rw
    cdef double inv
    cdef bint has_scale = scale is not None, has_offset = offset is not None
    if O == 0 or C == 0 or I == 0:
        raise ValueError("infer_small: empty input")
    bx = &x[0, 0, 0]
    bo = &out[0, 0, 0]
    for c in range(3):
        s[c] = x.strides[c] // sizeof(real_t)
        s[3 + c] = out.strides[c] // sizeof(real_t)
    by_rows = as_rows(O, C, I, fold, s, 2, &plan)
    # rows of C values taken one by one need no spread vectors (no copies of
    # C-long vectors for a (2, 65536) input)
    spreads = by_rows and (I > 1 or plan.R > 0)
    W = plan.W if spreads else 0
    raw = malloc((3 * pad8(C) + 3 * pad8(W)) * sizeof(double) + 64)
    if raw == NULL:
        raise MemoryError()
    m = fbn_align64(raw)
    q = m + pad8(C)
    r = q + pad8(C)
    mw = r + pad8(C) if spreads else m
    qw = mw + pad8(W) if spreads else q
    rw = qw + pad8(W) if spreads else r
    try:
        with nogil:
            for c in range(C):
                # var + eps == 0 gives q = inf, as core.infer_coefficients (PyTorch's
                # invstd = 0 rule is for batch statistics only)
                inv = 1.0 / sqrt(<double>var[c] + eps)
                q[c] = <double>scale[c] * inv if has_scale else inv
                r[c] = offset[c] if has_offset else 0.0
                m[c] = mean[c]
            if by_rows:
                cx = s[1] if I == 1 else s[2]
                co = s[4] if I == 1 else s[5]
                if spreads:
                    spread(m, plan.B, I, mw, W)
                    spread(q, plan.B, I, qw, W)
                    spread(r, plan.B, I, rw, W)
                # the wide rows (none: the rows) in nb blocks, one per thread; then the
                # rows left over
                a1 = plan.R if plan.R > 0 else O
                wk = plan.k if plan.R > 0 else 1
                nb = min(<Py_ssize_t>nthreads, a1) if nthreads > 1 else 1
                for t in prange(nb, schedule="static", num_threads=nthreads):
                    a0 = t * a1 // nb
                    rows_affine(bx, wk * s[0], cx, bo, wk * s[3], co, <const real_t*>NULL, 0, 0,
                                a0, (t + 1) * a1 // nb - a0, 0, wk * plan.B, mw, qw, rw,
                                <const double*>NULL, 0)
                if plan.R > 0:
                    rows_affine(bx, s[0], cx, bo, s[3], co, <const real_t*>NULL, 0, 0,
                                plan.R * plan.k, O - plan.R * plan.k, 0, plan.B, mw, qw, rw,
                                <const double*>NULL, 0)
            elif nthreads > 1:
                for oc in prange(O * C, schedule="static", num_threads=nthreads):
                    run_affine(bx + (oc // C) * s[0] + (oc % C) * s[1], s[2],
                               bo + (oc // C) * s[3] + (oc % C) * s[4], s[5], <const real_t*>NULL,
                               0, I, m[oc % C], q[oc % C], r[oc % C], 0.0, 0)
            else:
                for o in range(O):
                    for c in range(C):
                        run_affine(bx + o * s[0] + c * s[1], s[2], bo + o * s[3] + c * s[4], s[5],
                                   <const real_t*>NULL, 0, I, m[c], q[c], r[c], 0.0, 0)
    finally:
        free(raw)


cdef inline void backward_channel(double s1, double s2, double n, double scale, double inv,
                                  bint frozen, double* a, double* b, double* cc,
                                  double* dscale) noexcept nogil:
    """core.gradient_sums + core.backward_coefficients for one channel: sums s1 of
    dy and s2 of dy*(x - mean) over n > 0 values, scale (1.0 for None) -> dscale and
    (a, b, cc) of dx = b*(x - mean) + cc + a*dy, in core's order of operations.
    ``frozen``: core.infer_backward_coefficients instead (eval mode: dx = a*dy)."""
    dscale[0] = s2 * inv
    a[0] = scale * inv
    if frozen:
        b[0] = 0.0
        cc[0] = 0.0
    else:
        b[0] = -a[0] * inv * dscale[0] / n
        cc[0] = -a[0] * s1 / n


cdef inline double _inv(double v, bint frozen, double eps) noexcept nogil:
    """invstd as given, or (frozen) 1/sqrt(var + eps) from the variance v."""
    return 1.0 / sqrt(v + eps) if frozen else v


cdef void channel_dy_sums(const real_t* pg, Py_ssize_t g0, Py_ssize_t g2, const real_t* px,
                          Py_ssize_t x0, Py_ssize_t x2, Py_ssize_t O, Py_ssize_t I, double m,
                          double* s1, double* s2) noexcept nogil:
    """sum(dy), sum(dy*(x - m)) over one channel's O runs of I values (run o at
    pg + o*g0, px + o*x0)."""
    cdef Py_ssize_t o
    cdef double t1 = 0.0, t2 = 0.0, p1 = 0.0, p2 = 0.0
    if g2 == 1 and x2 == 1:
        if real_t is float:
            fbn_dy_chan_f32(pg, g0, px, x0, O, I, m, s1, s2)
            return
        elif real_t is double:
            fbn_dy_chan_f64(pg, g0, px, x0, O, I, m, s1, s2)
            return
    for o in range(O):
        run_dy_sums(pg + o * g0, g2, px + o * x0, x2, I, m, &p1, &p2)
        t1 = t1 + p1
        t2 = t2 + p2
    s1[0] = t1
    s2[0] = t2


def backward_small(const real_t[:, :, :] dy, const real_t[:, :, :] x, const prm_t[::1] scale,
                   const stat_t[::1] mean, const stat_t[::1] invstd, real_t[:, :, :] out,
                   grad_t[::1] dscale_out, grad_t[::1] doffset_out, Py_ssize_t fold,
                   bint frozen=False, double eps=0.0):
    """Fused training backward for a small x (O, C, I), serial, one call.
    ``frozen``: the eval-mode backward (batch_norm_infer_backward) instead, with
    ``invstd`` holding the running variance: inv = 1/sqrt(var + eps), dx = a*dy.

    Per channel ``s1 = sum(dy)``, ``s2 = sum(dy*(x - mean))``, then ``dscale =
    s2*invstd``, ``doffset = s1`` and ``dx = b*(x - mean) + cc + a*dy``
    (core.backward_coefficients), in float64, rounded once.  Runs of I > ``fold``
    values channel by channel, so that the dx pass finds the channel's slab of
    x and dy in L1/L2, the sums in vector lanes carried across the channel's
    runs; else rows (see above), both passes over all channels at once, the
    sums per column of a wide row (as dy_sums_cl) folded per channel after.

    dy/x/out: float32, float64 or float16 as its uint16 bits, out may be dy or x;
    scale (C,) float32 or float64, or None; mean/invstd (C,) float32 or float64;
    dscale_out/doffset_out (C,) float32 or float64.
    """
    cdef Py_ssize_t O = x.shape[0], C = x.shape[1], I = x.shape[2]
    cdef Py_ssize_t s[9]
    cdef Py_ssize_t o, c, j, gc, xc, oc_, B, W, r0
    cdef Rows plan
    cdef bint by_rows, spreads
    cdef const real_t* bg
    cdef const real_t* bx
    cdef real_t* bo
    cdef void* raw
    cdef double* m
    cdef double* s1
    cdef double* s2
    cdef double* a
    cdef double* b
    cdef double* cc
    cdef double* mw
    cdef double* aw
    cdef double* bw
    cdef double* ccw
    cdef double* s1w
    cdef double* s2w
    cdef double* s1b
    cdef double* s2b
    cdef double* scratch
    cdef double n, ds, sc
    cdef bint has_scale = scale is not None
    if O == 0 or C == 0 or I == 0:
        raise ValueError("backward_small: empty input")
    bg = &dy[0, 0, 0]
    bx = &x[0, 0, 0]
    bo = &out[0, 0, 0]
    for c in range(3):
        s[c] = dy.strides[c] // sizeof(real_t)
        s[3 + c] = x.strides[c] // sizeof(real_t)
        s[6 + c] = out.strides[c] // sizeof(real_t)
    n = <double>(O * I)
    by_rows = as_rows(O, C, I, fold, s, 3, &plan)
    B = plan.B if by_rows else 0
    W = plan.W if by_rows else 0
    # rows of C values taken one by one need no spread vectors (see infer_small)
    spreads = by_rows and (I > 1 or plan.R > 0)
    # per channel: m, s1, s2, a, b, cc; along a wide row: the spread m, a, b, cc
    # and the column sums (s1w, s2w; s1b, s2b for the single rows); 3*W of
    # scratch for task_dy_sums_cl
    raw = malloc((6 * pad8(C) + (6 * pad8(W) + 2 * pad8(B) if spreads else 0) + 3 * pad8(W))
                 * sizeof(double) + 64)
    if raw == NULL:
        raise MemoryError()
    m = fbn_align64(raw)
    s1 = m + pad8(C)
    s2 = s1 + pad8(C)
    a = s2 + pad8(C)
    b = a + pad8(C)
    cc = b + pad8(C)
    scratch = cc + pad8(C)
    mw = m
    aw = a
    bw = b
    ccw = cc
    s1b = s1
    s2b = s2
    s1w = s2w = NULL
    if spreads:
        mw = scratch
        aw = mw + pad8(W)
        bw = aw + pad8(W)
        ccw = bw + pad8(W)
        s1w = ccw + pad8(W)
        s2w = s1w + pad8(W)
        s1b = s2w + pad8(W)
        s2b = s1b + pad8(B)
        scratch = s2b + pad8(B)
    try:
        with nogil:
            for c in range(C):
                m[c] = mean[c]
            if by_rows:
                gc = s[1] if I == 1 else s[2]
                xc = s[4] if I == 1 else s[5]
                oc_ = s[7] if I == 1 else s[8]
                r0 = plan.R * plan.k
                if spreads:
                    spread(m, B, I, mw, W)
                task_dy_sums_cl(bg + r0 * s[0], s[0], gc, bx + r0 * s[3], s[3], xc, O - r0, B,
                                mw, s1b, s2b, scratch)
                if spreads:
                    for c in range(C):
                        s1[c] = 0.0
                        s2[c] = 0.0
                    for j in range(B):
                        s1[j // I] += s1b[j]
                        s2[j // I] += s2b[j]
                if plan.R > 0:
                    task_dy_sums_cl(bg, plan.k * s[0], gc, bx, plan.k * s[3], xc, plan.R, W, mw,
                                    s1w, s2w, scratch)
                    for j in range(W):
                        s1[(j % B) // I] += s1w[j]
                        s2[(j % B) // I] += s2w[j]
                for c in range(C):
                    sc = scale[c] if has_scale else 1.0
                    backward_channel(s1[c], s2[c], n, sc, _inv(invstd[c], frozen, eps), frozen,
                                     &a[c], &b[c], &cc[c], &ds)
                    dscale_out[c] = <grad_t>ds
                    doffset_out[c] = <grad_t>s1[c]
                if spreads:
                    spread(a, B, I, aw, W)
                    spread(b, B, I, bw, W)
                    spread(cc, B, I, ccw, W)
                if plan.R > 0:
                    rows_affine(bx, plan.k * s[3], xc, bo, plan.k * s[6], oc_, bg, plan.k * s[0],
                                gc, 0, plan.R, 0, W, mw, bw, ccw, aw, 0)
                rows_affine(bx, s[3], xc, bo, s[6], oc_, bg, s[0], gc, r0, O - r0, 0, B, mw, bw,
                            ccw, aw, 0)
            else:
                for c in range(C):
                    channel_dy_sums(bg + c * s[1], s[0], s[2], bx + c * s[4], s[3], s[5], O, I,
                                    m[c], &s1[c], &s2[c])
                    sc = scale[c] if has_scale else 1.0
                    backward_channel(s1[c], s2[c], n, sc, _inv(invstd[c], frozen, eps), frozen,
                                     &a[c], &b[c], &cc[c], &ds)
                    dscale_out[c] = <grad_t>ds
                    doffset_out[c] = <grad_t>s1[c]
                    for o in range(O):
                        run_affine(bx + o * s[3] + c * s[4], s[5], bo + o * s[6] + c * s[7], s[8],
                                   bg + o * s[0] + c * s[1], s[2], I, m[c], b[c], cc[c], a[c], 0)
    finally:
        free(raw)
