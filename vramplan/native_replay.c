/* A recorded graph's replay with autograd's rules -- forward, backward, then what is left freed
   -- in C: estimate/replay.py's `Replayer` (forward(), backward(), finish()) for a graph whose
   inputs the replay allocates itself (the denoiser's), with the same rules in the same order.

   The Python Replayer stays the reference and runs wherever this library is not built;
   tests/estimate/test_native_replay.py wants the same records (bytes, events, category, phase,
   module, op, saved), the same results and the same size log from both, graph by graph. Why:
   a fresh SDXL denoiser replay (some 14 000 ops, 50 000 records) took about 80 ms in Python,
   its forward alone 25-40 ms, and `fit` replays several per search (one per quantization and
   checkpointing it tries); here the records are columns, never Python objects.

   Python resolves names (ops, modules, parameters, argument names) to integers
   (estimate/native_replay.py); each record's op is an op-name index, or OP_NONE (""),
   OP_ONES_LIKE, OP_FUNCTION_BACKWARD; its module a module index or -1 (""). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NEVER INT64_MIN

/* categories, as native_replay.CATEGORIES lists them */
enum { CAT_TEMPORARIES, CAT_ACTIVATIONS, CAT_AUTOCAST_CACHE, CAT_INPUTS, CAT_WORKSPACES, CAT_GRADIENTS };
/* ops that are not graph ops */
#define OP_NONE (-1)
#define OP_ONES_LIKE (-2)
#define OP_FUNCTION_BACKWARD (-3)
/* rule flags, per op name */
#define F_DIFFERENTIABLE 1
#define F_GRAD_ALIAS 2
#define F_GRAD_NONE 4
#define F_CAT 8            /* cat / stack: an alias gradient whatever the sizes */
#define F_TO_COPY 16       /* _to_copy: of a parameter, an autocast cache entry */
/* save slots */
enum { SLOT_STAR, SLOT_ARG, SLOT_OUT };
/* convolution workspace kinds: forward, input, weight, both (ws[4 * op + kind], -1: not a conv) */
enum { WS_FORWARD, WS_INPUT, WS_WEIGHT, WS_BOTH };

typedef struct {           /* the graph, resolved to integers; see native_replay.py's `_Flat` */
    int64_t n_ops, n_tensors, n_storages, n_params, n_roles;
    const int64_t *op_name, *op_module, *in_ptr, *in_tid, *in_arg, *out_ptr, *out_tid;
    /* rules, by op name: flags; save slots (kind, value: arg code or output index, any: whether
       any differentiable input keeps it, triggers: arg codes); temps (arg code, count) */
    const int64_t *flags, *save_ptr, *save_kind, *save_value, *save_any, *trig_ptr, *trig_arg;
    const int64_t *temp_ptr, *temp_arg, *temp_count;
    /* trainable: per parameter, whether it requires grad; role_rg: per graph input role */
    const int64_t *t_sid, *t_float, *t_param, *t_bytes, *t_dtype, *t_role, *trainable, *role_rg;
    const int64_t *s_alloc, *s_bytes, *s_param, *s_free;   /* s_alloc -2: dropped; s_free -1: never */
    int64_t n_regions;
    const int64_t *r_first, *r_last, *r_in_ptr, *r_in, *r_out_ptr, *r_out;
    const int64_t *region_of, *region_end, *region_start;      /* per op: 0/1, region or -1 */
    int64_t n_functions;
    const int64_t *f_first, *f_last, *f_in_ptr, *f_in, *f_out_ptr, *f_out, *f_keep_ptr, *f_keep, *f_module;
    const int64_t *f_held;         /* per function: keeps its saves in ctx until finish (HELD_BY_CTX) */
    const int64_t *function_of, *function_end;                /* per op: function or -1 */
    const int64_t *ws;
    int64_t loss, arg_input, arg_weight, arg_bias;
    const int64_t *cat_code;       /* the caller's code for each category (`vp_graph_copy` 3) */
} Graph;

typedef struct { int64_t *v; int64_t len, cap; } Vec;

