/* module.c — the only Python-aware file: argument checks, GIL release, status -> exception.
 *
 * Every entry point checks type (numpy.ndarray), dtype, byte order, alignment, C-contiguity, rank,
 * shape, emptiness, bits and the finiteness/positivity of scales *before* any kernel runs, and
 * names the offending argument in the message (TypeError for the wrong kind or dtype, ValueError
 * for everything else). Kernels run with the GIL released and report problems as sasq_status.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <numpy/arrayobject.h>

#include "sasq.h"

/* ---------------------------------------------------------------- checks */

static PyArrayObject *check_array(PyObject *o, const char *name, int type, const char *tname,
                                  int min_ndim) {
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of %s, got %.100s", name, tname,
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != type) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %S", name, tname,
                     (PyObject *)PyArray_DESCR(a));
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned and in native byte order", name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (use numpy.ascontiguousarray)", name);
        return NULL;
    }
    if (PyArray_NDIM(a) < min_ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have at least %d dimension(s), got %d", name,
                     min_ndim, PyArray_NDIM(a));
        return NULL;
    }
    if (PyArray_SIZE(a) == 0) {
        PyErr_Format(PyExc_ValueError, "%s is empty (shape with a zero)", name);
        return NULL;
    }
    return a;
}

static int check_bits(int bits) {
    if (bits < 2 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits must be in [2, 8], got %d", bits);
        return -1;
    }
    return 0;
}

/* A per-tensor (length 1) or per-channel (length cols) float32 vector of finite values > 0.
 * Returns the stride (0 or 1) or -1 with an exception set. */
static int64_t check_scale(PyObject *o, const char *name, int64_t cols, const float **ptr) {
    PyArrayObject *s = check_array(o, name, NPY_FLOAT32, "float32", 1);
    if (!s) return -1;
    int64_t n = PyArray_SIZE(s);
    if (PyArray_NDIM(s) != 1 || (n != 1 && n != cols)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a scalar or a 1-D array of length %lld (the last axis), got %lld "
                     "values", name, (long long)cols, (long long)n);
        return -1;
    }
    const float *p = PyArray_DATA(s);
    for (int64_t i = 0; i < n; i++) {
        if (!(isfinite(p[i]) && p[i] > 0.0f)) {
            char v[40];
            snprintf(v, sizeof v, "%.9g", (double)p[i]);
            PyErr_Format(PyExc_ValueError, "%s must be finite and > 0, got %s at index %lld", name,
                         v, (long long)i);
            return -1;
        }
    }
    *ptr = p;
    return n == 1 ? 0 : 1;
}

/* s * top finite in float32 for each of the n values (top: qmax of the grid, or 128 for any int8
 * code), so the grid's ends and every dequantized value are representable (sasq_grid_top_ok). */
static int check_grid_top(const float *s, int64_t n, int top, const char *name, const char *what) {
    for (int64_t i = 0; i < n; i++) {
        if (!sasq_grid_top_ok(s[i], (float)top)) {
            char v[100]; /* PyErr_Format has no %g */
            snprintf(v, sizeof v, "%.9g at index %lld; the largest allowed is %.9g", (double)s[i],
                     (long long)i, (double)(FLT_MAX / top));
            PyErr_Format(PyExc_ValueError, "%s * %s overflows float32 (%s %s)", name, what, name, v);
            return -1;
        }
    }
    return 0;
}

static int check_grid(const float *s, int64_t stride, int64_t cols, int bits, const char *name) {
    return check_grid_top(s, stride ? cols : 1, sasq_qmax(bits), name, "qmax");
}

static int raise_status(sasq_status st, const char *what) {
    switch (st) {
    case SASQ_OK: return 0;
    case SASQ_ERR_NONFINITE:
        PyErr_Format(PyExc_ValueError, "%s: x contains NaN or inf (quantizing to int8 requires "
                     "finite values)", what);
        return -1;
    case SASQ_ERR_NOMEM: PyErr_NoMemory(); return -1;
    case SASQ_ERR_ARG:
        PyErr_Format(PyExc_ValueError, "%s: invalid arguments (a scale that overflows float32?)",
                     what);
        return -1;
    default: PyErr_Format(PyExc_ValueError, "%s: invalid arguments", what); return -1;
    }
}

static PyArrayObject *new_like(PyArrayObject *x, int type) {
    return (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), type);
}

static int64_t last_dim(PyArrayObject *x) { return PyArray_DIMS(x)[PyArray_NDIM(x) - 1]; }

