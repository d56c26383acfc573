/* Host kernel of the weight-sharing prox: one pass per row of
 *   key build -> LSD radix sort -> pool adjacent violators (float64) -> scatter.
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

/* Stable LSD radix sort of (key << 32 | index) by the key: 4 passes of 8 bits
 * (256 buckets keep the scatter's write streams in cache). */
static void radix_sort(uint64_t *a, uint64_t *tmp, Py_ssize_t n) {
  size_t count[4][256];
  memset(count, 0, sizeof count);
  for (Py_ssize_t i = 0; i < n; i++) {
    uint32_t k = (uint32_t)(a[i] >> 32);
    count[0][k & 255]++;
    count[1][(k >> 8) & 255]++;
    count[2][(k >> 16) & 255]++;
    count[3][k >> 24]++;
  }
  uint64_t *src = a, *dst = tmp;
  for (int p = 0; p < 4; p++) {
    const int shift = 32 + 8 * p;
    size_t sum = 0;
    int single = 0;
    for (int b = 0; b < 256; b++) {
      size_t c = count[p][b];
      if (c == (size_t)n) single = 1;
      count[p][b] = sum;
      sum += c;
    }
    if (single) continue; /* every key has this digit: the pass would copy */
    for (Py_ssize_t i = 0; i < n; i++) {
      uint64_t k = src[i];
      dst[count[p][(k >> shift) & 255]++] = k;
    }
    uint64_t *s = src;
    src = dst;
    dst = s;
  }
  if (src != a) memcpy(a, src, (size_t)n * sizeof *a);
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
    uint64_t *s = src;
    src = dst;
    dst = s;
    uint32_t *is = isrc;
    isrc = idst;
    idst = is;
  }
  if (src != a) {
    memcpy(a, src, (size_t)n * sizeof *a);
    memcpy(ia, isrc, (size_t)n * sizeof *ia);
  }
}

/* Scratch of 32 bytes per element: once a row is sorted and decoded, the sort
 * buffers hold the sorted row (z over tmp) and the block stack (sums over keys). */
typedef struct {
  uint64_t *keys, *tmp; /* radix sort */
  uint32_t *idx, *itmp; /* indices (itmp: wide rows' sort only) */
  double *z;            /* the sorted row, over tmp */
  double *sums;         /* the block stack of pool adjacent violators, over keys */
  Py_ssize_t *sizes;
} Scratch;

/* Sorts row x (float32 or float64) into s->z, its indices into s->idx. */
static void sort_row(const void *x, int wide, Py_ssize_t n, Scratch *s) {
  if (wide) {
    const double *xd = x;
    for (Py_ssize_t i = 0; i < n; i++) {
      s->keys[i] = double_key(xd[i]);
      s->idx[i] = (uint32_t)i;
    }
    radix_sort_wide(s->keys, s->idx, s->tmp, s->itmp, n);
    for (Py_ssize_t i = 0; i < n; i++) s->z[i] = key_double(s->keys[i]);
  } else {
    const float *xf = x;
    for (Py_ssize_t i = 0; i < n; i++)
      s->keys[i] = ((uint64_t)float_key(xf[i]) << 32) | (uint64_t)i;
    radix_sort(s->keys, s->tmp, n);
    for (Py_ssize_t i = 0; i < n; i++) {
      s->z[i] = (double)key_float((uint32_t)(s->keys[i] >> 32));
      s->idx[i] = (uint32_t)s->keys[i];
    }
  }
}

static inline void put(void *out, int wide, Py_ssize_t i, double v) {
  if (wide)
    ((double *)out)[i] = v;
  else
    ((float *)out)[i] = (float)v;
}

static void fill(void *out, int wide, Py_ssize_t n, double v) {
  for (Py_ssize_t i = 0; i < n; i++) put(out, wide, i, v);
}