typedef struct {
    const Graph *g;
    int64_t now, phase, failed;
    /* records */
    int64_t n, cap;
    int64_t *nbytes, *alloc_at, *free_at, *cat, *rphase, *module, *op, *saved, *source, *refs;
    /* per tensor */
    int64_t *rg, *grad, *grad_stamp;
    /* per storage */
    int64_t *live, *live_stamp, *holds, *alive, *is_input, *fresh;
    int64_t stamp, recompute;
    /* the storages Python lets go of after each op, in storage order: free_sid[free_ptr[i]..] */
    int64_t *free_ptr, *free_sid;
    /* saved_by_op: per op, where its storages start in `pool` and how many (-1: no entry) */
    int64_t *sbo_at, *sbo_len;
    Vec pool, fresh_list, temps;
    /* logs: (op, kind, made), (tid, out tid, same bytes), (module, record), (param, record),
       (role, record) */
    Vec workspaces, aliases, saved_from, param_grads, input_grads;
    int64_t *param_grad, *role_grad;
} Replay;

static void push(Replay *s, Vec *vec, int64_t value) {
    if (vec->len == vec->cap) {
        int64_t cap = vec->cap ? vec->cap * 2 : 256;
        int64_t *v = realloc(vec->v, (size_t)cap * sizeof(int64_t));
        if (!v) { s->failed = 1; return; }
        vec->v = v;
        vec->cap = cap;
    }
    vec->v[vec->len++] = value;
}

static int64_t *filled(int64_t n, int64_t value) {
    int64_t *out = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (out) for (int64_t i = 0; i < n; i++) out[i] = value;
    return out;
}

/* -- the clock's records (replay.Clock.alloc / free) ------------------------------------------ */

static int grow_records(Replay *s) {
    int64_t cap = s->cap ? s->cap * 2 : 4096;
    int64_t **columns[] = {&s->nbytes, &s->alloc_at, &s->free_at, &s->cat, &s->rphase, &s->module, &s->op,
                           &s->saved, &s->source, &s->refs};
    for (size_t k = 0; k < sizeof(columns) / sizeof(columns[0]); k++) {
        int64_t *v = realloc(*columns[k], (size_t)cap * sizeof(int64_t));
        if (!v) { s->failed = 1; return -1; }
        *columns[k] = v;
    }
    s->cap = cap;
    return 0;
}

/* A new record's index. When memory runs out the replay is marked failed (its result is thrown
   away) and record 0, which exists from the start, stands in, so that callers never write outside
   the columns. */
static int64_t alloc_record(Replay *s, int64_t nbytes, int64_t cat, int64_t op, int64_t module, int64_t source) {
    if (s->n == s->cap && grow_records(s) < 0) return 0;
    int64_t i = s->n++;
    s->nbytes[i] = nbytes ? (nbytes + 511) / 512 * 512 : 0;     /* replay.cuda_rounded */
    s->alloc_at[i] = ++s->now;
    s->free_at[i] = NEVER;
    s->cat[i] = cat;
    s->rphase[i] = s->phase;
    s->module[i] = module;
    s->op[i] = op;
    s->saved[i] = 0;
    s->source[i] = source;
    s->refs[i] = 0;
    return i;
}

static void free_record(Replay *s, int64_t i) {
    if (s->free_at[i] == NEVER) s->free_at[i] = ++s->now;
}

/* -- storage bookkeeping ------------------------------------------------------------------------ */

static void set_live(Replay *s, int64_t sid, int64_t rec) {
    s->live[sid] = rec;
    s->live_stamp[sid] = ++s->stamp;      /* a dict's order: the last insertion */
}

static void python_free(Replay *s, int64_t sid) {
    s->alive[sid] = 0;
    if (s->holds[sid] == 0 && s->live[sid] >= 0) {
        free_record(s, s->live[sid]);
        s->live[sid] = -1;
    }
}

static void release(Replay *s, int64_t sid) {
    s->holds[sid]--;
    if (s->holds[sid] == 0 && !s->alive[sid] && s->live[sid] >= 0) {
        free_record(s, s->live[sid]);
        s->live[sid] = -1;
    }
}