/* ---------------------------------------------------------------- quantization */

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    PyObject *xo, *so;
    int bits;
    if (!PyArg_ParseTuple(args, "OOi:quantize", &xo, &so, &bits)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x || check_bits(bits)) return NULL;
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols;
    const float *s;
    int64_t ss = check_scale(so, "scale", cols, &s); /* no grid rule: x / s = inf only saturates */
    if (ss < 0) return NULL;
    PyArrayObject *q = new_like(x, NPY_INT8);
    if (!q) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_quantize(PyArray_DATA(x), s, ss, rows, cols, bits, PyArray_DATA(q));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "quantize")) { Py_DECREF(q); return NULL; }
    return (PyObject *)q;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    PyObject *qo, *so;
    if (!PyArg_ParseTuple(args, "OO:dequantize", &qo, &so)) return NULL;
    PyArrayObject *q = check_array(qo, "q", NPY_INT8, "int8", 1);
    if (!q) return NULL;
    int64_t cols = last_dim(q), rows = PyArray_SIZE(q) / cols;
    const float *s;
    int64_t ss = check_scale(so, "scale", cols, &s);
    if (ss < 0 || check_grid_top(s, ss ? cols : 1, 128, "scale", "128")) return NULL;
    PyArrayObject *x = new_like(q, NPY_FLOAT32);
    if (!x) return NULL;
    Py_BEGIN_ALLOW_THREADS
    sasq_dequantize(PyArray_DATA(q), s, ss, rows, cols, PyArray_DATA(x));
    Py_END_ALLOW_THREADS
    return (PyObject *)x;
}

static PyObject *py_fake_quant(PyObject *self, PyObject *args) {
    PyObject *xo, *so;
    int bits;
    if (!PyArg_ParseTuple(args, "OOi:fake_quant", &xo, &so, &bits)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x || check_bits(bits)) return NULL;
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols;
    const float *s;
    int64_t ss = check_scale(so, "scale", cols, &s);
    if (ss < 0 || check_grid(s, ss, cols, bits, "scale")) return NULL;
    PyArrayObject *y = new_like(x, NPY_FLOAT32);
    if (!y) return NULL;
    Py_BEGIN_ALLOW_THREADS
    sasq_fake_quant(PyArray_DATA(x), s, ss, rows, cols, bits, PyArray_DATA(y));
    Py_END_ALLOW_THREADS
    return (PyObject *)y;
}

static int same_shape(PyArrayObject *a, PyArrayObject *b, const char *an, const char *bn) {
    if (PyArray_NDIM(a) != PyArray_NDIM(b) ||
        !PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(b), PyArray_NDIM(a))) {
        PyErr_Format(PyExc_ValueError, "%s must have the shape of %s", bn, an);
        return -1;
    }
    return 0;
}

static PyObject *py_fake_quant_backward(PyObject *self, PyObject *args) {
    PyObject *xo, *so, *go;
    int bits;
    double gsf;
    if (!PyArg_ParseTuple(args, "OOOid:fake_quant_backward", &xo, &so, &go, &bits, &gsf)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x || check_bits(bits)) return NULL;
    PyArrayObject *g = check_array(go, "grad_out", NPY_FLOAT32, "float32", 1);
    if (!g || same_shape(x, g, "x", "grad_out")) return NULL;
    if (!isfinite(gsf)) {
        PyErr_SetString(PyExc_ValueError, "grad_scale_factor must be finite");
        return NULL;
    }
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols;
    const float *s;
    int64_t ss = check_scale(so, "scale", cols, &s);
    if (ss < 0 || check_grid(s, ss, cols, bits, "scale")) return NULL;
    npy_intp ns = ss ? cols : 1;
    PyArrayObject *gx = new_like(x, NPY_FLOAT32);
    PyArrayObject *gs = (PyArrayObject *)PyArray_SimpleNew(1, &ns, NPY_FLOAT32);
    if (!gx || !gs) { Py_XDECREF(gx); Py_XDECREF(gs); return NULL; }
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_fake_quant_backward(PyArray_DATA(x), s, ss, PyArray_DATA(g), rows, cols, bits, gsf,
                                  PyArray_DATA(gx), PyArray_DATA(gs));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "fake_quant_backward")) { Py_DECREF(gx); Py_DECREF(gs); return NULL; }
    return Py_BuildValue("(NN)", gx, gs);
}

/* ---------------------------------------------------------------- truncation */

/* threshold and ceiling: each length 1 or cols, finite, 0 < t < c for every channel. */
static int check_knee(PyObject *to, PyObject *co, int64_t cols, const float **t, int64_t *ts,
                      const float **c, int64_t *cs) {
    if ((*ts = check_scale(to, "threshold", cols, t)) < 0) return -1;
    if ((*cs = check_scale(co, "ceiling", cols, c)) < 0) return -1;
    int64_t n = (*ts || *cs) ? cols : 1;
    for (int64_t j = 0; j < n; j++) {
        float tv = (*t)[j * *ts], cv = (*c)[j * *cs];
        if (!(tv < cv)) {
            char v[80];
            snprintf(v, sizeof v, "threshold %.9g >= ceiling %.9g", (double)tv, (double)cv);
            PyErr_Format(PyExc_ValueError, "threshold must be < ceiling, got %s at channel %lld",
                         v, (long long)j);
            return -1;
        }
    }
    return 0;
}

static PyObject *py_truncate(PyObject *self, PyObject *args) {
    PyObject *xo, *to, *co;
    if (!PyArg_ParseTuple(args, "OOO:truncate", &xo, &to, &co)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x) return NULL;
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols, ts, cs;
    const float *t, *c;
    if (check_knee(to, co, cols, &t, &ts, &c, &cs)) return NULL;
    PyArrayObject *y = new_like(x, NPY_FLOAT32);
    if (!y) return NULL;
    Py_BEGIN_ALLOW_THREADS
    sasq_truncate(PyArray_DATA(x), t, ts, c, cs, rows, cols, PyArray_DATA(y));
    Py_END_ALLOW_THREADS
    return (PyObject *)y;
}

