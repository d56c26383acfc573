/* Host kernel of the weight-sharing prox, per row:
 *   key histograms (one pass over x; they also tell a non-finite row, which
 *   is then answered without sorting) -> LSD radix sort of key << 32 | index
 *   (float32: 3 passes of 11/11/10 bits, the first reading x, with prefetches
 *   beyond 1.5e6 elements; from 6e5 to 1.5e6 the top digit first, then each
 *   bucket LSD in cache; float64: 8 of 8 bits) -> pool adjacent violators
 *   (float64) on the sorted keys -> block means scattered back through the
 *   indices.
 *   Short rows (float32: up to SHORT_ROW32 elements, float64: SHORT_ROW64)
 *   sort by comparison instead, with branchless merges: the radix sort's fixed
 *   cost per row (clearing and summing thousands of counters, per pass)
 *   outweighs sorting them. Both sorts are stable, so every row gets the same
 *   order either way.
 *
 * prox_rows(x, t, d, out, wide=False): x is a buffer of rows*d float32 values
 * (float64 when `wide`), t a float64 buffer of rows steps, out a writable
 * buffer like x. Row r of out is the prox of t[r] * R on row r of x (see
 * isotonic.py for the mathematics and the contract). Row by row:
 *   t NaN or < 0         -> the row is NaN (no prox for that strength);
 *   t == 0, or d == 1    -> the row itself, bit for bit;
 *   a NaN or Inf in it   -> the row is NaN (the prox of a non-finite point is
 *                           undefined), whatever the other rows hold;
 *   t >= max - min       -> the row's mean (the whole group is one cluster:
 *                           docs/design.md §4.2), without the ramp, so no
 *                           strength is too large;
 *   otherwise            -> pool adjacent violators on z - a(2k - d - 1).
 * The GIL is released while it runs. Plain C99 and the Python buffer protocol,
 * so it builds with any C compiler and needs no NumPy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

/* Scratch of `bytes`, on huge pages where the kernel offers them: a fresh 4 KiB
 * page costs a fault, and tens of thousands of faults would outweigh the sort. */
