/* One pass over a tile of base-2 logits: running top-K and running log-sum-exp per row.
 *
 * The torch path of featopt/weights/decode.py needs several passes and a dozen small ops per tile
 * (group max, threshold, compaction, merge, exp2, sum); this does it while each row is in cache.
 * Compiled on first use by featopt/weights/native.py (plain C, no torch headers) and called through
 * ctypes.
 *
 * Per row r the state is a min-heap of the best K logits seen (values hv[r*K ..], token ids hi, size
 * hn[r]; hv[r*K] is the K-th best once full) and (m[r], s[r]): the running max and the sum of
 * exp2(logit - m[r]) so far. Results must equal a full softmax: tests/weights check them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* GCC/clang vector extensions: 16 floats, one AVX-512 register (two AVX2 or four NEON ones). */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define LANES 16
#define BLOCK 64  /* logits per block of the threshold scan: four vectors */

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vi splati(int32_t x) { return (vi){0} + x; }
static inline vf vmax(vf a, vf b) { vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
/* Bit b set where x[b] > t, for the BLOCK logits at x: one compare per vector where the CPU gives
 * bit masks (AVX-512, AVX2), lane by lane elsewhere. */
static inline uint64_t block_mask(const float *x, float t) {
    uint64_t bits = 0;
#if defined(__AVX512F__)
    __m512 tv = _mm512_set1_ps(t);
    for (int q = 0; q < BLOCK; q += 16)
        bits |= (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + q), tv, _CMP_GT_OQ) << q;
#elif defined(__AVX2__)
    __m256 tv = _mm256_set1_ps(t);
    for (int q = 0; q < BLOCK; q += 8)
        bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + q), tv, _CMP_GT_OQ)) << q;
#else
    vf tv = splat(t);
    for (int q = 0; q < BLOCK; q += LANES) {
        vi m = load(x + q) > tv;
        for (int l = 0; l < LANES; l++) bits |= (uint64_t)(m[l] & 1) << (q + l);
    }
#endif
    return bits;
}

/* 2^-z for z >= 0, to ~1e-7 relative (float rounding dominates): -z = k + f with k an integer and f
 * in [-0.5, 0.5], a degree-7 Taylor polynomial for 2^f, k added to the exponent bits. z is clamped
 * to 125 (as bits: for non-negative floats, integer order is value order; +inf and NaN clamp too),
 * so a term is never below 2^-125 of the max: at most V * 2^-125 added to a sum that is at least 1. */