static void workspace(Replay *s, int64_t i, int64_t kind) {
    int64_t nbytes = s->g->ws[4 * i + kind];
    int64_t k = s->workspaces.len / 3;
    push(s, &s->workspaces, i);
    push(s, &s->workspaces, kind);
    push(s, &s->workspaces, nbytes != 0);
    if (nbytes) free_record(s, alloc_record(s, nbytes, CAT_WORKSPACES, s->g->op_name[i], s->g->op_module[i], 4 * k + 2));
}

/* the first input of op i with argument code `arg`, -1: none (args.setdefault: the first wins) */
static int64_t first_arg(const Graph *g, int64_t i, int64_t arg) {
    for (int64_t k = g->in_ptr[i]; k < g->in_ptr[i + 1]; k++) if (g->in_arg[k] == arg) return g->in_tid[k];
    return -1;
}

/* dict(op[2]).get(arg, op[2][0][1]): the last input with that argument code, else the first input */
static int64_t last_arg(const Graph *g, int64_t i, int64_t arg) {
    int64_t found = g->in_tid[g->in_ptr[i]];
    for (int64_t k = g->in_ptr[i]; k < g->in_ptr[i + 1]; k++) if (g->in_arg[k] == arg) found = g->in_tid[k];
    return found;
}

/* one kept tensor of op i: its storage joins the op's saved list (once), held for backward */
static void keep(Replay *s, int64_t i, int64_t tid, int64_t at, int mark) {
    const Graph *g = s->g;
    int64_t sid = g->t_sid[tid];
    if (g->s_param[sid]) return;
    for (int64_t k = at; k < s->pool.len; k++) if (s->pool.v[k] == sid) return;
    push(s, &s->pool, sid);
    s->holds[sid]++;
    if (!mark) return;
    int64_t rec = s->live[sid];
    if (rec >= 0 && !s->saved[rec]) {
        s->saved[rec] = 1;
        if (s->cat[rec] == CAT_TEMPORARIES) {
            s->cat[rec] = CAT_ACTIVATIONS;
            push(s, &s->saved_from, g->op_module[i]);
            push(s, &s->saved_from, rec);
        }
    }
}

/* -- forward (Replayer._forward_ops) ---------------------------------------------------------- */