static void *scratch_alloc(size_t bytes) {
  const size_t huge = (size_t)2 << 20;
  void *p = NULL;
  if (bytes >= huge) {
    size_t rounded = (bytes + huge - 1) / huge * huge;
    if (posix_memalign(&p, huge, rounded) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return p;
  }
  return malloc(bytes);
}

/* One scratch block is kept between calls (up to CACHE_MAX bytes): the prox
 * runs once per step on the same sizes, and a fresh block costs its page
 * faults and zeroing (about 2 ms per 20 MB) on every call. Taken and given
 * back with the GIL held, so concurrent calls never share it. */
#define CACHE_MAX ((size_t)64 << 20)
static void *cached_block = NULL;
static size_t cached_bytes = 0;

/* A block of at least `bytes`; *size is its real size, for scratch_give_back. */
static void *scratch_take(size_t bytes, size_t *size) {
  if (cached_block && cached_bytes >= bytes) {
    void *p = cached_block;
    *size = cached_bytes;
    cached_block = NULL;
    return p;
  }
  *size = bytes;
  return scratch_alloc(bytes);
}

static void scratch_give_back(void *p, size_t bytes) {
  if (!p) return;
  if (bytes > CACHE_MAX || (cached_block && cached_bytes >= bytes)) {
    free(p);
    return;
  }
  free(cached_block);
  cached_block = p;
  cached_bytes = bytes;
}

/* Order-preserving maps of float bits to unsigned: negatives flip every bit,
 * the rest flip the sign bit. NaNs land beyond the infinities, so a row holds a
 * non-finite value exactly when its first or last sorted value is one. */
static inline uint32_t float_key(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b ^ ((uint32_t)(-(int32_t)(b >> 31)) | 0x80000000u);
}

static inline float key_float(uint32_t k) {
  uint32_t b = k ^ ((k >> 31) ? 0x80000000u : 0xFFFFFFFFu);
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

static inline uint64_t double_key(double f) {
  uint64_t b;
  memcpy(&b, &f, sizeof b);
  return b ^ ((uint64_t)(-(int64_t)(b >> 63)) | 0x8000000000000000ull);
}

static inline double key_double(uint64_t k) {
  uint64_t b = k ^ ((k >> 63) ? 0x8000000000000000ull : 0xFFFFFFFFFFFFFFFFull);
  double f;
  memcpy(&f, &b, sizeof f);
  return f;
}

/* Float32 keys sort in 3 LSD passes of 11, 11 and 10 bits: one pass fewer
 * than bytes, and 2048 counters of 32 bits per digit stay in L1. */
#define BUCKETS 2048
static const int SHIFT32[3] = {0, 11, 22};
static const uint32_t MASK32[3] = {2047, 2047, 1023};

/* Rows longer than PREFETCH_ROW outgrow the caches: each pass then writes its
 * 2048 buckets into memory, one cache line of each at a time, and every first
 * write to a line waits for it (the hardware prefetchers follow a few streams,
 * not thousands). So each write asks for the line PREFETCH_AHEAD elements
 * further in its bucket, which is that bucket's next line by the time it is
 * reached: a third off the sort from d = 2e6 on (2e6 and 1e7 measured), while
 * at 1e6 the prefetches cost more than they save. The prox's last step, the
 * scatter of the block means back to the row's order, writes at random: there
 * each write asks for the line of the element SCATTER_AHEAD places on, which
 * takes a quarter off it at 1e7 but nothing below ~5e6 (SCATTER_PREFETCH_ROW).
 * Prefetches are hints: they never fault, and compilers without the builtin
 * drop them. The addresses stay inside the scratch block or the output. */
#define PREFETCH_ROW 1500000
#define MSD_ROW 600000 /* see sort32_msd */
#define PREFETCH_AHEAD 16
#define SCATTER_PREFETCH_ROW 6000000
#define SCATTER_AHEAD 64
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH_W(p) __builtin_prefetch((p), 1)
#else
#define PREFETCH_W(p) ((void)0)
#endif

/* Counts of the three digits of the keys of x, in one pass over x (of the
 * top digit alone for the rows that sort32_msd sorts). */
static void histograms32(const float *x, Py_ssize_t n, uint32_t count[3][BUCKETS]) {
  memset(count, 0, 3 * BUCKETS * sizeof(uint32_t));
  if (n >= MSD_ROW && n <= PREFETCH_ROW) { /* sort32_msd reads the top digit's only */
    /* Weights fill few of its buckets, and increments of one counter wait
     * for each other (store to load): odd elements count apart. */
    uint32_t *even = count[2], *odd = count[1];
    Py_ssize_t i = 0;
    for (; i + 1 < n; i += 2) {
      even[float_key(x[i]) >> 22]++;
      odd[float_key(x[i + 1]) >> 22]++;
    }
    if (i < n) even[float_key(x[i]) >> 22]++;
    for (int b = 0; b < 1024; b++) even[b] += odd[b];
    return;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    uint32_t k = float_key(x[i]);
    count[0][k & 2047]++;
    count[1][(k >> 11) & 2047]++;
    count[2][k >> 22]++;
  }
}

/* A key below -FLT_MAX's (top digit <= 1) is -Inf or a negative NaN, one above
 * FLT_MAX's (top digit >= 1022) is +Inf or a positive NaN: the counts of the
 * top digit tell whether x is finite before any sorting. */
static int all_finite32(uint32_t count[3][BUCKETS]) {
  return count[2][0] + count[2][1] + count[2][1022] + count[2][1023] == 0;
}

/* Stable LSD radix sort of the keys of x with their indices, from the counts
 * of histograms32 (consumed). Each element travels as one uint64, key << 32 |
 * index: one write stream per bucket instead of two. The first pass reads x
 * itself, and a pass whose digit is the same for every key is skipped.
 * Returns the buffer, b0 or b1 (n each), that holds the result. */
static uint64_t *sort32(const float *x, Py_ssize_t n, uint32_t count[3][BUCKETS],
                        uint64_t *b0, uint64_t *b1) {
  const uint64_t *src = NULL; /* NULL: the source is x itself */
  uint64_t *dst = b0, *other = b1;
  for (int p = 0; p < 3; p++) {
    uint32_t *c = count[p];
    uint32_t sum = 0;
    int single = 0;
    for (int b = 0; b < BUCKETS; b++) {
      uint32_t v = c[b];
      if ((Py_ssize_t)v == n) single = 1;
      c[b] = sum;
      sum += v;
    }
    if (single) continue;
    const int shift = SHIFT32[p];
    const uint32_t mask = MASK32[p];
    if (n > PREFETCH_ROW) {
      if (src == NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
          uint32_t k = float_key(x[i]);
          uint32_t at = c[(k >> shift) & mask]++;
          PREFETCH_W(dst + at + PREFETCH_AHEAD);
          dst[at] = (uint64_t)k << 32 | (uint32_t)i;
        }
      } else {
        for (Py_ssize_t i = 0; i < n; i++) {
          uint64_t e = src[i];
          uint32_t at = c[(e >> (32 + shift)) & mask]++;
          PREFETCH_W(dst + at + PREFETCH_AHEAD);
          dst[at] = e;
        }
      }
    } else if (src == NULL) {
      for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t k = float_key(x[i]);
        dst[c[(k >> shift) & mask]++] = (uint64_t)k << 32 | (uint32_t)i;
      }
    } else {
      for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t e = src[i];
        dst[c[(e >> (32 + shift)) & mask]++] = e;
      }
    }
    src = dst;
    dst = other;
    other = (uint64_t *)src;
  }
  if (src == NULL) { /* every key is the same: x is sorted already */
    for (Py_ssize_t i = 0; i < n; i++) b0[i] = (uint64_t)float_key(x[i]) << 32 | (uint32_t)i;
    src = b0;
  }
  return (uint64_t *)src;
}

