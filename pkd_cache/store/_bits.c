/* pkd_cache.store._bits: bit-level loops numpy does slowly: whether a buffer of floats holds inf or NaN (one
 * read-only pass over its bits), and packing the bit streams of coded token targets (`pack_codes`, below).
 *
 * The reader checks every chunk it decodes (store/trust.py, `non_finite`). numpy needs two max passes for that
 * (the positive and the negative non-finite values sit at the tops of the two halves of any integer view); this
 * needs one: clear the sign bit, then a signed max, which reaches the all-ones exponent exactly when some value is
 * inf or NaN. Compiled with -O3 the loop vectorises; on x86-64 Linux it is also built for AVX2 and picked at load
 * time. The build is optional (setup.py): without a compiler, trust.py falls back to the numpy passes, which give
 * the same answers (tests/test_tampered_stores.py compares both on every special value).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PKD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PKD_CLONES
#endif

/* values per block: a block is reduced to one max, then tested, so a non-finite value stops the scan early */
#define BLOCK 16384

#define DEFINE_SCAN(NAME, UINT, INT, ABS_MASK, INF_BITS)                                        \
    PKD_CLONES static int NAME(const char *p, Py_ssize_t n) {                                     \
        Py_ssize_t i = 0;                                                                         \
        while (i < n) {                                                                           \
            Py_ssize_t end = n - i > BLOCK ? i + BLOCK : n;                                       \
            INT m = 0;                                                                            \
            for (; i < end; i++) {                                                                \
                UINT u;                                                                           \
                memcpy(&u, p + i * (Py_ssize_t)sizeof(UINT), sizeof(UINT));                       \
                INT v = (INT)(u & (UINT)(ABS_MASK));                                              \
                m = v > m ? v : m;                                                                \
            }                                                                                     \
            if (m >= (INT)(INF_BITS)) return 1;                                                   \
        }                                                                                         \
        return 0;                                                                                 \
    }

DEFINE_SCAN(scan16, uint16_t, int16_t, 0x7FFFu, 0x7C00)
DEFINE_SCAN(scan32, uint32_t, int32_t, 0x7FFFFFFFu, 0x7F800000)
DEFINE_SCAN(scan64, uint64_t, int64_t, 0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ll)

static PyObject *non_finite(PyObject *self, PyObject *args) {
    Py_buffer view;
    int itemsize, found;
    if (!PyArg_ParseTuple(args, "y*i", &view, &itemsize)) return NULL;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "itemsize must be 2, 4 or 8");
        return NULL;
    }
    Py_ssize_t n = view.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
    found = itemsize == 2 ? scan16(view.buf, n) : itemsize == 4 ? scan32(view.buf, n) : scan64(view.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

/* pack_codes: the bit streams of store/sparse_codec.py in one pass. A stream there is the unary codes of one array
 * of values, then the binary codes of another (widths per value), MSB first, cut into bytes, the last zero-padded:
 * np.packbits(np.concatenate([_unary_bits(unary), _to_bits(values, widths)])), which takes a numpy pass per bit
 * plane. The numpy version stays the definition and the fallback (tests/test_native.py compares both). */
typedef struct {
    unsigned char *out;
    Py_ssize_t pos; /* bytes written */
    uint64_t acc;   /* pending bits, in the low `held` bits */
    int held;
} BitWriter;

static inline void put_bits(BitWriter *w, uint64_t value, int width) { /* width <= 56 */
    w->acc = (w->acc << width) | (value & ((((uint64_t)1) << width) - 1)); /* at most 7 + 56 bits held */
    w->held += width;
    while (w->held >= 8) {
        w->held -= 8;
        w->out[w->pos++] = (unsigned char)(w->acc >> w->held);
    }
}

static PyObject *pack_codes(PyObject *self, PyObject *args) {
    Py_buffer ub, vb, wb;
    if (!PyArg_ParseTuple(args, "y*y*y*", &ub, &vb, &wb)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t nu = ub.len / 8, nv = vb.len / 8;
    const int64_t *unary = ub.buf, *values = vb.buf, *widths = wb.buf;
    uint64_t bits = 0;
    if (ub.len % 8 || vb.len % 8 || wb.len != vb.len) {
        PyErr_SetString(PyExc_ValueError, "pack_codes: int64 arrays expected, values and widths of one length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < nu; i++) {
        if (unary[i] < 0 || unary[i] > ((int64_t)1 << 40)) {
            PyErr_SetString(PyExc_ValueError, "pack_codes: a unary value outside [0, 2^40]");
            goto done;
        }
        bits += (uint64_t)unary[i] + 1;
    }
    for (Py_ssize_t i = 0; i < nv; i++) {
        if (widths[i] < 0 || widths[i] > 62) {
            PyErr_SetString(PyExc_ValueError, "pack_codes: a width outside [0, 62]");
            goto done;
        }
        bits += (uint64_t)widths[i];
    }
    if (bits > ((uint64_t)1 << 46)) {
        PyErr_SetString(PyExc_ValueError, "pack_codes: more than 2^46 bits");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((bits + 7) / 8));
    if (result == NULL) goto done;
    BitWriter w = {(unsigned char *)PyBytes_AS_STRING(result), 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nu; i++) {
        int64_t ones = unary[i];
        while (ones > 48) put_bits(&w, ~(uint64_t)0, 48), ones -= 48;
        put_bits(&w, ((((uint64_t)1) << ones) - 1) << 1, (int)ones + 1); /* ones 1 bits, then a 0 */
    }
    for (Py_ssize_t i = 0; i < nv; i++) {
        int width = (int)widths[i];
        if (width > 48) put_bits(&w, (uint64_t)values[i] >> 32, width - 32), width = 32;
        put_bits(&w, (uint64_t)values[i], width);
    }
    if (w.held) w.out[w.pos++] = (unsigned char)(w.acc << (8 - w.held));
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&ub), PyBuffer_Release(&vb), PyBuffer_Release(&wb);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_codes", pack_codes, METH_VARARGS,
     "pack_codes(unary, values, widths) -> bytes: the unary codes of int64 unary [n], then int64 values [m] in "
     "int64 widths [m] bits each, MSB first, packed into bytes (the last one zero-padded)"},
    {"non_finite", non_finite, METH_VARARGS,
     "non_finite(buffer, itemsize) -> bool: whether the C-contiguous floats of that size in buffer hold inf or "
     "NaN (itemsize 2, 4 or 8: IEEE half, single, double)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bits", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bits(void) { return PyModule_Create(&module); }