static void forward_ops(Replay *s, int64_t first, int64_t last, int recompute) {
    const Graph *g = s->g;
    for (int64_t i = first; i <= last && !s->failed; i++) {
        int64_t name = g->op_name[i], flags = g->flags[name];
        int in_region = !recompute && g->region_of && g->region_of[i];
        int64_t a = g->in_ptr[i], b = g->in_ptr[i + 1];
        int any_rg = 0;
        if (flags & F_DIFFERENTIABLE)
            for (int64_t k = a; k < b; k++) if (s->rg[g->in_tid[k]] && g->t_float[g->in_tid[k]]) { any_rg = 1; break; }
        int64_t fn = g->function_of ? g->function_of[i] : -1;
        int inputs_rg = 0;
        if (fn >= 0) {
            for (int64_t k = g->f_in_ptr[fn]; k < g->f_in_ptr[fn + 1]; k++)
                if (g->t_float[g->f_in[k]] && s->rg[g->f_in[k]]) { inputs_rg = 1; break; }
            any_rg = 0;
        }
        int cast = 0;
        if (flags & F_TO_COPY)
            for (int64_t k = a; k < b; k++) if (g->t_param[g->in_tid[k]] >= 0) { cast = 1; break; }
        for (int64_t k = g->out_ptr[i]; k < g->out_ptr[i + 1]; k++) {
            int64_t tid = g->out_tid[k];
            int of_function = 0;
            if (fn >= 0)
                for (int64_t m = g->f_out_ptr[fn]; m < g->f_out_ptr[fn + 1]; m++) if (g->f_out[m] == tid) { of_function = 1; break; }
            s->rg[tid] = (of_function ? inputs_rg : any_rg) && g->t_float[tid];
            int64_t sid = g->t_sid[tid];
            if (g->s_alloc[sid] == i && s->live[sid] < 0) {
                int64_t rec = alloc_record(s, g->s_bytes[sid], cast ? CAT_AUTOCAST_CACHE : CAT_TEMPORARIES, name,
                                           g->op_module[i], 4 * sid);
                set_live(s, sid, rec);
                s->alive[sid] = 1;
                if (recompute && s->fresh[sid] != s->recompute) {   /* fresh[sid] = rec */
                    s->fresh[sid] = s->recompute;
                    push(s, &s->fresh_list, sid);
                    push(s, &s->fresh_list, rec);
                }
            }
        }
        if (g->ws[4 * i] >= 0) workspace(s, i, WS_FORWARD);
        int held = fn >= 0 && i == g->f_last[fn] && g->f_held[fn];
        if (fn >= 0 && i == g->f_last[fn] && inputs_rg && (held ? !recompute : !in_region)) {
            int64_t at = s->pool.len;
            for (int64_t k = g->f_keep_ptr[fn]; k < g->f_keep_ptr[fn + 1]; k++) keep(s, i, g->f_keep[k], at, 0);
            s->sbo_at[i] = at;
            s->sbo_len[i] = s->pool.len - at;
        } else if (any_rg && !in_region) {
            int64_t at = s->pool.len;
            for (int64_t e = g->save_ptr[name]; e < g->save_ptr[name + 1]; e++) {
                int64_t kind = g->save_kind[e], value = g->save_value[e];
                if (kind == SLOT_STAR) {
                    for (int64_t k = a; k < b; k++) keep(s, i, g->in_tid[k], at, 1);
                    continue;
                }
                if (!g->save_any[e]) {
                    int fires = 0;
                    for (int64_t t = g->trig_ptr[e]; t < g->trig_ptr[e + 1]; t++) {
                        int64_t tid = first_arg(g, i, g->trig_arg[t]);
                        if (tid >= 0 && s->rg[tid]) { fires = 1; break; }
                    }
                    if (!fires) continue;
                }
                if (kind == SLOT_OUT) {
                    if (value < g->out_ptr[i + 1] - g->out_ptr[i]) keep(s, i, g->out_tid[g->out_ptr[i] + value], at, 1);
                } else {
                    int64_t tid = first_arg(g, i, value);
                    if (tid >= 0) keep(s, i, tid, at, 1);
                }
            }
            s->sbo_at[i] = at;
            s->sbo_len[i] = s->pool.len - at;
        }
        if (recompute) {
            for (int64_t k = s->free_ptr[i]; k < s->free_ptr[i + 1]; k++) {
                int64_t sid = s->free_sid[k];
                if (s->fresh[sid] == s->recompute) python_free(s, sid);
            }
            continue;
        }
        if (g->region_end && g->region_end[i] >= 0) {
            int64_t r = g->region_end[i];
            for (int64_t k = g->r_in_ptr[r]; k < g->r_in_ptr[r + 1]; k++) {
                int64_t sid = g->t_sid[g->r_in[k]];
                if (!g->s_param[sid]) s->holds[sid]++;
            }
        }
        for (int64_t k = s->free_ptr[i]; k < s->free_ptr[i + 1]; k++) {
            int64_t sid = s->free_sid[k];
            if (!s->is_input[sid]) python_free(s, sid);
        }
    }
}

/* -- backward (Replayer.backward) ------------------------------------------------------------ */

static void give(Replay *s, int64_t tid, int64_t rec);

static void drop(Replay *s, int64_t rec) {
    if (--s->refs[rec] <= 0) free_record(s, rec);
}

static void give(Replay *s, int64_t tid, int64_t rec) {
    if (s->grad[tid] >= 0) { drop(s, rec); return; }
    s->grad[tid] = rec;
    s->grad_stamp[tid] = ++s->stamp;
    s->refs[rec]++;
}

static int64_t new_grad(Replay *s, int64_t nbytes, int64_t op, int64_t module, int64_t source) {
    return alloc_record(s, nbytes, CAT_TEMPORARIES, op, module, source);
}