/* Keys and indices ping-pong between two buffer pairs, one pass after another. */
static inline void swap_buffers(uint64_t **src, uint64_t **dst, uint32_t **isrc, uint32_t **idst) {
  uint64_t *k = *src;
  *src = *dst;
  *dst = k;
  uint32_t *i = *isrc;
  *isrc = *idst;
  *idst = i;
}

/* The sorted keys and indices end in (a, ia), wherever the last pass left them. */
static inline void land_in(uint64_t *a, uint32_t *ia, const uint64_t *src, const uint32_t *isrc, Py_ssize_t n) {
  if (src != a) {
    memcpy(a, src, (size_t)n * sizeof *a);
    memcpy(ia, isrc, (size_t)n * sizeof *ia);
  }
}

/* Stable LSD radix sort of 64-bit keys with their 32-bit indices: 8 passes. */
static void radix_sort_wide(uint64_t *a, uint32_t *ia, uint64_t *tmp,
                            uint32_t *itmp, Py_ssize_t n) {
  uint64_t *src = a, *dst = tmp;
  uint32_t *isrc = ia, *idst = itmp;
  for (int p = 0; p < 8; p++) {
    const int shift = 8 * p;
    size_t count[256];
    memset(count, 0, sizeof count);
    for (Py_ssize_t i = 0; i < n; i++) count[(src[i] >> shift) & 255]++;
    size_t sum = 0;
    int single = 0;
    for (int b = 0; b < 256; b++) {
      size_t c = count[b];
      if (c == (size_t)n) single = 1;
      count[b] = sum;
      sum += c;
    }
    if (single) continue;
    for (Py_ssize_t i = 0; i < n; i++) {
      size_t at = count[(src[i] >> shift) & 255]++;
      dst[at] = src[i];
      idst[at] = isrc[i];
    }
    swap_buffers(&src, &dst, &isrc, &idst);
  }
  land_in(a, ia, src, isrc, n);
}

/* Short rows: a stable comparison sort, bottom-up merges ping-ponging between
 * two buffers. Every step is branchless (conditional moves): a branch on
 * random keys mispredicts half the time (insertion-sorted runs, tried first,
 * cost more than all the merges). Two runs of equal length merge from both
 * ends at once ("parity merge"): the front takes the n smallest, the back the
 * n largest, two independent chains, and neither reads past its runs (after
 * k < n steps from one end, i + j = k), so there are no bounds checks. Stable:
 * from the front a right element is taken only when strictly smaller, from
 * the back a left element only when strictly larger.
 * The thresholds are the measured crossovers, rounded down: float32 breaks
 * even near 450, float64, whose radix sort takes 8 passes, near 4096 (at
 * d = 64 the whole prox runs 5x faster in float32, 2.3x in float64). */
#define SHORT_ROW32 384
#define SHORT_ROW64 2048

/* Float32: key << 32 | index is distinct for every element, so any correct
 * sort gives the stable order; runs of 8 go through an optimal sorting
 * network (19 compare-exchanges), in registers. */
#define CX(i, j)                                  \
  do {                                            \
    const uint64_t lo_ = e##i < e##j ? e##i : e##j; \
    e##j = e##i < e##j ? e##j : e##i;             \
    e##i = lo_;                                   \
  } while (0)

