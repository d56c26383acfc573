/* Host kernel of the weight-sharing prox: one pass per row of
 *   key build -> LSD radix sort -> pool adjacent violators (float64) -> scatter.
 *
 * prox_rows(x, t, d, out): x is a float32 buffer of rows*d values, t a float64
 * buffer of rows steps, out a writable float32 buffer like x. Row r of out is
 * the prox of t[r] * R on row r of x (see isotonic.py for the mathematics).
 * The GIL is released while it runs. Plain C99 and the Python buffer protocol,
 * so it builds with any C compiler and needs no NumPy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

/* Order-preserving map of float bits to unsigned: negatives flip every bit,
 * the rest flip the sign bit. */
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

/* Prox of one row. keys/tmp: n uint64; sums: n doubles; sizes: n Py_ssize_t. */
static void prox_row(const float *x, double t, Py_ssize_t n, float *out,
                     uint64_t *keys, uint64_t *tmp, double *sums,
                     Py_ssize_t *sizes) {
  if (n == 1) {
    out[0] = x[0];
    return;
  }
  for (Py_ssize_t i = 0; i < n; i++)
    keys[i] = ((uint64_t)float_key(x[i]) << 32) | (uint64_t)i;
  radix_sort(keys, tmp, n);
  /* Pool adjacent violators on v_k = z_k - a (2k - n - 1), k = 1..n. */
  const double a = t / (double)(n - 1);
  Py_ssize_t top = -1;
  for (Py_ssize_t i = 0; i < n; i++) {
    double v = (double)key_float((uint32_t)(keys[i] >> 32)) -
               a * (double)(2 * (i + 1) - n - 1);
    double s = v;
    Py_ssize_t c = 1;
    /* Merge while the previous block's mean exceeds this one's:
     * sums[top]/sizes[top] > s/c, compared without division. */
    while (top >= 0 && sums[top] * (double)c > s * (double)sizes[top]) {
      s += sums[top];
      c += sizes[top];
      top--;
    }
    top++;
    sums[top] = s;
    sizes[top] = c;
  }
  Py_ssize_t i = 0;
  for (Py_ssize_t b = 0; b <= top; b++) {
    float m = (float)(sums[b] / (double)sizes[b]);
    for (Py_ssize_t e = i + sizes[b]; i < e; i++)
      out[(uint32_t)keys[i]] = m;
  }
}

static PyObject *prox_rows(PyObject *self, PyObject *args) {
  Py_buffer xb, tb, ob;
  Py_ssize_t d;
  if (!PyArg_ParseTuple(args, "y*y*nw*", &xb, &tb, &d, &ob)) return NULL;
  PyObject *result = NULL;
  Py_ssize_t rows = d > 0 ? xb.len / (Py_ssize_t)(d * sizeof(float)) : 0;
  if (d <= 0 || d > (Py_ssize_t)UINT32_MAX || xb.len != rows * d * (Py_ssize_t)sizeof(float) ||
      ob.len != xb.len || tb.len != rows * (Py_ssize_t)sizeof(double)) {
    PyErr_SetString(PyExc_ValueError, "prox_rows: buffer sizes do not match d");
    goto done;
  }
  /* One block: keys, tmp (uint64), sums (double), sizes (Py_ssize_t). */
  char *block = scratch_alloc((size_t)d * 32);
  uint64_t *keys = (uint64_t *)block;
  uint64_t *tmp = keys + d;
  double *sums = (double *)(tmp + d);
  Py_ssize_t *sizes = (Py_ssize_t *)(sums + d);
  if (!block) {
    PyErr_NoMemory();
  } else {
    const float *x = xb.buf;
    const double *t = tb.buf;
    float *out = ob.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++)
      prox_row(x + r * d, t[r], d, out + r * d, keys, tmp, sums, sizes);
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
     "prox_rows(x, t, d, out): prox of t[r]*R on each row of x (float32), into out."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostprox",
                                    "Host kernel of the weight-sharing prox.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__hostprox(void) { return PyModule_Create(&module); }