static PyObject *py_truncate_backward(PyObject *self, PyObject *args) {
    PyObject *xo, *to, *co, *go;
    if (!PyArg_ParseTuple(args, "OOOO:truncate_backward", &xo, &to, &co, &go)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x) return NULL;
    PyArrayObject *g = check_array(go, "grad_out", NPY_FLOAT32, "float32", 1);
    if (!g || same_shape(x, g, "x", "grad_out")) return NULL;
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols, ts, cs;
    const float *t, *c;
    if (check_knee(to, co, cols, &t, &ts, &c, &cs)) return NULL;
    npy_intp nt = ts ? cols : 1, nc = cs ? cols : 1;
    PyArrayObject *gx = new_like(x, NPY_FLOAT32);
    PyArrayObject *gt = (PyArrayObject *)PyArray_SimpleNew(1, &nt, NPY_FLOAT32);
    PyArrayObject *gc = (PyArrayObject *)PyArray_SimpleNew(1, &nc, NPY_FLOAT32);
    if (!gx || !gt || !gc) { Py_XDECREF(gx); Py_XDECREF(gt); Py_XDECREF(gc); return NULL; }
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_truncate_backward(PyArray_DATA(x), t, ts, c, cs, PyArray_DATA(g), rows, cols,
                                PyArray_DATA(gx), PyArray_DATA(gt), PyArray_DATA(gc));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "truncate_backward")) {
        Py_DECREF(gx); Py_DECREF(gt); Py_DECREF(gc);
        return NULL;
    }
    return Py_BuildValue("(NNN)", gx, gt, gc);
}

static PyObject *py_truncate_quantize(PyObject *self, PyObject *args) {
    PyObject *xo, *to, *so;
    int bits;
    if (!PyArg_ParseTuple(args, "OOOi:truncate_quantize", &xo, &to, &so, &bits)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x || check_bits(bits)) return NULL;
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols;
    const float *t, *s;
    int64_t ts = check_scale(to, "threshold", cols, &t);
    if (ts < 0) return NULL;
    int64_t ss = check_scale(so, "scale", cols, &s);
    if (ss < 0 || check_grid(s, ss, cols, bits, "scale")) return NULL;
    const float qm = (float)sasq_qmax(bits);
    for (int64_t j = 0; j < ((ts || ss) ? cols : 1); j++) {
        float tv = t[j * ts], cv = s[j * ss] * qm; /* the ceiling the kernel uses */
        if (!(tv < cv)) {
            char v[80];
            snprintf(v, sizeof v, "threshold %.9g >= scale * qmax = %.9g", (double)tv, (double)cv);
            PyErr_Format(PyExc_ValueError, "threshold must be < scale * qmax (qmax = %d at %d "
                         "bits), got %s at channel %lld", sasq_qmax(bits), bits, v, (long long)j);
            return NULL;
        }
    }
    PyArrayObject *q = new_like(x, NPY_INT8);
    if (!q) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_truncate_quantize(PyArray_DATA(x), t, ts, s, ss, rows, cols, bits, PyArray_DATA(q));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "truncate_quantize")) { Py_DECREF(q); return NULL; }
    return (PyObject *)q;
}

/* ---------------------------------------------------------------- Hadamard rotation */

/* small: a square (m, m) float32 matrix of finite values with x's last axis n = m * 2^k.
 * Returns m, or -1 with an exception set. */
static int64_t check_small(PyObject *o, int64_t n, const float **ptr) {
    PyArrayObject *s = check_array(o, "small", NPY_FLOAT32, "float32", 2);
    if (!s) return -1;
    if (PyArray_NDIM(s) != 2 || PyArray_DIMS(s)[0] != PyArray_DIMS(s)[1]) {
        PyErr_Format(PyExc_ValueError, "small must be a square 2-D (m, m) matrix, got %d "
                     "dimensions of sizes %lld, %lld, ...", PyArray_NDIM(s),
                     (long long)PyArray_DIMS(s)[0], (long long)PyArray_DIMS(s)[1]);
        return -1;
    }
    int64_t m = PyArray_DIMS(s)[0];
    const float *p = PyArray_DATA(s);
    for (int64_t i = 0; i < m * m; i++) {
        if (!isfinite(p[i])) {
            PyErr_Format(PyExc_ValueError, "small must be finite, got a non-finite value at "
                         "(%lld, %lld)", (long long)(i / m), (long long)(i % m));
            return -1;
        }
    }
    int64_t r = n / m;
    if (n % m || (r & (r - 1))) {
        PyErr_Format(PyExc_ValueError, "x's last axis (%lld) must be m * 2^k for small of shape "
                     "(%lld, %lld)", (long long)n, (long long)m, (long long)m);
        return -1;
    }
    *ptr = p;
    return m;
}

/* out: None (a new array) or a writeable float32 array of x's shape that is x itself (in place)
 * or does not overlap it. Returns a new reference or NULL with an exception set. */