static void sort8_32(uint64_t *a) {
  uint64_t e0 = a[0], e1 = a[1], e2 = a[2], e3 = a[3], e4 = a[4], e5 = a[5], e6 = a[6], e7 = a[7];
  CX(0, 2); CX(1, 3); CX(4, 6); CX(5, 7);
  CX(0, 4); CX(1, 5); CX(2, 6); CX(3, 7);
  CX(0, 1); CX(2, 3); CX(4, 5); CX(6, 7);
  CX(2, 4); CX(3, 5);
  CX(1, 4); CX(3, 6);
  CX(1, 2); CX(3, 4); CX(5, 6);
  a[0] = e0; a[1] = e1; a[2] = e2; a[3] = e3; a[4] = e4; a[5] = e5; a[6] = e6; a[7] = e7;
}

/* The last run of fewer than 8. */
static void insertion_sort32(uint64_t *a, Py_ssize_t n) {
  for (Py_ssize_t i = 1; i < n; i++) {
    const uint64_t e = a[i];
    Py_ssize_t j = i;
    for (; j > 0 && a[j - 1] > e; j--) a[j] = a[j - 1];
    a[j] = e;
  }
}

static void parity_merge32(const uint64_t *a, const uint64_t *b, Py_ssize_t n, uint64_t *out) {
  Py_ssize_t i = 0, j = 0, ie = n - 1, je = n - 1, lo = 0, hi = 2 * n - 1;
  for (Py_ssize_t k = 0; k < n; k++) {
    const uint64_t x = a[i], y = b[j];
    const int right = y < x;
    out[lo++] = right ? y : x;
    j += right;
    i += !right;
    const uint64_t u = a[ie], v = b[je];
    const int left = u > v;
    out[hi--] = left ? u : v;
    ie -= left;
    je -= !left;
  }
}

/* Runs of unequal lengths (the tail of a row whose length is not a power of
 * two times 8). */
static void merge32(const uint64_t *a, Py_ssize_t na, const uint64_t *b, Py_ssize_t nb,
                    uint64_t *out) {
  Py_ssize_t i = 0, j = 0, k = 0;
  while (i < na && j < nb) {
    const uint64_t x = a[i], y = b[j];
    const int right = y < x;
    out[k++] = right ? y : x;
    j += right;
    i += !right;
  }
  while (i < na) out[k++] = a[i++];
  while (j < nb) out[k++] = b[j++];
}

/* Sorts the n elements key << 32 | index of b0, with b1 as scratch: returns
 * b0 or b1, whichever holds the result. */
static uint64_t *merge_sort32(uint64_t *b0, uint64_t *b1, Py_ssize_t n) {
  Py_ssize_t lo = 0;
  for (; lo + 8 <= n; lo += 8) sort8_32(b0 + lo);
  insertion_sort32(b0 + lo, n - lo);
  uint64_t *src = b0, *dst = b1;
  for (Py_ssize_t w = 8; w < n; w *= 2) {
    for (lo = 0; lo < n; lo += 2 * w) {
      if (n - lo >= 2 * w)
        parity_merge32(src + lo, src + lo + w, w, dst + lo);
      else if (n - lo > w)
        merge32(src + lo, w, src + lo + w, n - lo - w, dst + lo);
      else
        memcpy(dst + lo, src + lo, (size_t)(n - lo) * sizeof *dst);
    }
    uint64_t *t = src;
    src = dst;
    dst = t;
  }
  return src;
}

/* The short-row counterpart of histograms32 + sort32: returns b0 or b1. */
static uint64_t *short_sort32(const float *x, Py_ssize_t n, uint64_t *b0, uint64_t *b1) {
  for (Py_ssize_t i = 0; i < n; i++) b0[i] = (uint64_t)float_key(x[i]) << 32 | (uint32_t)i;
  return merge_sort32(b0, b1, n);
}

/* Rows from MSD_ROW to PREFETCH_ROW (about 1e6: their two buffers outgrow the
 * L2 cache, not yet the L3) sort by the top digit first, then each bucket by
 * the low 22 bits, LSD, while it is in L2: weights fill only a few dozen
 * buckets of the top digit, so the first pass writes few streams, and a
 * bucket of a few percent of the row stays in L2 through its two passes.
 * 10% off the sort at 1e6 (measured on gaussian rows), a loss at 3e5. Same
 * order as sort32: both are stable, so both give the order of key << 32 |
 * index. */

/* Sorts a[0, m), which share their top digit, by the low 22 bits of the
 * key, with tmp (m) as scratch; the result ends in a. */