/* AccumulateGrad (Replayer._accumulate) */
static void accumulate(Replay *s, int64_t param, int64_t rec, int alias, int64_t op, int64_t module) {
    if (s->param_grad[param] >= 0) {
        if (!alias && s->refs[rec] == 0) free_record(s, rec);
        return;
    }
    if (alias || s->refs[rec] > 0) rec = alloc_record(s, s->nbytes[rec], CAT_GRADIENTS, op, module, 4 * rec + 3);
    else s->cat[rec] = CAT_GRADIENTS;
    s->param_grad[param] = rec;
    push(s, &s->param_grads, param);
    push(s, &s->param_grads, rec);
}

static void hand(Replay *s, int64_t tid, int64_t rec, int alias, int64_t op, int64_t module) {
    const Graph *g = s->g;
    if (g->t_param[tid] >= 0 && g->t_role[tid] < 0) accumulate(s, g->t_param[tid], rec, alias, op, module);
    else give(s, tid, rec);
}

static void recompute_region(Replay *s, int64_t r) {
    const Graph *g = s->g;
    s->recompute++;
    s->fresh_list.len = 0;
    forward_ops(s, g->r_first[r], g->r_last[r], 1);
    /* recomputed outputs are dropped; only what autograd holds stays */
    for (int64_t k = 0; k < s->fresh_list.len; k += 2) {
        int64_t sid = s->fresh_list.v[k];
        if (s->alive[sid] && s->live[sid] == s->fresh_list.v[k + 1]) python_free(s, sid);
    }
}

static void backward_function(Replay *s, int64_t fn, const int64_t *outs, int64_t n_outs) {
    const Graph *g = s->g;
    int64_t module = g->f_module[fn];
    s->temps.len = 0;
    for (int64_t i = g->f_first[fn]; i <= g->f_last[fn]; i++)
        for (int64_t k = g->out_ptr[i]; k < g->out_ptr[i + 1]; k++) {
            int64_t sid = g->t_sid[g->out_tid[k]];
            if (g->s_alloc[sid] == i) push(s, &s->temps, new_grad(s, g->s_bytes[sid], OP_FUNCTION_BACKWARD, module, 4 * sid));
        }
    for (int64_t k = g->f_in_ptr[fn]; k < g->f_in_ptr[fn + 1]; k++) {
        int64_t tid = g->f_in[k], seen = 0;
        for (int64_t m = g->f_in_ptr[fn]; m < k; m++) if (g->f_in[m] == tid) { seen = 1; break; }
        if (seen || !s->rg[tid] || !g->t_float[tid]) continue;
        hand(s, tid, new_grad(s, g->t_bytes[tid], OP_FUNCTION_BACKWARD, module, 4 * tid + 1), 0, OP_FUNCTION_BACKWARD,
             module);
    }
    for (int64_t k = 0; k < s->temps.len; k++) free_record(s, s->temps.v[k]);
    for (int64_t k = 0; k < n_outs; k++) {
        int64_t rec = s->grad[outs[k]];
        s->grad[outs[k]] = -1;
        drop(s, rec);
    }
}

static int by_stamp(const void *x, const void *y) {
    const int64_t *a = x, *b = y;
    return (a[0] > b[0]) - (a[0] < b[0]);
}

/* (stamp, index) pairs of the entries with value >= 0, in stamp order, into *out (caller frees) */
static int64_t in_order(const int64_t *value, const int64_t *stamp, int64_t n, int64_t **out) {
    int64_t m = 0;
    int64_t *pairs = malloc((size_t)(2 * (n > 0 ? n : 1)) * sizeof(int64_t));
    if (!pairs) return -1;
    for (int64_t i = 0; i < n; i++)
        if (value[i] >= 0) { pairs[2 * m] = stamp[i]; pairs[2 * m + 1] = i; m++; }
    qsort(pairs, (size_t)m, 2 * sizeof(int64_t), by_stamp);
    *out = pairs;
    return m;
}