static PyArrayObject *output_like(PyObject *outo, PyArrayObject *x) {
    if (outo == Py_None) return new_like(x, NPY_FLOAT32);
    PyArrayObject *o = check_array(outo, "out", NPY_FLOAT32, "float32", 1);
    if (!o || same_shape(x, o, "x", "out")) return NULL;
    if (!PyArray_ISWRITEABLE(o)) {
        PyErr_SetString(PyExc_ValueError, "out must be writeable");
        return NULL;
    }
    const char *a = PyArray_DATA(x), *b = PyArray_DATA(o);
    size_t nb = (size_t)PyArray_NBYTES(x);
    if (a != b && a < b + nb && b < a + nb) {
        PyErr_SetString(PyExc_ValueError, "out overlaps x without being x (pass out=x for in "
                        "place, or a separate array)");
        return NULL;
    }
    Py_INCREF(o);
    return o;
}

static PyObject *py_hadamard(PyObject *self, PyObject *args) {
    PyObject *xo, *smo, *outo = Py_None;
    int transpose;
    if (!PyArg_ParseTuple(args, "OOp|O:hadamard", &xo, &smo, &transpose, &outo)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x) return NULL;
    int64_t n = last_dim(x), rows = PyArray_SIZE(x) / n;
    const float *sm;
    int64_t m = check_small(smo, n, &sm);
    if (m < 0) return NULL;
    PyArrayObject *y = output_like(outo, x);
    if (!y) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_hadamard(PyArray_DATA(x), rows, n, sm, m, transpose, PyArray_DATA(y));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "hadamard")) { Py_DECREF(y); return NULL; }
    return (PyObject *)y;
}

/* hadamard_quantize (int8 codes, quantize's rules: no grid check) and hadamard_fake_quant
 * (float32, fake_quant's rule: scale * qmax finite). */
static PyObject *hadamard_quant(PyObject *args, int fake) {
    PyObject *xo, *smo, *so;
    int bits, transpose;
    if (!PyArg_ParseTuple(args, fake ? "OOOip:hadamard_fake_quant" : "OOOip:hadamard_quantize",
                          &xo, &smo, &so, &bits, &transpose))
        return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x || check_bits(bits)) return NULL;
    int64_t n = last_dim(x), rows = PyArray_SIZE(x) / n;
    const float *sm, *s;
    int64_t m = check_small(smo, n, &sm);
    if (m < 0) return NULL;
    int64_t ss = check_scale(so, "scale", n, &s);
    if (ss < 0 || (fake && check_grid(s, ss, n, bits, "scale"))) return NULL;
    PyArrayObject *out = new_like(x, fake ? NPY_FLOAT32 : NPY_INT8);
    if (!out) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fake ? sasq_hadamard_fake_quant(PyArray_DATA(x), rows, n, sm, m, transpose, s, ss, bits,
                                         PyArray_DATA(out))
              : sasq_hadamard_quantize(PyArray_DATA(x), rows, n, sm, m, transpose, s, ss, bits,
                                       PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    if (raise_status(st, fake ? "hadamard_fake_quant" : "hadamard_quantize")) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

static PyObject *py_hadamard_quantize(PyObject *self, PyObject *args) { return hadamard_quant(args, 0); }
static PyObject *py_hadamard_fake_quant(PyObject *self, PyObject *args) { return hadamard_quant(args, 1); }

/* ---------------------------------------------------------------- packed weights */

typedef struct {
    PyObject_HEAD
    sasq_packed p;
} PackedObject;

static void packed_dealloc(PackedObject *self) {
    sasq_packed_free(&self->p);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *packed_get_n(PackedObject *self, void *c) { return PyLong_FromLongLong(self->p.n); }
static PyObject *packed_get_k(PackedObject *self, void *c) { return PyLong_FromLongLong(self->p.k); }
static PyObject *packed_get_nbytes(PackedObject *self, void *c) {
    return PyLong_FromLongLong(self->p.n_panels * self->p.kp * SASQ_NR);
}
static PyObject *packed_get_row_sums(PackedObject *self, void *c) {
    npy_intp n = self->p.n;
    PyArrayObject *r = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT32);
    if (!r) return NULL;
    int32_t *d = PyArray_DATA(r);
    for (npy_intp i = 0; i < n; i++) d[i] = self->p.corr[i] / 128;
    return (PyObject *)r;
}
static PyObject *packed_repr(PackedObject *self) {
    return PyUnicode_FromFormat("PackedWeights(n=%lld, k=%lld)", (long long)self->p.n,
                                (long long)self->p.k);
}

static PyGetSetDef packed_getset[] = {
    {"n", (getter)packed_get_n, NULL, "output features N", NULL},
    {"k", (getter)packed_get_k, NULL, "input features K", NULL},
    {"nbytes", (getter)packed_get_nbytes, NULL, "bytes of the packed (padded) weights", NULL},
    {"row_sums", (getter)packed_get_row_sums, NULL, "sum_k w[n, k] as int32 (N,)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PackedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sasq._C.PackedWeights",
    .tp_doc = "INT8 weights (N, K) packed once for gemm/linear_int8 (create with pack_weights).",
    .tp_basicsize = sizeof(PackedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)packed_dealloc,
    .tp_repr = (reprfunc)packed_repr,
    .tp_getset = packed_getset,
};

static PyArrayObject *check_weights(PyObject *o, const char *name) {
    PyArrayObject *w = check_array(o, name, NPY_INT8, "int8", 2);
    if (!w) return NULL;
    if (PyArray_NDIM(w) != 2) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D (N, K), got %d dimensions", name,
                     PyArray_NDIM(w));
        return NULL;
    }
    if (PyArray_DIMS(w)[1] > SASQ_MAX_K) {
        PyErr_Format(PyExc_ValueError, "%s: K = %lld exceeds %d (the int32 result could overflow)",
                     name, (long long)PyArray_DIMS(w)[1], SASQ_MAX_K);
        return NULL;
    }
    return w;
}