static void sort_low22(uint64_t *a, uint64_t *tmp, Py_ssize_t m) {
  uint64_t *src = a;
  if (m <= SHORT_ROW32) {
    src = merge_sort32(a, tmp, m);
  } else {
    uint32_t count[2][BUCKETS];
    memset(count, 0, sizeof count);
    for (Py_ssize_t i = 0; i < m; i++) {
      const uint32_t k = (uint32_t)(a[i] >> 32);
      count[0][k & 2047]++;
      count[1][(k >> 11) & 2047]++;
    }
    uint64_t *dst = tmp;
    for (int p = 0; p < 2; p++) {
      uint32_t *c = count[p];
      uint32_t sum = 0;
      int single = 0;
      for (int b = 0; b < BUCKETS; b++) {
        uint32_t v = c[b];
        if ((Py_ssize_t)v == m) single = 1;
        c[b] = sum;
        sum += v;
      }
      if (single) continue;
      const int shift = 32 + SHIFT32[p];
      for (Py_ssize_t i = 0; i < m; i++) {
        const uint64_t e = src[i];
        dst[c[(e >> shift) & 2047]++] = e;
      }
      uint64_t *t = src;
      src = dst;
      dst = t;
    }
  }
  if (src != a) memcpy(a, src, (size_t)m * sizeof *a);
}

/* sort32 for rows from MSD_ROW to PREFETCH_ROW: same contract, the result
 * always in b0. */
static uint64_t *sort32_msd(const float *x, Py_ssize_t n, uint32_t count[3][BUCKETS],
                            uint64_t *b0, uint64_t *b1) {
  uint32_t *c = count[2], start[1025];
  uint32_t sum = 0;
  for (int b = 0; b < 1024; b++) {
    start[b] = sum;
    const uint32_t v = c[b];
    c[b] = sum;
    sum += v;
  }
  start[1024] = sum;
  for (Py_ssize_t i = 0; i < n; i++) {
    const uint32_t k = float_key(x[i]);
    b0[c[k >> 22]++] = (uint64_t)k << 32 | (uint32_t)i;
  }
  for (int b = 0; b < 1024; b++) {
    const Py_ssize_t m = start[b + 1] - start[b];
    if (m > 1) sort_low22(b0 + start[b], b1 + start[b], m);
  }
  return b0;
}

/* The sort of a long float32 row: sort32's contract. */
static uint64_t *long_sort32(const float *x, Py_ssize_t n, uint32_t count[3][BUCKETS],
                             uint64_t *b0, uint64_t *b1) {
  if (n >= MSD_ROW && n <= PREFETCH_ROW) return sort32_msd(x, n, count, b0, b1);
  return sort32(x, n, count, b0, b1);
}

/* Float64 keys need all 64 bits, so their indices travel in a parallel array
 * and keys may tie: the merges start from runs of 1, every step stable. */
/* Merges the runs k[0, n) and k[n, 2n). Each step selects the position to
 * take, not the key and the index, so that it stays one conditional move. */
static void parity_merge64(const uint64_t *k, const uint32_t *ix, Py_ssize_t n, uint64_t *out,
                           uint32_t *iout) {
  Py_ssize_t i = 0, j = n, ie = n - 1, je = 2 * n - 1, lo = 0, hi = 2 * n - 1;
  for (Py_ssize_t s = 0; s < n; s++) {
    const int right = k[j] < k[i];
    const Py_ssize_t p = right ? j : i;
    out[lo] = k[p];
    iout[lo++] = ix[p];
    j += right;
    i += !right;
    const int left = k[ie] > k[je];
    const Py_ssize_t q = left ? ie : je;
    out[hi] = k[q];
    iout[hi--] = ix[q];
    ie -= left;
    je -= !left;
  }
}

static void merge64(const uint64_t *a, const uint32_t *ia, Py_ssize_t na, const uint64_t *b,
                    const uint32_t *ib, Py_ssize_t nb, uint64_t *out, uint32_t *iout) {
  Py_ssize_t i = 0, j = 0, k = 0;
  while (i < na && j < nb) {
    const uint64_t x = a[i], y = b[j];
    const uint32_t ix = ia[i], iy = ib[j];
    const int right = y < x;
    out[k] = right ? y : x;
    iout[k++] = right ? iy : ix;
    j += right;
    i += !right;
  }
  for (; i < na; i++, k++) {
    out[k] = a[i];
    iout[k] = ia[i];
  }
  for (; j < nb; j++, k++) {
    out[k] = b[j];
    iout[k] = ib[j];
  }
}

/* The short-row counterpart of radix_sort_wide, same contract: the result
 * ends in a and ia. */