static void backward(Replay *s) {
    const Graph *g = s->g;
    s->phase = 1;
    if (g->loss < 0) return;
    give(s, g->loss, new_grad(s, g->t_bytes[g->loss], OP_ONES_LIKE, -1, 4 * g->loss + 1));
    int64_t outs_cap = 16;
    int64_t *outs = malloc((size_t)outs_cap * sizeof(int64_t));
    if (!outs) { s->failed = 1; return; }
    for (int64_t i = g->n_ops - 1; i >= 0 && !s->failed; i--) {
        if (g->n_regions && g->region_end[i] >= 0) {
            int64_t r = g->region_end[i];
            for (int64_t k = g->r_out_ptr[r]; k < g->r_out_ptr[r + 1]; k++)
                if (s->grad[g->r_out[k]] >= 0) { recompute_region(s, r); break; }
        }
        int64_t n_outs = 0;
        for (int64_t k = g->out_ptr[i]; k < g->out_ptr[i + 1]; k++) {
            int64_t tid = g->out_tid[k];
            if (s->grad[tid] < 0) continue;
            if (n_outs == outs_cap) {
                int64_t *more = realloc(outs, (size_t)(outs_cap *= 2) * sizeof(int64_t));
                if (!more) { s->failed = 1; break; }
                outs = more;
            }
            outs[n_outs++] = tid;
        }
        if (n_outs) {
            int64_t fn = g->function_end ? g->function_end[i] : -1;
            if (fn >= 0) {
                backward_function(s, fn, outs, n_outs);
            } else {
                int64_t name = g->op_name[i], flags = g->flags[name], module = g->op_module[i];
                int64_t out_tid = outs[0], out_grad = s->grad[out_tid];
                int made_input = 0, made_weight = 0;
                for (int64_t k = g->in_ptr[i]; k < g->in_ptr[i + 1]; k++) {
                    int64_t tid = g->in_tid[k], seen = 0;
                    for (int64_t m = g->in_ptr[i]; m < k; m++) if (g->in_tid[m] == tid) { seen = 1; break; }
                    if (seen || !s->rg[tid] || !g->t_float[tid]) continue;
                    for (int64_t e = g->temp_ptr[name]; e < g->temp_ptr[name + 1]; e++) {
                        int64_t ref = last_arg(g, i, g->temp_arg[e]);
                        for (int64_t c = 0; c < g->temp_count[e]; c++)
                            free_record(s, new_grad(s, g->t_bytes[ref], name, module, 4 * ref + 1));
                    }
                    if (flags & F_GRAD_NONE) continue;
                    int64_t arg = g->in_arg[k];
                    if (arg == g->arg_input) made_input = 1;
                    if (arg == g->arg_weight || arg == g->arg_bias) made_weight = 1;
                    int alias = 0;
                    if ((flags & F_GRAD_ALIAS) && g->t_dtype[tid] == g->t_dtype[out_tid]) {
                        if (flags & F_CAT) {
                            alias = 1;
                        } else {
                            alias = g->t_bytes[tid] == g->t_bytes[out_tid];
                            push(s, &s->aliases, tid);
                            push(s, &s->aliases, out_tid);
                            push(s, &s->aliases, alias);
                        }
                    }
                    int64_t rec = alias ? out_grad : new_grad(s, g->t_bytes[tid], name, module, 4 * tid + 1);
                    hand(s, tid, rec, alias, name, module);
                }
                if (g->ws[4 * i] >= 0 && (made_input || made_weight))
                    workspace(s, i, made_input && made_weight ? WS_BOTH : made_input ? WS_INPUT : WS_WEIGHT);
                for (int64_t k = 0; k < n_outs; k++) {
                    int64_t rec = s->grad[outs[k]];
                    s->grad[outs[k]] = -1;
                    drop(s, rec);
                }
            }
        }
        int64_t ended = g->function_end ? g->function_end[i] : -1;
        if (s->sbo_at[i] >= 0 && !(ended >= 0 && g->f_held[ended])) {     /* held ones: at finish */
            for (int64_t k = s->sbo_at[i]; k < s->sbo_at[i] + s->sbo_len[i]; k++) release(s, s->pool.v[k]);
            s->sbo_at[i] = -1;
        }
        if (g->n_regions && g->region_start[i] >= 0) {
            int64_t r = g->region_start[i];
            for (int64_t k = g->r_in_ptr[r]; k < g->r_in_ptr[r + 1]; k++) {
                int64_t sid = g->t_sid[g->r_in[k]];
                if (!g->s_param[sid] && s->holds[sid] > 0) release(s, sid);
            }
        }
    }
    free(outs);
    /* what is left: a graph input's gradient is handed to the caller, the rest dropped */
    int64_t *pairs = NULL;
    int64_t m = in_order(s->grad, s->grad_stamp, g->n_tensors, &pairs);
    if (m < 0) { s->failed = 1; return; }
    for (int64_t k = 0; k < m; k++) {
        int64_t tid = pairs[2 * k + 1], rec = s->grad[tid], role = g->t_role[tid];
        if (role >= 0 && s->role_grad[role] < 0) {
            s->role_grad[role] = rec;
            push(s, &s->input_grads, role);
            push(s, &s->input_grads, rec);
        } else {
            drop(s, rec);
        }
    }
    free(pairs);
}