static PackedObject *pack(PyArrayObject *w) {
    PackedObject *P = PyObject_New(PackedObject, &PackedType);
    if (!P) return NULL;
    memset(&P->p, 0, sizeof P->p);
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_pack_weights(PyArray_DATA(w), PyArray_DIMS(w)[0], PyArray_DIMS(w)[1], &P->p);
    Py_END_ALLOW_THREADS
    if (raise_status(st, "pack_weights")) { Py_DECREF(P); return NULL; }
    return P;
}

static PyObject *py_pack_weights(PyObject *self, PyObject *args) {
    PyObject *wo;
    if (!PyArg_ParseTuple(args, "O:pack_weights", &wo)) return NULL;
    PyArrayObject *w = check_weights(wo, "w");
    return w ? (PyObject *)pack(w) : NULL;
}

/* activations (..., K) int8 against packed (N, K): output shape (..., N). */
static PyArrayObject *check_acts(PyObject *o, const char *name, const sasq_packed *p,
                                 npy_intp *out_dims, int *out_ndim, int64_t *m) {
    PyArrayObject *a = check_array(o, name, NPY_INT8, "int8", 1);
    if (!a) return NULL;
    int nd = PyArray_NDIM(a);
    if (last_dim(a) != p->k) {
        PyErr_Format(PyExc_ValueError, "%s has K = %lld on its last axis but the weights have "
                     "K = %lld", name, (long long)last_dim(a), (long long)p->k);
        return NULL;
    }
    for (int i = 0; i < nd - 1; i++) out_dims[i] = PyArray_DIMS(a)[i];
    out_dims[nd - 1] = p->n;
    *out_ndim = nd;
    *m = PyArray_SIZE(a) / p->k;
    return a;
}

static PyObject *gemm_packed_i32(PyObject *ao, PackedObject *P) {
    npy_intp dims[NPY_MAXDIMS];
    int nd;
    int64_t m;
    PyArrayObject *a = check_acts(ao, "a", &P->p, dims, &nd, &m);
    if (!a) return NULL;
    PyArrayObject *c = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_INT32);
    if (!c) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_gemm_packed_i32(PyArray_DATA(a), m, &P->p, PyArray_DATA(c));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "gemm_int8")) { Py_DECREF(c); return NULL; }
    return (PyObject *)c;
}

static PyObject *py_gemm_int8(PyObject *self, PyObject *args) {
    PyObject *ao, *bo;
    if (!PyArg_ParseTuple(args, "OO:gemm_int8", &ao, &bo)) return NULL;
    PyArrayObject *a = check_array(ao, "a", NPY_INT8, "int8", 1);
    if (!a) return NULL;
    PyArrayObject *b = check_weights(bo, "b");
    if (!b) return NULL;
    if (last_dim(a) != PyArray_DIMS(b)[1]) {
        PyErr_Format(PyExc_ValueError, "a has K = %lld but b has K = %lld (b is (N, K))",
                     (long long)last_dim(a), (long long)PyArray_DIMS(b)[1]);
        return NULL;
    }
    PackedObject *P = pack(b);
    if (!P) return NULL;
    PyObject *c = gemm_packed_i32(ao, P);
    Py_DECREF(P);
    return c;
}

static PyObject *py_gemm_packed(PyObject *self, PyObject *args) {
    PyObject *ao;
    PackedObject *P;
    if (!PyArg_ParseTuple(args, "OO!:gemm_packed", &ao, &PackedType, &P)) return NULL;
    return gemm_packed_i32(ao, P);
}

static PyObject *py_quantize_dynamic(PyObject *self, PyObject *args) {
    PyObject *xo;
    int bits;
    double clip;
    if (!PyArg_ParseTuple(args, "Oid:quantize_dynamic", &xo, &bits, &clip)) return NULL;
    PyArrayObject *x = check_array(xo, "x", NPY_FLOAT32, "float32", 1);
    if (!x || check_bits(bits)) return NULL;
    if (!(clip > 0.0 && clip <= 1.0)) {
        PyErr_Format(PyExc_ValueError, "clip must be in (0, 1], got %R", PyTuple_GET_ITEM(args, 2));
        return NULL;
    }
    int64_t cols = last_dim(x), rows = PyArray_SIZE(x) / cols;
    PyArrayObject *q = new_like(x, NPY_INT8);
    PyArrayObject *sc = q ? (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x) - 1, PyArray_DIMS(x), NPY_FLOAT32) : NULL;
    if (!sc) { Py_XDECREF(q); return NULL; }
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_quantize_dynamic(PyArray_DATA(x), rows, cols, bits, (float)clip, PyArray_DATA(q),
                               PyArray_DATA(sc));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "quantize_dynamic")) { Py_DECREF(q); Py_DECREF(sc); return NULL; }
    return Py_BuildValue("(NN)", q, sc);
}