static void short_sort64(uint64_t *a, uint32_t *ia, uint64_t *tmp, uint32_t *itmp,
                         Py_ssize_t n) {
  uint64_t *src = a, *dst = tmp;
  uint32_t *isrc = ia, *idst = itmp;
  for (Py_ssize_t w = 1; w < n; w *= 2) {
    for (Py_ssize_t lo = 0; lo < n; lo += 2 * w) {
      if (n - lo >= 2 * w) {
        parity_merge64(src + lo, isrc + lo, w, dst + lo, idst + lo);
      } else if (n - lo > w) {
        merge64(src + lo, isrc + lo, w, src + lo + w, isrc + lo + w, n - lo - w, dst + lo,
                idst + lo);
      } else {
        memcpy(dst + lo, src + lo, (size_t)(n - lo) * sizeof *dst);
        memcpy(idst + lo, isrc + lo, (size_t)(n - lo) * sizeof *idst);
      }
    }
    swap_buffers(&src, &dst, &isrc, &idst);
  }
  land_in(a, ia, src, isrc, n);
}

/* Pool adjacent violators on v_k = z_k - a (2k - n - 1), k = 1..n, z the sorted
 * row (float32 keys, or float64 values when zd is set). Blocks go on the stack
 * (sums, sizes); returns the index of its top. Both element types run the
 * same float64 operations in the same order, so the fit does not depend on
 * how z is stored. */
#define PAVA_LOOP(ZVAL)                                                       \
  for (Py_ssize_t i = 0; i < n; i++) {                                        \
    double v = (ZVAL) - a * (double)(2 * (i + 1) - n - 1);                    \
    double sum = v;                                                           \
    uint32_t c = 1;                                                           \
    /* Merge while the previous block's mean exceeds this one's:              \
     * sums[top]/sizes[top] > sum/c, compared without division. */           \
    while (top >= 0 && sums[top] * (double)c > sum * (double)sizes[top]) {    \
      sum += sums[top];                                                       \
      c += sizes[top];                                                        \
      top--;                                                                  \
    }                                                                         \
    top++;                                                                    \
    sums[top] = sum;                                                          \
    sizes[top] = c;                                                           \
  }

static Py_ssize_t pava(const uint64_t *keys, const double *zd, Py_ssize_t n,
                       double a, double *sums, uint32_t *sizes) {
  Py_ssize_t top = -1;
  if (zd)
    PAVA_LOOP(zd[i])
  else
    PAVA_LOOP((double)key_float((uint32_t)(keys[i] >> 32)))
  return top;
}

/* Mean of the sorted row, compensated (Neumaier): float64 rows keep float64
 * accuracy. Same element types as pava. */
static double mean(const uint64_t *keys, const double *zd, Py_ssize_t n) {
  double s = 0.0, c = 0.0;
  for (Py_ssize_t i = 0; i < n; i++) {
    double z = zd ? zd[i] : (double)key_float((uint32_t)(keys[i] >> 32));
    double t = s + z;
    c += fabs(s) >= fabs(z) ? (s - t) + z : (z - t) + s;
    s = t;
  }
  return (s + c) / (double)n;
}

/* Scratch per element: float32 rows use 20 bytes (two sort buffers of
 * key << 32 | index, then block sizes); float64 rows 28 (keys and tmp of 8
 * bytes, indices and their tmp of 4, block sizes). Once a row is sorted, the
 * buffer the sort no longer needs holds the block sums. */
typedef struct {
  char *base;
  Py_ssize_t n;
} Scratch;

static size_t scratch_bytes(Py_ssize_t n, int wide) { return (size_t)n * (wide ? 28 : 20); }

static void fill32(float *out, Py_ssize_t n, float v) {
  for (Py_ssize_t i = 0; i < n; i++) out[i] = v;
}

static void fill64(double *out, Py_ssize_t n, double v) {
  for (Py_ssize_t i = 0; i < n; i++) out[i] = v;
}