/* Replayer.finish(): the saves no backward reached let go, then every storage still live freed,
   in the order it became live */
static void finish(Replay *s) {
    const Graph *g = s->g;
    for (int64_t i = 0; i < g->n_ops; i++) {
        if (s->sbo_at[i] < 0) continue;
        for (int64_t k = s->sbo_at[i]; k < s->sbo_at[i] + s->sbo_len[i]; k++) s->holds[s->pool.v[k]]--;
        s->sbo_at[i] = -1;
    }
    int64_t *pairs = NULL;
    int64_t m = in_order(s->live, s->live_stamp, g->n_storages, &pairs);
    if (m < 0) { s->failed = 1; return; }
    for (int64_t k = 0; k < m; k++) {
        int64_t sid = pairs[2 * k + 1];
        free_record(s, s->live[sid]);
        s->live[sid] = -1;
    }
    free(pairs);
}

/* -- the interface ------------------------------------------------------------------------------ */

void vp_graph_free(Replay *s);

/* A replay of `g` (which must outlive it), its forward done: the graph's inputs allocated, then
   every op. NULL when memory ran out. */
Replay *vp_graph_forward(const Graph *g) {
    Replay *s = calloc(1, sizeof(Replay));
    if (!s) return NULL;
    s->g = g;
    s->rg = malloc((size_t)(g->n_tensors > 0 ? g->n_tensors : 1) * sizeof(int64_t));
    s->grad = filled(g->n_tensors, -1);
    s->grad_stamp = filled(g->n_tensors, 0);
    s->live = filled(g->n_storages, -1);
    s->live_stamp = filled(g->n_storages, 0);
    s->holds = filled(g->n_storages, 0);
    s->alive = filled(g->n_storages, 0);
    s->is_input = filled(g->n_storages, 0);
    s->fresh = filled(g->n_storages, 0);
    s->sbo_at = filled(g->n_ops, -1);
    s->sbo_len = filled(g->n_ops, 0);
    s->param_grad = filled(g->n_params, -1);
    s->role_grad = filled(g->n_roles, -1);
    if (!s->rg || !s->grad || !s->grad_stamp || !s->live || !s->live_stamp || !s->holds || !s->alive ||
        !s->is_input || !s->fresh || !s->sbo_at || !s->sbo_len || !s->param_grad || !s->role_grad ||
        grow_records(s) < 0) {
        vp_graph_free(s);
        return NULL;
    }
    /* which tensors require grad: trainable floating parameters, and the inputs whose role says so */
    for (int64_t t = 0; t < g->n_tensors; t++) {
        int64_t p = g->t_param[t], role = g->t_role[t];
        s->rg[t] = p >= 0 ? g->trainable[p] && g->t_float[t] : 0;
        if (role >= 0) s->rg[t] = g->role_rg[role];
    }
    /* free lists by op (a counting sort: storage order within an op) */
    s->free_ptr = filled(g->n_ops + 1, 0);
    s->free_sid = filled(g->n_storages, 0);
    if (!s->free_ptr || !s->free_sid) { vp_graph_free(s); return NULL; }
    for (int64_t sid = 0; sid < g->n_storages; sid++)
        if (g->s_free[sid] >= 0 && g->s_alloc[sid] != -2) s->free_ptr[g->s_free[sid] + 1]++;
    for (int64_t i = 0; i < g->n_ops; i++) s->free_ptr[i + 1] += s->free_ptr[i];
    {
        int64_t *at = filled(g->n_ops + 1, 0);
        if (!at) { vp_graph_free(s); return NULL; }
        memcpy(at, s->free_ptr, (size_t)(g->n_ops + 1) * sizeof(int64_t));
        for (int64_t sid = 0; sid < g->n_storages; sid++)
            if (g->s_free[sid] >= 0 && g->s_alloc[sid] != -2) s->free_sid[at[g->s_free[sid]]++] = sid;
        free(at);
    }
    for (int64_t sid = 0; sid < g->n_storages; sid++) {
        if (g->s_alloc[sid] != -1 || g->s_param[sid]) continue;
        set_live(s, sid, alloc_record(s, g->s_bytes[sid], CAT_INPUTS, OP_NONE, -1, 4 * sid));
        s->alive[sid] = 1;
        s->is_input[sid] = 1;
    }
    forward_ops(s, 0, g->n_ops - 1, 0);
    if (s->failed) { vp_graph_free(s); return NULL; }
    return s;
}