/* linear_int8 with one activation scale per row of a_q (float32 1-D of length M). */
static PyObject *py_linear_int8_rows(PyObject *self, PyObject *args) {
    PyObject *ao, *so, *wso;
    PackedObject *P;
    if (!PyArg_ParseTuple(args, "OO!OO:linear_int8_rows", &ao, &PackedType, &P, &so, &wso))
        return NULL;
    npy_intp dims[NPY_MAXDIMS];
    int nd;
    int64_t m;
    PyArrayObject *a = check_acts(ao, "a_q", &P->p, dims, &nd, &m);
    if (!a) return NULL;
    PyArrayObject *as = check_array(so, "a_scale", NPY_FLOAT32, "float32", 1);
    PyArrayObject *ws = as ? check_array(wso, "w_scales", NPY_FLOAT32, "float32", 1) : NULL;
    if (!ws) return NULL;
    if (PyArray_NDIM(as) != 1 || PyArray_SIZE(as) != m) {
        PyErr_Format(PyExc_ValueError, "a_scale must be one number or 1-D with one value per row "
                     "of a_q (%lld)", (long long)m);
        return NULL;
    }
    if (PyArray_NDIM(ws) != 1 || PyArray_SIZE(ws) != P->p.n) {
        PyErr_Format(PyExc_ValueError, "w_scales must be 1-D of length N = %lld", (long long)P->p.n);
        return NULL;
    }
    const float *wsp = PyArray_DATA(ws);
    for (int64_t j = 0; j < P->p.n; j++) {
        if (!(isfinite(wsp[j]) && wsp[j] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "w_scales must be finite and > 0 (index %lld)", (long long)j);
            return NULL;
        }
    }
    PyArrayObject *y = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!y) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_gemm_packed_f32_rows(PyArray_DATA(a), m, &P->p, PyArray_DATA(as), wsp, PyArray_DATA(y));
    Py_END_ALLOW_THREADS
    if (st == SASQ_ERR_ARG) {
        Py_DECREF(y);
        PyErr_SetString(PyExc_ValueError, "a_scale * w_scales: every per-row product must be a "
                        "normal float32 with 16384 * K * product finite (a_scale finite and > 0)");
        return NULL;
    }
    if (raise_status(st, "linear_int8")) { Py_DECREF(y); return NULL; }
    return (PyObject *)y;
}

static PyObject *py_linear_int8(PyObject *self, PyObject *args) {
    PyObject *ao, *wso;
    PackedObject *P;
    double a_scale;
    if (!PyArg_ParseTuple(args, "OO!dO:linear_int8", &ao, &PackedType, &P, &a_scale, &wso))
        return NULL;
    if (!(isfinite(a_scale) && a_scale > 0 && (float)a_scale > 0 && isfinite((float)a_scale))) {
        PyErr_Format(PyExc_ValueError, "a_scale must be finite and > 0 in float32, got %R",
                     PyTuple_GET_ITEM(args, 2));
        return NULL;
    }
    npy_intp dims[NPY_MAXDIMS];
    int nd;
    int64_t m;
    PyArrayObject *a = check_acts(ao, "a_q", &P->p, dims, &nd, &m);
    if (!a) return NULL;
    PyArrayObject *ws = check_array(wso, "w_scales", NPY_FLOAT32, "float32", 1);
    if (!ws) return NULL;
    if (PyArray_NDIM(ws) != 1 || PyArray_SIZE(ws) != P->p.n) {
        PyErr_Format(PyExc_ValueError, "w_scales must be 1-D of length N = %lld", (long long)P->p.n);
        return NULL;
    }
    const float *wsp = PyArray_DATA(ws);
    for (int64_t j = 0; j < P->p.n; j++) {
        if (!(isfinite(wsp[j]) && wsp[j] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "w_scales must be finite and > 0 (index %lld)", (long long)j);
            return NULL;
        }
        float comb = (float)a_scale * wsp[j];
        if (!sasq_linear_scale_ok(comb, P->p.k)) {
            char v[160]; /* PyErr_Format has no %g */
            snprintf(v, sizeof v, "%.9g * %.9g = %.9g in float32; it must lie in [%.9g, %.9g]",
                     (double)(float)a_scale, (double)wsp[j], (double)comb, (double)FLT_MIN,
                     FLT_MAX / (SASQ_LINEAR_MAX_ACC * (double)P->p.k));
            PyErr_Format(PyExc_ValueError, "a_scale * w_scales[%lld] = %s (a normal float32 with "
                         "16384 * K * scale finite, so that no output overflows or is 0 * inf)",
                         (long long)j, v);
            return NULL;
        }
    }
    PyArrayObject *y = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!y) return NULL;
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_gemm_packed_f32(PyArray_DATA(a), m, &P->p, (float)a_scale, wsp, PyArray_DATA(y));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "linear_int8")) { Py_DECREF(y); return NULL; }
    return (PyObject *)y;
}

/* ---------------------------------------------------------------- weights */