static inline vf exp2_neg(vf z) {
    vi zb = (vi)z, cap = splati(0x42fa0000);  /* 125.0f */
    vi over = zb > cap;
    vf y = -(vf)((zb & ~over) | (cap & over));
    vi k = __builtin_convertvector(y - 0.5f, vi);  /* truncation toward zero: round(y) up to ties */
    vf f = y - __builtin_convertvector(k, vf);
    const float c1 = 0.693147180559945f, c2 = 0.240226506959101f, c3 = 0.0555041086648216f,
                c4 = 0.00961812910762848f, c5 = 0.00133335581464284f, c6 = 0.000154035303933816f,
                c7 = 1.52527338040598e-05f;
    vf p = ((((((c7 * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + 1.0f;
    return (vf)((vi)p + (k << 23));
}

static void heap_push(float *v, int64_t *id, int32_t *n, float x, int64_t j) {
    int64_t i = (*n)++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (v[p] <= x) break;
        v[i] = v[p];
        id[i] = id[p];
        i = p;
    }
    v[i] = x;
    id[i] = j;
}

static void heap_replace_top(float *v, int64_t *id, int64_t K, float x, int64_t j) {
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= K) break;
        if (c + 1 < K && v[c + 1] < v[c]) c++;
        if (v[c] >= x) break;
        v[i] = v[c];
        id[i] = id[c];
        i = c;
    }
    v[i] = x;
    id[i] = j;
}

/* The `rank`-th largest (from 0) of a[0..n), reordering a: quickselect. */
static float select_desc(float *a, int64_t n, int64_t rank) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (rank <= j) hi = j;
        else if (rank >= i) lo = i;
        else break;
    }
    return a[rank];
}

#define MAX_BOUND_LANES 4096

/* A lower bound of the K-th largest of x[0..vc): the K-th largest of M maxima of disjoint sets
 * (lane l of segment g: x[g L + l], x[g L + l + 16], ... within the segment), so K logits reach it.
 * With M about 4K, about 1.2 K logits of the row pass it, against K (1 + ln(vc / K)) that would enter
 * a heap filled from the start. -INFINITY where vc is too short for it to pay. */
static float first_bound(const float *x, int64_t vc, int64_t K) {
    int64_t S = (4 * K + LANES - 1) / LANES, M = S * LANES;
    if (M > MAX_BOUND_LANES || vc < 8 * M) return -INFINITY;
    int64_t L = vc / S / LANES * LANES;
    float maxima[MAX_BOUND_LANES];
    for (int64_t g = 0; g < S; g++) {
        vf mx = load(x + g * L);
        for (int64_t b = LANES; b < L; b += LANES) mx = vmax(mx, load(x + g * L + b));
        memcpy(maxima + g * LANES, &mx, sizeof mx);
    }
    return select_desc(maxima, M, K - 1);
}

static inline void offer(float *v, int64_t *id, int32_t *n, int64_t K, float x, int64_t j) {
    if (*n < K) heap_push(v, id, n, x, j);
    else heap_replace_top(v, id, K, x, j);
}

static void reduce_row(const float *x, int64_t vc, int64_t offset, float *v, int64_t *id, int32_t *n,
                       int64_t K, double *m, double *s, int lse) {
    /* Below `thr` nothing can enter: the heap's K-th best once full, before that a bound under which
     * fewer than K logits of this row lie (nextafter: logits equal to the bound do enter). */
    float fill = *n == 0 ? nextafterf(first_bound(x, vc, K), -INFINITY) : -INFINITY;
    float thr = *n < K ? fill : v[0];
    int64_t i = 0;
    for (; i + BLOCK <= vc; i += BLOCK) {
        /* Rare once the heap holds good values: about K ln(V / K) entries per row in all. */
        for (uint64_t bits = block_mask(x + i, thr); bits; bits &= bits - 1) {
            int b = __builtin_ctzll(bits);
            if (x[i + b] > thr) {  /* thr may have risen since the mask was taken */
                offer(v, id, n, K, x[i + b], offset + i + b);
                thr = *n < K ? fill : v[0];
            }
        }
    }
    for (; i < vc; i++)
        if (x[i] > thr) {
            offer(v, id, n, K, x[i], offset + i);
            thr = *n < K ? fill : v[0];
        }
    if (!lse) return;
    /* The heap holds the K best logits so far, so its largest is the max of all of them. */
    float best = -INFINITY;
    for (int32_t j = 0; j < *n; j++) best = v[j] > best ? v[j] : best;
    if (best == -INFINITY) return;
    double top = *m > best ? *m : (double)best;
    float shift = (float)top;  /* a logit, so exact in float */
    vf sh = splat(shift);
    double total = 0.0;
    int64_t j = 0;
    /* Float lanes sum 1024 logits at a time (every term is at most 1); the blocks add in double. */
    for (; j + 1024 <= vc; j += 1024) {
        vf acc = splat(0.0f);
        for (int b = 0; b < 1024; b += LANES) acc += exp2_neg(sh - load(x + j + b));
        for (int l = 0; l < LANES; l++) total += acc[l];
    }
    for (; j + LANES <= vc; j += LANES) {
        vf e = exp2_neg(sh - load(x + j));
        for (int l = 0; l < LANES; l++) total += e[l];
    }
    for (; j < vc; j++) total += exp2(x[j] - top);
    *s = (*m == -INFINITY ? 0.0 : *s * exp2(*m - top)) + total;
    *m = top;
}

/* Rows [r0, r1) of a tile `logits` [R, vc] (row stride ld) whose column 0 is token `offset`, split
 * over `threads` OpenMP threads. Built with -fopenmp, this library shares torch's libgomp (the
 * dynamic linker loads one libgomp.so.1 per process), so the rows go to the same worker threads that
 * ran the matmul, which are still spinning for work; threads of a second pool would fight them. */
void featopt_tile_reduce(const float *logits, int64_t vc, int64_t ld, int64_t offset, float *hv,
                         int64_t *hi, int32_t *hn, int64_t K, double *m, double *s, int64_t r0,
                         int64_t r1, int lse, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = r0; r < r1; r++)
        reduce_row(logits + r * ld, vc, offset, hv + r * K, hi + r * K, hn + r, K, m + r, s + r, lse);
}

/* 1 when built with OpenMP: featopt_tile_reduce splits rows itself; else Python threads split them. */
int featopt_tile_reduce_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