/* Prox of one float32 row (see the contract at the top of this file). */
static void prox_row32(const float *x, double t, Py_ssize_t n, float *out, Scratch *s) {
  if (!(t >= 0.0)) {
    fill32(out, n, NAN);
    return;
  }
  if (t == 0.0 || n == 1) {
    memcpy(out, x, (size_t)n * sizeof *x);
    return;
  }
  uint64_t *b0 = (uint64_t *)s->base, *b1 = b0 + n;
  uint32_t *sizes = (uint32_t *)(b1 + n);
  const uint64_t *keys;
  if (n <= SHORT_ROW32) {
    keys = short_sort32(x, n, b0, b1);
  } else {
    uint32_t count[3][BUCKETS];
    histograms32(x, n, count);
    if (!all_finite32(count)) {
      fill32(out, n, NAN);
      return;
    }
    keys = long_sort32(x, n, count, b0, b1);
  }
  double *sums = (double *)(keys == b0 ? b1 : b0);
  const double lo = key_float((uint32_t)(keys[0] >> 32)), hi = key_float((uint32_t)(keys[n - 1] >> 32));
  /* Non-finite keys sort to the ends (see float_key); the long path has told
   * them already, from the histograms. */
  if (!isfinite(lo) || !isfinite(hi)) {
    fill32(out, n, NAN);
    return;
  }
  /* All equal: the row itself (n * z / n need not round back to z). */
  if (hi == lo) {
    memcpy(out, x, (size_t)n * sizeof *x);
    return;
  }
  /* One cluster once t >= (max - min)(n - 1)/n; testing t >= max - min leaves
   * a margin of 1/n, far above the rounding of the difference. */
  if (t >= hi - lo) {
    fill32(out, n, (float)mean(keys, NULL, n));
    return;
  }
  /* Here t < max - min, so the ramp is no larger than the data and v keeps z. */
  Py_ssize_t top = pava(keys, NULL, n, t / (double)(n - 1), sums, sizes);
  Py_ssize_t i = 0;
  if (n > SCATTER_PREFETCH_ROW) {
    const Py_ssize_t last = n - 1;
    for (Py_ssize_t b = 0; b <= top; b++) {
      const float m = (float)(sums[b] / (double)sizes[b]);
      for (Py_ssize_t e = i + sizes[b]; i < e; i++) {
        PREFETCH_W(out + (uint32_t)keys[i + SCATTER_AHEAD < last ? i + SCATTER_AHEAD : last]);
        out[(uint32_t)keys[i]] = m;
      }
    }
    return;
  }
  for (Py_ssize_t b = 0; b <= top; b++) {
    const float m = (float)(sums[b] / (double)sizes[b]);
    for (Py_ssize_t e = i + sizes[b]; i < e; i++) out[(uint32_t)keys[i]] = m;
  }
}

/* Prox of one float64 row. */
static void prox_row64(const double *x, double t, Py_ssize_t n, double *out, Scratch *s) {
  if (!(t >= 0.0)) {
    fill64(out, n, NAN);
    return;
  }
  if (t == 0.0 || n == 1) {
    memcpy(out, x, (size_t)n * sizeof *x);
    return;
  }
  uint64_t *keys = (uint64_t *)s->base, *tmp = keys + n;
  uint32_t *idx = (uint32_t *)(tmp + n), *itmp = idx + n, *sizes = itmp + n;
  for (Py_ssize_t i = 0; i < n; i++) {
    keys[i] = double_key(x[i]);
    idx[i] = (uint32_t)i;
  }
  if (n <= SHORT_ROW64)
    short_sort64(keys, idx, tmp, itmp, n);
  else
    radix_sort_wide(keys, idx, tmp, itmp, n);
  double *z = (double *)tmp, *sums = (double *)keys;
  for (Py_ssize_t i = 0; i < n; i++) z[i] = key_double(keys[i]);
  if (!isfinite(z[0]) || !isfinite(z[n - 1])) {
    fill64(out, n, NAN);
    return;
  }
  if (z[n - 1] == z[0]) {
    memcpy(out, x, (size_t)n * sizeof *x);
    return;
  }
  if (t >= z[n - 1] - z[0]) {
    fill64(out, n, mean(NULL, z, n));
    return;
  }
  Py_ssize_t top = pava(NULL, z, n, t / (double)(n - 1), sums, sizes);
  Py_ssize_t i = 0;
  for (Py_ssize_t b = 0; b <= top; b++) {
    const double m = sums[b] / (double)sizes[b];
    for (Py_ssize_t e = i + sizes[b]; i < e; i++) out[idx[i]] = m;
  }
}