/* An optional float32 1-D factor of length n, finite and > 0 (None -> NULL). */
static int check_factor(PyObject *o, const char *name, int64_t n, const float **ptr) {
    *ptr = NULL;
    if (o == Py_None) return 0;
    PyArrayObject *f = check_array(o, name, NPY_FLOAT32, "float32", 1);
    if (!f) return -1;
    if (PyArray_NDIM(f) != 1 || PyArray_SIZE(f) != n) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D of length %lld", name, (long long)n);
        return -1;
    }
    const float *p = PyArray_DATA(f);
    for (int64_t i = 0; i < n; i++) {
        if (!(isfinite(p[i]) && p[i] > 0.0f)) {
            PyErr_Format(PyExc_ValueError, "%s must be finite and > 0 (index %lld)", name, (long long)i);
            return -1;
        }
    }
    *ptr = p;
    return 0;
}

static PyObject *py_fold_quant_weight(PyObject *self, PyObject *args) {
    PyObject *wo, *co, *ro;
    int bits, mode; /* mode 0: fake-quant floats; 1: (codes, scales); 2: (floats, codes, scales) */
    if (!PyArg_ParseTuple(args, "OOOii:fold_quant_weight", &wo, &co, &ro, &bits, &mode))
        return NULL;
    PyArrayObject *w = check_array(wo, "w", NPY_FLOAT32, "float32", 2);
    if (!w) return NULL;
    if (PyArray_NDIM(w) != 2) {
        PyErr_Format(PyExc_ValueError, "w must be 2-D (out, in), got %d dimensions", PyArray_NDIM(w));
        return NULL;
    }
    if (mode < 0 || mode > 2) {
        PyErr_Format(PyExc_ValueError, "mode must be 0, 1 or 2, got %d", mode);
        return NULL;
    }
    if (bits != 0 && check_bits(bits)) return NULL;
    if (bits == 0 && mode) {
        PyErr_SetString(PyExc_ValueError, "codes need bits in [2, 8]");
        return NULL;
    }
    int64_t rows = PyArray_DIMS(w)[0], cols = PyArray_DIMS(w)[1];
    const float *col, *row;
    if (check_factor(co, "col", cols, &col) || check_factor(ro, "row", rows, &row)) return NULL;
    npy_intp dv[1] = {rows};
    PyArrayObject *fq = mode != 1 ? new_like(w, NPY_FLOAT32) : NULL;
    PyArrayObject *cd = mode ? new_like(w, NPY_INT8) : NULL;
    PyArrayObject *sc = mode ? (PyArrayObject *)PyArray_SimpleNew(1, dv, NPY_FLOAT32) : NULL;
    if ((mode != 1 && !fq) || (mode && (!cd || !sc))) {
        Py_XDECREF(fq); Py_XDECREF(cd); Py_XDECREF(sc);
        return NULL;
    }
    sasq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sasq_fold_quant_weight(PyArray_DATA(w), rows, cols, col, row, bits,
                                fq ? PyArray_DATA(fq) : NULL, cd ? PyArray_DATA(cd) : NULL,
                                sc ? PyArray_DATA(sc) : NULL);
    Py_END_ALLOW_THREADS
    if (st != SASQ_OK) {
        Py_XDECREF(fq); Py_XDECREF(cd); Py_XDECREF(sc);
        if (st == SASQ_ERR_NONFINITE)
            PyErr_SetString(PyExc_ValueError, "fold_quant_weight: w (after the fold) has NaN or inf");
        else
            raise_status(st, "fold_quant_weight");
        return NULL;
    }
    if (mode == 0) return (PyObject *)fq;
    if (mode == 1) return Py_BuildValue("(NN)", cd, sc);
    return Py_BuildValue("(NNN)", fq, cd, sc);
}

/* ---------------------------------------------------------------- threads, ISA, measurement */

static const char *isa_names[] = {"scalar", "avx2", "avx512vnni"};

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i:set_num_threads", &n)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sasq_set_num_threads(n);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_Format(PyExc_ValueError, "n must be in [1, 256], got %d", n);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(sasq_get_num_threads());
}

