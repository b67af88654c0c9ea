/* A recorded graph's Python lists as the integer columns the C replay reads
   (estimate/native_replay.py's `_Structure`), read through the Python C API.

   Why: the columns of an SDXL denoiser graph (14 000 ops, 18 000 tensors) took some 20 ms of
   Python per graph, and a fit on a small card flattens three (one per quantization); here one
   pass over the lists. Built apart from native.c (it needs Python's headers, and the library must
   be loaded with ctypes.PyDLL, which holds the GIL); where it cannot be built, `_Structure`
   flattens in Python, and tests/estimate/test_native_replay.py wants the same columns both ways.

   Each function returns 0, or -1 with a Python exception set (a list or tuple not shaped as the
   recorded graphs are). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int as_int(PyObject *o, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

static int fail(const char *what) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, what);
    return -1;
}

/* How many inputs and outputs the ops have in all: out[0], out[1]. ops: a list of
   (name index, module index, [(arg, tid)], [tid]). */
int vp_count_ops(PyObject *ops, int64_t *out) {
    if (!PyList_Check(ops)) return fail("ops: a list");
    int64_t n_in = 0, n_out = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 4) return fail("an op: a 4-tuple");
        PyObject *ins = PyTuple_GET_ITEM(op, 2), *outs = PyTuple_GET_ITEM(op, 3);
        if (!PyList_Check(ins) || !PyList_Check(outs)) return fail("an op's inputs and outputs: lists");
        n_in += PyList_GET_SIZE(ins);
        n_out += PyList_GET_SIZE(outs);
    }
    out[0] = n_in;
    out[1] = n_out;
    return 0;
}

/* The ops as columns: name, module; inputs (offsets in_ptr, tids, argument codes) and outputs
   (offsets out_ptr, tids). An argument name's code comes from `codes` (a dict); a name not in it
   gets the next code and is added. */
int vp_flatten_ops(PyObject *ops, PyObject *codes, int64_t *op_name, int64_t *op_module, int64_t *in_ptr,
                   int64_t *in_tid, int64_t *in_arg, int64_t *out_ptr, int64_t *out_tid) {
    if (!PyList_Check(ops) || !PyDict_Check(codes)) return fail("ops: a list, codes: a dict");
    int64_t k_in = 0, k_out = 0;
    in_ptr[0] = out_ptr[0] = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 4) return fail("an op: a 4-tuple");
        if (as_int(PyTuple_GET_ITEM(op, 0), &op_name[i]) || as_int(PyTuple_GET_ITEM(op, 1), &op_module[i])) return -1;
        PyObject *ins = PyTuple_GET_ITEM(op, 2), *outs = PyTuple_GET_ITEM(op, 3);
        if (!PyList_Check(ins) || !PyList_Check(outs)) return fail("an op's inputs and outputs: lists");
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(ins); j++, k_in++) {
            PyObject *pair = PyList_GET_ITEM(ins, j);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) return fail("an input: an (arg, tid) pair");
            PyObject *arg = PyTuple_GET_ITEM(pair, 0);
            if (as_int(PyTuple_GET_ITEM(pair, 1), &in_tid[k_in])) return -1;
            PyObject *code = PyDict_GetItemWithError(codes, arg);
            if (code != NULL) {
                if (as_int(code, &in_arg[k_in])) return -1;
            } else {                              /* a new name: the next code */
                if (PyErr_Occurred()) return -1;
                in_arg[k_in] = (int64_t)PyDict_GET_SIZE(codes);
                PyObject *next = PyLong_FromLongLong((long long)in_arg[k_in]);
                if (next == NULL || PyDict_SetItem(codes, arg, next) < 0) { Py_XDECREF(next); return -1; }
                Py_DECREF(next);
            }
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(outs); j++, k_out++)
            if (as_int(PyList_GET_ITEM(outs, j), &out_tid[k_out])) return -1;
        in_ptr[i + 1] = k_in;
        out_ptr[i + 1] = k_out;
    }
    return 0;
}

/* Each item of the list `items` looked up in the dict `table`: its value, an int, or `missing`
   where the item is not a key. */
int vp_lookup(PyObject *items, PyObject *table, int64_t missing, int64_t *out) {
    if (!PyList_Check(items) || !PyDict_Check(table)) return fail("items: a list, table: a dict");
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *value = PyDict_GetItemWithError(table, PyList_GET_ITEM(items, i));
        if (value == NULL) {
            if (PyErr_Occurred()) return -1;
            out[i] = missing;
        } else if (as_int(value, &out[i])) {
            return -1;
        }
    }
    return 0;
}

/* A list of ints and Nones as ints, None as `none`. */
int vp_ints(PyObject *items, int64_t none, int64_t *out) {
    if (!PyList_Check(items)) return fail("items: a list");
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (item == Py_None) out[i] = none;
        else if (as_int(item, &out[i])) return -1;
    }
    return 0;
}