static PyObject *prox_rows(PyObject *self, PyObject *args) {
  Py_buffer xb, tb, ob;
  Py_ssize_t d;
  int wide = 0;
  if (!PyArg_ParseTuple(args, "y*y*nw*|p", &xb, &tb, &d, &ob, &wide)) return NULL;
  PyObject *result = NULL;
  const Py_ssize_t item = wide ? (Py_ssize_t)sizeof(double) : (Py_ssize_t)sizeof(float);
  Py_ssize_t rows = d > 0 ? xb.len / (d * item) : 0;
  if (d <= 0 || d > (Py_ssize_t)UINT32_MAX || xb.len != rows * d * item ||
      ob.len != xb.len || tb.len != rows * (Py_ssize_t)sizeof(double)) {
    PyErr_SetString(PyExc_ValueError, "prox_rows: buffer sizes do not match d");
    goto done;
  }
  size_t bytes;
  Scratch s = {scratch_take(scratch_bytes(d, wide), &bytes), d};
  if (!s.base) {
    PyErr_NoMemory();
  } else {
    const char *x = xb.buf;
    const double *t = tb.buf;
    char *out = ob.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
      if (wide)
        prox_row64((const double *)(x + r * d * item), t[r], d, (double *)(out + r * d * item), &s);
      else
        prox_row32((const float *)(x + r * d * item), t[r], d, (float *)(out + r * d * item), &s);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
  }
  scratch_give_back(s.base, bytes);
done:
  PyBuffer_Release(&xb);
  PyBuffer_Release(&tb);
  PyBuffer_Release(&ob);
  return result;
}

/* argsort(x, perm, wide=False): the stable order of x's float keys (float32,
 * float64 when `wide`) into perm (uint32), with the kernel's own sort. Key
 * order is float order, with -0.0 before +0.0 and NaNs beyond the infinities
 * on the side of their sign bit. For tests and benchmarks. */
static PyObject *argsort(PyObject *self, PyObject *args) {
  Py_buffer xb, pb;
  int wide = 0;
  if (!PyArg_ParseTuple(args, "y*w*|p", &xb, &pb, &wide)) return NULL;
  PyObject *result = NULL;
  const Py_ssize_t item = wide ? (Py_ssize_t)sizeof(double) : (Py_ssize_t)sizeof(float);
  const Py_ssize_t n = xb.len / item;
  if (xb.len != n * item || pb.len != n * (Py_ssize_t)sizeof(uint32_t) ||
      n > (Py_ssize_t)UINT32_MAX) {
    PyErr_SetString(PyExc_ValueError, "argsort: buffer sizes do not match");
    goto done;
  }
  if (n == 0) {
    result = Py_None;
    Py_INCREF(result);
    goto done;
  }
  char *base = scratch_alloc(scratch_bytes(n, wide));
  if (!base) {
    PyErr_NoMemory();
    goto done;
  }
  uint32_t *perm = pb.buf;
  Py_BEGIN_ALLOW_THREADS
  if (wide) {
    uint64_t *keys = (uint64_t *)base, *tmp = keys + n;
    uint32_t *idx = (uint32_t *)(tmp + n), *itmp = idx + n;
    const double *x = xb.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
      keys[i] = double_key(x[i]);
      idx[i] = (uint32_t)i;
    }
    if (n <= SHORT_ROW64)
      short_sort64(keys, idx, tmp, itmp, n);
    else
      radix_sort_wide(keys, idx, tmp, itmp, n);
    memcpy(perm, idx, (size_t)n * sizeof *perm);
  } else {
    uint64_t *b0 = (uint64_t *)base;
    const uint64_t *keys;
    if (n <= SHORT_ROW32) {
      keys = short_sort32(xb.buf, n, b0, b0 + n);
    } else {
      uint32_t count[3][BUCKETS];
      histograms32(xb.buf, n, count);
      keys = long_sort32(xb.buf, n, count, b0, b0 + n);
    }
    for (Py_ssize_t i = 0; i < n; i++) perm[i] = (uint32_t)keys[i];
  }
  Py_END_ALLOW_THREADS
  free(base);
  result = Py_None;
  Py_INCREF(result);
done:
  PyBuffer_Release(&xb);
  PyBuffer_Release(&pb);
  return result;
}

static PyMethodDef methods[] = {
    {"prox_rows", prox_rows, METH_VARARGS,
     "prox_rows(x, t, d, out, wide=False): prox of t[r]*R on each row of x "
     "(float32, or float64 when wide), into out."},
    {"argsort", argsort, METH_VARARGS,
     "argsort(x, perm, wide=False): stable order of the float keys of x "
     "(float32, or float64 when wide) into perm (uint32)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hostprox",
                                    "Host kernel of the weight-sharing prox.", -1,
                                    methods};

PyMODINIT_FUNC PyInit_hostprox(void) { return PyModule_Create(&module); }