static PyObject *py_available_isas(PyObject *self, PyObject *noargs) {
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (int i = 2; i >= 0; i--) {
        if (!sasq_isa_available((sasq_isa)i)) continue;
        PyObject *s = PyUnicode_FromString(isa_names[i]);
        if (!s || PyList_Append(l, s)) { Py_XDECREF(s); Py_DECREF(l); return NULL; }
        Py_DECREF(s);
    }
    return l;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    int isa = -1;
    if (strcmp(name, "auto") == 0) isa = (int)sasq_isa_best();
    for (int i = 0; i < 3; i++)
        if (strcmp(name, isa_names[i]) == 0) isa = i;
    if (isa < 0) {
        PyErr_Format(PyExc_ValueError, "isa must be 'auto', 'avx512vnni', 'avx2' or 'scalar', got %R",
                     PyTuple_GET_ITEM(args, 0));
        return NULL;
    }
    if (sasq_set_isa((sasq_isa)isa)) {
        PyErr_Format(PyExc_ValueError, "isa %s is not supported by this CPU", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_get_isa(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(isa_names[sasq_get_isa()]);
}

static PyObject *py_peak(PyObject *self, PyObject *args) {
    int threads;
    double seconds = 0.3;
    if (!PyArg_ParseTuple(args, "i|d:_peak_int8_gops", &threads, &seconds)) return NULL;
    if (threads < 1 || threads > 256 || !(seconds > 0 && seconds < 60)) {
        PyErr_SetString(PyExc_ValueError, "threads must be in [1, 256] and seconds in (0, 60)");
        return NULL;
    }
    double g, gc;
    Py_BEGIN_ALLOW_THREADS
    g = sasq_peak_int8_gops(threads, seconds, &gc);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dd)", g, gc);
}

static PyObject *py_gemm_threads(PyObject *self, PyObject *args) {
    long long m, n, k;
    if (!PyArg_ParseTuple(args, "LLL:_gemm_threads", &m, &n, &k)) return NULL;
    if (m < 1 || n < 1 || k < 1) {
        PyErr_SetString(PyExc_ValueError, "m, n, k must be >= 1");
        return NULL;
    }
    return PyLong_FromLong(sasq_gemm_threads(m, n, k));
}

static PyObject *py_gemm_policy(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p:_gemm_policy", &on)) return NULL;
    sasq_gemm_policy(on);
    Py_RETURN_NONE;
}

static PyObject *py_stream(PyObject *self, PyObject *args) {
    PackedObject *P;
    if (!PyArg_ParseTuple(args, "O!:_stream_read", &PackedType, &P)) return NULL;
    int64_t r;
    Py_BEGIN_ALLOW_THREADS
    r = sasq_stream_read(&P->p);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(r);
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS, "quantize(x, scale, bits) -> int8"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(q, scale) -> float32"},
    {"fake_quant", py_fake_quant, METH_VARARGS, "fake_quant(x, scale, bits) -> float32"},
    {"fake_quant_backward", py_fake_quant_backward, METH_VARARGS,
     "fake_quant_backward(x, scale, grad_out, bits, grad_scale_factor) -> (grad_x, grad_scale)"},
    {"truncate", py_truncate, METH_VARARGS, "truncate(x, threshold, ceiling) -> float32"},
    {"truncate_backward", py_truncate_backward, METH_VARARGS,
     "truncate_backward(x, threshold, ceiling, grad_out) -> (grad_x, grad_t, grad_c)"},
    {"truncate_quantize", py_truncate_quantize, METH_VARARGS,
     "truncate_quantize(x, threshold, scale, bits) -> int8"},
    {"hadamard", py_hadamard, METH_VARARGS,
     "hadamard(x, small, transpose, out=None) -> float32 x kron(small, H_p)^T / sqrt(n) (or ^T off)"},
    {"hadamard_quantize", py_hadamard_quantize, METH_VARARGS,
     "hadamard_quantize(x, small, scale, bits, transpose) -> int8"},
    {"hadamard_fake_quant", py_hadamard_fake_quant, METH_VARARGS,
     "hadamard_fake_quant(x, small, scale, bits, transpose) -> float32"},
    {"gemm_int8", py_gemm_int8, METH_VARARGS, "gemm_int8(a (M,K) int8, b (N,K) int8) -> int32 (M,N)"},
    {"pack_weights", py_pack_weights, METH_VARARGS, "pack_weights(w (N,K) int8) -> PackedWeights"},
    {"gemm_packed", py_gemm_packed, METH_VARARGS, "gemm_packed(a, packed) -> int32"},
    {"linear_int8", py_linear_int8, METH_VARARGS,
     "linear_int8(a_q, packed, a_scale, w_scales) -> float32"},
    {"quantize_dynamic", py_quantize_dynamic, METH_VARARGS,
     "quantize_dynamic(x, bits, clip) -> (int8 codes, float32 per-row scales)"},
    {"linear_int8_rows", py_linear_int8_rows, METH_VARARGS,
     "linear_int8_rows(a_q, packed, a_scales (M,) float32, w_scales) -> float32"},
    {"fold_quant_weight", py_fold_quant_weight, METH_VARARGS,
     "fold_quant_weight(w, col|None, row|None, bits (0: fold only), mode) -> fq | (codes, scales) | (fq, codes, scales)"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"available_isas", py_available_isas, METH_NOARGS, "available_isas() -> list[str]"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name)"},
    {"get_isa", py_get_isa, METH_NOARGS, "get_isa() -> str"},
    {"_peak_int8_gops", py_peak, METH_VARARGS, "_peak_int8_gops(threads, seconds=0.3) -> (wall GOP/s, CPU-time GOP/s)"},
    {"_stream_read", py_stream, METH_VARARGS, "_stream_read(packed): read every packed byte once"},
    {"_gemm_threads", py_gemm_threads, METH_VARARGS,
     "_gemm_threads(m, n, k) -> threads linear_int8 uses for that shape (the policy)"},
    {"_gemm_policy", py_gemm_policy, METH_VARARGS,
     "_gemm_policy(on): False makes every linear_int8 use all threads (benchmarks measure the policy)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "sasq._C", "sasq C core (use sasq.ops, not this module).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    if (PyType_Ready(&PackedType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&PackedType);
    if (PyModule_AddObject(m, "PackedWeights", (PyObject *)&PackedType) < 0) {
        Py_DECREF(&PackedType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_K", SASQ_MAX_K);
    return m;
}