/* The backward and finish of a replay whose forward is done; 0, or -1 when memory ran out. */
int vp_graph_backward(Replay *s) {
    backward(s);
    if (!s->failed) finish(s);
    return s->failed ? -1 : 0;
}

/* The counts: records, clock events, workspaces, aliases, saved_from, param grads, input grads. */
void vp_graph_counts(const Replay *s, int64_t *out) {
    out[0] = s->n;
    out[1] = s->now;
    out[2] = s->workspaces.len / 3;
    out[3] = s->aliases.len / 3;
    out[4] = s->saved_from.len / 2;
    out[5] = s->param_grads.len / 2;
    out[6] = s->input_grads.len / 2;
}

/* Copy column `which` out (as many values as the counts say): 0 nbytes, 1 alloc_at, 2 free_at
   (NEVER: not freed yet), 3 category (as cat_code numbers it), 4 phase (0 forward, 1 backward), 5 module, 6 op, 7 saved,
   8 source (4*sid, 4*tid+1, 4*workspace+2, 4*record+3: a copy of that record), 9 the workspaces
   log, 10 aliases, 11 saved_from, 12 param grads, 13 input grads. */
void vp_graph_copy(const Replay *s, int64_t which, int64_t *dest) {
    const int64_t *columns[] = {s->nbytes, s->alloc_at, s->free_at, s->cat, s->rphase, s->module, s->op, s->saved,
                                s->source};
    const Vec *logs[] = {&s->workspaces, &s->aliases, &s->saved_from, &s->param_grads, &s->input_grads};
    if (which == 3) {
        for (int64_t i = 0; i < s->n; i++) dest[i] = s->g->cat_code[s->cat[i]];
    } else if (which < 9) {
        if (s->n) memcpy(dest, columns[which], (size_t)s->n * sizeof(int64_t));
    } else if (which < 14) {
        const Vec *v = logs[which - 9];
        if (v->len) memcpy(dest, v->v, (size_t)v->len * sizeof(int64_t));
    }
}

void vp_graph_free(Replay *s) {
    if (!s) return;
    int64_t *columns[] = {s->nbytes, s->alloc_at, s->free_at, s->cat, s->rphase, s->module, s->op, s->saved,
                          s->source, s->refs, s->rg, s->grad, s->grad_stamp, s->live, s->live_stamp, s->holds,
                          s->alive, s->is_input, s->fresh, s->sbo_at, s->sbo_len, s->param_grad, s->role_grad,
                          s->free_ptr, s->free_sid};
    for (size_t k = 0; k < sizeof(columns) / sizeof(columns[0]); k++) free(columns[k]);
    Vec *vecs[] = {&s->pool, &s->fresh_list, &s->temps, &s->workspaces, &s->aliases, &s->saved_from,
                   &s->param_grads, &s->input_grads};
    for (size_t k = 0; k < sizeof(vecs) / sizeof(vecs[0]); k++) free(vecs[k]->v);
    free(s);
}