/* Mean of z[0..n), compensated (Neumaier): float64 rows keep float64 accuracy. */
static double mean(const double *z, Py_ssize_t n) {
  double s = 0.0, c = 0.0;
  for (Py_ssize_t i = 0; i < n; i++) {
    double t = s + z[i];
    c += fabs(s) >= fabs(z[i]) ? (s - t) + z[i] : (z[i] - t) + s;
    s = t;
  }
  return (s + c) / (double)n;
}

/* Prox of one row (see the contract at the top of this file). */
static void prox_row(const void *x, int wide, double t, Py_ssize_t n,
                     void *out, Scratch *s) {
  const size_t item = wide ? sizeof(double) : sizeof(float);
  if (!(t >= 0.0)) {
    fill(out, wide, n, NAN);
    return;
  }
  if (t == 0.0 || n == 1) {
    memcpy(out, x, (size_t)n * item);
    return;
  }
  sort_row(x, wide, n, s);
  const double *z = s->z;
  if (!isfinite(z[0]) || !isfinite(z[n - 1])) {
    fill(out, wide, n, NAN);
    return;
  }
  /* All equal: the row itself (n * z / n need not round back to z). */
  if (z[n - 1] == z[0]) {
    memcpy(out, x, (size_t)n * item);
    return;
  }
  /* One cluster once t >= (max - min)(n - 1)/n; testing t >= max - min leaves
   * a margin of 1/n, far above the rounding of the difference. */
  if (t >= z[n - 1] - z[0]) {
    fill(out, wide, n, mean(z, n));
    return;
  }
  /* Pool adjacent violators on v_k = z_k - a (2k - n - 1), k = 1..n. Here
   * t < max - min, so the ramp is no larger than the data and v keeps z. */
  const double a = t / (double)(n - 1);
  double *sums = s->sums;
  Py_ssize_t *sizes = s->sizes;
  Py_ssize_t top = -1;
  for (Py_ssize_t i = 0; i < n; i++) {
    double v = z[i] - a * (double)(2 * (i + 1) - n - 1);
    double sum = v;
    Py_ssize_t c = 1;
    /* Merge while the previous block's mean exceeds this one's:
     * sums[top]/sizes[top] > sum/c, compared without division. */
    while (top >= 0 && sums[top] * (double)c > sum * (double)sizes[top]) {
      sum += sums[top];
      c += sizes[top];
      top--;
    }
    top++;
    sums[top] = sum;
    sizes[top] = c;
  }
  Py_ssize_t i = 0;
  for (Py_ssize_t b = 0; b <= top; b++) {
    double m = sums[b] / (double)sizes[b];
    for (Py_ssize_t e = i + sizes[b]; i < e; i++) put(out, wide, s->idx[i], m);
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
  /* One block: keys, tmp (uint64), sizes (Py_ssize_t), idx, itmp (uint32). */
  char *block = scratch_alloc((size_t)d * 32);
  if (!block) {
    PyErr_NoMemory();
  } else {
    Scratch s;
    s.keys = (uint64_t *)block;
    s.tmp = s.keys + d;
    s.z = (double *)s.tmp;
    s.sums = (double *)s.keys;
    s.sizes = (Py_ssize_t *)(s.tmp + d);
    s.idx = (uint32_t *)(s.sizes + d);
    s.itmp = s.idx + d;
    const char *x = xb.buf;
    const double *t = tb.buf;
    char *out = ob.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++)
      prox_row(x + r * d * item, wide, t[r], d, out + r * d * item, &s);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
  }
  free(block);
done:
  PyBuffer_Release(&xb);
  PyBuffer_Release(&tb);
  PyBuffer_Release(&ob);
  return result;
}

static PyMethodDef methods[] = {
    {"prox_rows", prox_rows, METH_VARARGS,
     "prox_rows(x, t, d, out, wide=False): prox of t[r]*R on each row of x "
     "(float32, or float64 when wide), into out."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "hostprox",
                                    "Host kernel of the weight-sharing prox.", -1,
                                    methods};

PyMODINIT_FUNC PyInit_hostprox(void) { return PyModule_Create(&module); }
