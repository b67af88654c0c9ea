/* The caching allocator's replay (allocator.py), the live-bytes curve and the compositions at
   chosen events (timeline.py), in C.

   The same rules, in the same order, as `replay_allocator` and `peak_live_bytes` in Python,
   which stay the reference: tests/test_native.py replays both over random
   and real timelines and wants the same numbers. Compiled on first use by native.py; when no C
   compiler is found, the Python versions run instead. Why: `fit` replays the allocator over
   every candidate it estimates, some 110 000 events for an SDXL step, and that replay was a
   third of an SDXL search. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIB (1LL << 20)
#define NEVER INT64_MIN          /* free_at of a record never freed */
#define K_MIN_BLOCK 512LL
#define K_SMALL_SIZE MIB
#define K_SMALL_BUFFER (2 * MIB)
#define K_LARGE_BUFFER (20 * MIB)
#define K_MIN_LARGE_ALLOC (10 * MIB)
#define K_ROUND_LARGE (2 * MIB)
#define LARGE_TOP (1LL << 60)   /* large segments at falling addresses: see estimate/allocator.py */

typedef struct {
    int64_t addr, size;
    int64_t segment;
    int64_t prev, next;     /* block indexes, -1: none */
    int8_t free, small;
} Block;

typedef struct {            /* a free block in a pool, ordered by (size, addr) */
    int64_t size, addr, block;
} Entry;

typedef struct {            /* one size class of a pool: its free blocks, sorted */
    Entry *items;
    int64_t len, cap;
} Bucket;

/* A pool's free blocks ordered by (size, addr), as the Python allocator's sorted list, kept in
   buckets by size class (`size_class`: four per power of two): every size in a bucket is below
   every size in the next, so the order across buckets is the pool's order. Why: one sorted array
   meant moving half of it on every insert and removal, most of the replay's time (an SDXL step:
   some 8 million entries moved); an insert or removal now moves part of one size class only
   (some 400 000 entries for that step; 880 000 with one class per power of two). */
#define N_BUCKETS 256
typedef struct {
    Bucket buckets[N_BUCKETS];
} Pool;

typedef struct {
    Block *blocks;
    int64_t n_blocks, cap_blocks;
    Pool pools[2];          /* [1]: small, [0]: large */
    int64_t reserved, peak_reserved, allocated, peak_allocated, next_addr, large_top, segments;
    int failed;
} Allocator;

static int64_t allocation_size(int64_t size) {
    if (size <= K_SMALL_SIZE) return K_SMALL_BUFFER;
    if (size < K_MIN_LARGE_ALLOC) return K_LARGE_BUFFER;
    return (size + K_ROUND_LARGE - 1) / K_ROUND_LARGE * K_ROUND_LARGE;
}

/* floor(log2(size)) and the two bits after the leading one: four classes per power of two,
   monotone in the size (sizes being at least 512) */
static int size_class(int64_t size) {
#if defined(__GNUC__) || defined(__clang__)
    int log2 = 63 - __builtin_clzll((unsigned long long)size);
#else
    int log2 = 0;
    while (log2 < 62 && (size >> (log2 + 1)) > 0) log2++;
#endif
    return (log2 << 2) | (int)((size >> (log2 - 2)) & 3);
}

static int less(int64_t size_a, int64_t addr_a, int64_t size_b, int64_t addr_b) {
    return size_a < size_b || (size_a == size_b && addr_a < addr_b);
}

/* first entry of the bucket not less than (size, addr): bisect_left */
static int64_t lower_bound(const Bucket *bucket, int64_t size, int64_t addr) {
    int64_t lo = 0, hi = bucket->len;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (less(bucket->items[mid].size, bucket->items[mid].addr, size, addr)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void pool_insert(Allocator *a, Pool *pool, int64_t block) {
    Block *b = &a->blocks[block];
    Bucket *bucket = &pool->buckets[size_class(b->size)];
    if (bucket->len == bucket->cap) {
        int64_t cap = bucket->cap ? bucket->cap * 2 : 64;
        Entry *items = realloc(bucket->items, (size_t)cap * sizeof(Entry));
        if (!items) { a->failed = 1; return; }
        bucket->items = items;
        bucket->cap = cap;
    }
    int64_t i = lower_bound(bucket, b->size, b->addr);
    memmove(&bucket->items[i + 1], &bucket->items[i], (size_t)(bucket->len - i) * sizeof(Entry));
    bucket->items[i].size = b->size;
    bucket->items[i].addr = b->addr;
    bucket->items[i].block = block;
    bucket->len++;
}

static void bucket_remove_at(Bucket *bucket, int64_t i) {
    memmove(&bucket->items[i], &bucket->items[i + 1], (size_t)(bucket->len - i - 1) * sizeof(Entry));
    bucket->len--;
}

static void pool_remove(Pool *pool, const Block *b) {
    Bucket *bucket = &pool->buckets[size_class(b->size)];
    bucket_remove_at(bucket, lower_bound(bucket, b->size, b->addr));
}

/* The pool's first free block of at least `size` bytes (the smallest, then the lowest address),
   taken out of it; -1 when there is none. */
static int64_t pool_take(Pool *pool, int64_t size) {
    int k = size_class(size);
    Bucket *bucket = &pool->buckets[k];
    int64_t i = lower_bound(bucket, size, -1);
    if (i >= bucket->len) {
        for (bucket = NULL, k++; k < N_BUCKETS; k++) {
            if (pool->buckets[k].len) { bucket = &pool->buckets[k]; break; }
        }
        if (!bucket) return -1;
        i = 0;
    }
    int64_t block = bucket->items[i].block;
    bucket_remove_at(bucket, i);
    return block;
}

static void pool_free(Pool *pool) {
    for (int k = 0; k < N_BUCKETS; k++) free(pool->buckets[k].items);
}

static int64_t new_block(Allocator *a, int64_t addr, int64_t size, int64_t segment, int8_t small,
                         int8_t free, int64_t prev, int64_t next) {
    if (a->n_blocks == a->cap_blocks) {
        int64_t cap = a->cap_blocks ? a->cap_blocks * 2 : 1024;
        Block *blocks = realloc(a->blocks, (size_t)cap * sizeof(Block));
        if (!blocks) { a->failed = 1; return -1; }
        a->blocks = blocks;
        a->cap_blocks = cap;
    }
    Block *b = &a->blocks[a->n_blocks];
    b->addr = addr; b->size = size; b->segment = segment; b->small = small; b->free = free;
    b->prev = prev; b->next = next;
    return a->n_blocks++;
}

static int64_t do_malloc(Allocator *a, int64_t nbytes) {
    int64_t size = nbytes < K_MIN_BLOCK ? K_MIN_BLOCK : (nbytes + K_MIN_BLOCK - 1) / K_MIN_BLOCK * K_MIN_BLOCK;
    int8_t small = size <= K_SMALL_SIZE;
    Pool *pool = &a->pools[small];
    int64_t block = pool_take(pool, size);
    if (block < 0) {
        int64_t seg_size = allocation_size(size);
        a->segments++;
        int64_t addr = small ? a->next_addr : a->large_top - seg_size;
        block = new_block(a, addr, seg_size, a->segments, small, 1, -1, -1);
        if (block < 0) return -1;
        if (small) a->next_addr += seg_size;
        else a->large_top -= seg_size;
        a->reserved += seg_size;
        if (a->reserved > a->peak_reserved) a->peak_reserved = a->reserved;
    }
    int64_t remaining = a->blocks[block].size - size;
    if ((small && remaining >= K_MIN_BLOCK) || (!small && remaining > K_SMALL_SIZE)) {
        Block *b = &a->blocks[block];
        int64_t rest = new_block(a, b->addr + size, remaining, b->segment, small, 1, block, b->next);
        if (rest < 0) return -1;
        b = &a->blocks[block];                      /* new_block may have moved the array */
        if (b->next >= 0) a->blocks[b->next].prev = rest;
        b->next = rest;
        b->size = size;
        pool_insert(a, pool, rest);
    }
    Block *b = &a->blocks[block];
    b->free = 0;
    a->allocated += b->size;
    if (a->allocated > a->peak_allocated) a->peak_allocated = a->allocated;
    return block;
}

static void do_free(Allocator *a, int64_t block) {
    Block *b = &a->blocks[block];
    int8_t small = b->small;
    Pool *pool = &a->pools[small];
    b->free = 1;
    a->allocated -= b->size;
    int64_t prev = b->prev, next = b->next;
    if (prev >= 0 && a->blocks[prev].free && a->blocks[prev].segment == b->segment) {
        Block *p = &a->blocks[prev];
        pool_remove(pool, p);
        p->size += b->size;
        p->next = next;
        if (next >= 0) a->blocks[next].prev = prev;
        block = prev;
        b = p;
    }
    if (next >= 0 && a->blocks[next].free && a->blocks[next].segment == b->segment) {
        Block *n = &a->blocks[next];
        pool_remove(pool, n);
        b->size += n->size;
        b->next = n->next;
        if (n->next >= 0) a->blocks[n->next].prev = block;
    }
    pool_insert(a, pool, block);
}

static int radix_sort(uint64_t *keys, uint64_t *tmp, int64_t n, uint64_t max_key) {
    int64_t *count = malloc(65537 * sizeof(int64_t));
    if (!count) return -1;
    for (int shift = 0; shift < 64 && (max_key >> shift); shift += 16) {
        memset(count, 0, 65537 * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) count[((keys[i] >> shift) & 0xFFFF) + 1]++;
        for (int k = 0; k < 65536; k++) count[k + 1] += count[k];
        for (int64_t i = 0; i < n; i++) tmp[count[(keys[i] >> shift) & 0xFFFF]++] = keys[i];
        memcpy(keys, tmp, (size_t)n * sizeof(uint64_t));
    }
    free(count);
    return 0;
}

/* The keys sorted, where each key is (bucket << shift) | low and the keys were made in
   ascending order of `low` within each bucket: a stable counting sort by bucket then gives the
   sorted order, in one pass over the keys and one over the buckets, where the buckets are few
   (a step's clock: one event per allocation or free, so about as many buckets as keys); a radix
   sort otherwise (the distributed rewrite's sparse events). */
static int sort_keys(uint64_t *keys, uint64_t *tmp, int64_t n, uint64_t max_key, int shift) {
    uint64_t buckets = (max_key >> shift) + 1;
    if (buckets > (uint64_t)(4 * n + 65536)) return radix_sort(keys, tmp, n, max_key);
    int64_t *start = calloc((size_t)buckets + 1, sizeof(int64_t));
    if (!start) return -1;
    for (int64_t i = 0; i < n; i++) start[(keys[i] >> shift) + 1]++;
    for (uint64_t b = 0; b < buckets; b++) start[b + 1] += start[b];
    for (int64_t i = 0; i < n; i++) tmp[start[keys[i] >> shift]++] = keys[i];
    memcpy(keys, tmp, (size_t)n * sizeof(uint64_t));
    free(start);
    return 0;
}

/* The lowest and highest event of the records (those of more than 0 bytes only, when
   `skip_empty`) into *lo and *hi; *lo > *hi when there is none. */
static void event_range(int64_t n, const int64_t *nbytes, const int64_t *alloc_at, const int64_t *free_at,
                        int skip_empty, int64_t *lo, int64_t *hi) {
    *lo = INT64_MAX;
    *hi = INT64_MIN;
    for (int64_t i = 0; i < n; i++) {
        if (skip_empty && nbytes[i] <= 0) continue;
        if (alloc_at[i] < *lo) *lo = alloc_at[i];
        if (alloc_at[i] > *hi) *hi = alloc_at[i];
        if (free_at[i] != NEVER) {
            if (free_at[i] < *lo) *lo = free_at[i];
            if (free_at[i] > *hi) *hi = free_at[i];
        }
    }
}

/* Replay the allocator over n records (free_at NEVER: never freed), in event order: at one event,
   frees before allocations, each in record order. out: peak reserved, reserved, peak allocated,
   allocated, segments. Returns 0; -1 when memory ran out, -2 when the events span too wide a
   range for the sort keys (the caller falls back to Python). */
int vp_replay_allocator(int64_t n, const int64_t *nbytes, const int64_t *alloc_at,
                        const int64_t *free_at, int64_t *out) {
    int shift = 0;
    while (((int64_t)1 << shift) <= (n > 0 ? n : 1)) shift++;     /* int.bit_length() */
    int64_t lo, hi;
    event_range(n, nbytes, alloc_at, free_at, 1, &lo, &hi);
    if (lo <= hi && (uint64_t)(hi - lo) >= ((uint64_t)1 << (61 - shift))) return -2;
    uint64_t *keys = malloc((size_t)(2 * n + 1) * sizeof(uint64_t));
    uint64_t *tmp = malloc((size_t)(2 * n + 1) * sizeof(uint64_t));
    int64_t *live = malloc((size_t)(n + 1) * sizeof(int64_t));
    Allocator a;
    memset(&a, 0, sizeof(a));
    a.large_top = LARGE_TOP;
    int status = -1;
    if (!keys || !tmp || !live) goto done;
    int64_t m = 0;
    uint64_t max_key = 0;
    for (int64_t i = 0; i < n; i++) {
        live[i] = -1;
        if (nbytes[i] <= 0) continue;
        keys[m] = (((((uint64_t)(alloc_at[i] - lo)) << 1) | 1) << shift) | (uint64_t)i;
        if (keys[m] > max_key) max_key = keys[m];
        m++;
        if (free_at[i] != NEVER) {
            keys[m] = ((((uint64_t)(free_at[i] - lo)) << 1) << shift) | (uint64_t)i;
            if (keys[m] > max_key) max_key = keys[m];
            m++;
        }
    }
    if (sort_keys(keys, tmp, m, max_key, shift) < 0) goto done;
    uint64_t mask = ((uint64_t)1 << shift) - 1;
    for (int64_t k = 0; k < m; k++) {
        int64_t i = (int64_t)(keys[k] & mask);
        if ((keys[k] >> shift) & 1) {
            live[i] = do_malloc(&a, nbytes[i]);
            if (live[i] < 0) goto done;
        } else if (live[i] >= 0) {
            do_free(&a, live[i]);
            live[i] = -1;
        }
        if (a.failed) goto done;
    }
    out[0] = a.peak_reserved;
    out[1] = a.reserved;
    out[2] = a.peak_allocated;
    out[3] = a.allocated;
    out[4] = a.segments;
    status = 0;
done:
    free(keys);
    free(tmp);
    free(live);
    free(a.blocks);
    pool_free(&a.pools[0]);
    pool_free(&a.pools[1]);
    return status;
}

/* The live-bytes curve of timeline._live_curve: the events some record touches, ascending, into
   events (when not NULL), the bytes live before the first (`base`) and after each into lives
   (when not NULL), and the most of those into *peak. Events may be sparse or negative. Returns
   how many events; -1 when memory ran out, -2 when they span too wide a range. */
static int64_t live_sweep(int64_t n, const int64_t *nbytes, const int64_t *alloc_at, const int64_t *free_at,
                          int64_t base, int64_t *events, int64_t *lives, int64_t *peak,
                          int64_t n_cuts, const int64_t *cuts, int64_t *peaks) {
    int shift = 0;
    while (((int64_t)1 << shift) <= 2 * n + 1) shift++;
    int64_t lo, hi;
    event_range(n, nbytes, alloc_at, free_at, 0, &lo, &hi);
    *peak = base;
    if (lo > hi) return 0;
    if ((uint64_t)(hi - lo) >= ((uint64_t)1 << (62 - shift))) return -2;
    uint64_t *keys = malloc((size_t)(2 * n + 1) * sizeof(uint64_t));
    uint64_t *tmp = malloc((size_t)(2 * n + 1) * sizeof(uint64_t));
    int64_t m = -1;
    if (!keys || !tmp) goto done;
    int64_t k = 0;
    uint64_t max_key = 0;
    for (int64_t i = 0; i < n; i++) {       /* entry 2i: the allocation, 2i + 1: the free */
        keys[k] = ((uint64_t)(alloc_at[i] - lo) << shift) | (uint64_t)(2 * i);
        if (keys[k] > max_key) max_key = keys[k];
        k++;
        if (free_at[i] != NEVER) {
            keys[k] = ((uint64_t)(free_at[i] - lo) << shift) | (uint64_t)(2 * i + 1);
            if (keys[k] > max_key) max_key = keys[k];
            k++;
        }
    }
    if (sort_keys(keys, tmp, k, max_key, shift) < 0) goto done;
    uint64_t mask = ((uint64_t)1 << shift) - 1;
    int64_t live = base, best = base;
    m = 0;
    if (lives) lives[0] = base;
    for (int64_t j = 0; j < k;) {
        uint64_t event = keys[j] >> shift;
        for (; j < k && (keys[j] >> shift) == event; j++) {
            uint64_t entry = keys[j] & mask;
            live += (entry & 1) ? -nbytes[entry >> 1] : nbytes[entry >> 1];
        }
        if (events) events[m] = (int64_t)event + lo;
        m++;
        if (lives) lives[m] = live;
        if (live > best) best = live;
        if (peaks) {
            int64_t e = (int64_t)event + lo, section = 0;
            while (section < n_cuts && e >= cuts[section]) section++;
            if (live > peaks[section]) peaks[section] = live;
        }
    }
    *peak = best;
done:
    free(keys);
    free(tmp);
    return m;
}

int64_t vp_live_curve(int64_t n, const int64_t *nbytes, const int64_t *alloc_at, const int64_t *free_at,
                      int64_t base, int64_t *events, int64_t *lives, int64_t *peak) {
    return live_sweep(n, nbytes, alloc_at, free_at, base, events, lives, peak, 0, NULL, NULL);
}

/* distributed/floor.py: the most bytes live after any event of each section the n_cuts
   ascending cuts make (section j: cuts[j-1] <= event < cuts[j]), from 0, into peaks[0..n_cuts]
   (the caller zeroes them). Returns what vp_live_curve returns. */
int64_t vp_live_peaks(int64_t n, const int64_t *nbytes, const int64_t *alloc_at, const int64_t *free_at,
                      int64_t n_cuts, const int64_t *cuts, int64_t *peaks) {
    int64_t peak;
    return live_sweep(n, nbytes, alloc_at, free_at, 0, NULL, NULL, &peak, n_cuts, cuts, peaks);
}

/* timeline.compositions_at: for each of the k ascending target events, the bytes of the records
   alive at it (alloc_at <= t < free_at, free_at NEVER: never freed) summed by category code
   (0..n_codes-1) into sums[t * n_codes + code], and the first such record's index into
   first[t * n_codes + code] (-1: none), so that the caller keeps the categories in the order
   records first show them. */
void vp_compositions(int64_t n, const int64_t *nbytes, const int64_t *alloc_at, const int64_t *free_at,
                     const int64_t *codes, int64_t k, const int64_t *targets, int64_t n_codes,
                     int64_t *sums, int64_t *first) {
    for (int64_t j = 0; j < k * n_codes; j++) { sums[j] = 0; first[j] = -1; }
    if (k <= 0) return;
    int64_t last = targets[k - 1];
    for (int64_t i = 0; i < n; i++) {
        int64_t a = alloc_at[i], f = free_at[i];
        if (a > last) continue;
        int64_t lo = 0, hi = k;            /* first target at or after the allocation */
        while (lo < hi) {
            int64_t mid = (lo + hi) >> 1;
            if (targets[mid] < a) lo = mid + 1; else hi = mid;
        }
        for (int64_t t = lo; t < k && (f == NEVER || targets[t] < f); t++) {
            int64_t j = t * n_codes + codes[i];
            sums[j] += nbytes[i];
            if (first[j] < 0) first[j] = i;
        }
    }
}

/* distributed/rewrite.py: events times `scale` (free events NEVER stay NEVER), in place. */
void vp_scale(int64_t n, int64_t *alloc_at, int64_t *free_at, int64_t scale) {
    for (int64_t i = 0; i < n; i++) {
        alloc_at[i] *= scale;
        if (free_at[i] != NEVER) free_at[i] *= scale;
    }
}

/* distributed/rewrite.py: the entries of `column` whose `dropped` byte is 0, moved to its front
   in order; returns how many. */
int64_t vp_keep(int64_t n, const unsigned char *dropped, int64_t *column) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!dropped[i]) column[k++] = column[i];
    }
    return k;
}

/* record_log.Rows.of_category: the indices i with codes[i] == code, ascending, into out; returns
   how many. */
int64_t vp_indices_of(int64_t n, const int64_t *codes, int64_t code, int64_t *out) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        if (codes[i] == code) out[k++] = i;
    }
    return k;
}

/* distributed/floor.py: nbytes[i] set to 0 where bit codes[i] of `drop_codes` is set, or where
   codes[i] is `window_code` and alloc_at[i] lies in one of the k windows [lo[j], hi[j]). */
void vp_zero_where(int64_t n, int64_t *nbytes, const int64_t *codes, const int64_t *alloc_at,
                   int64_t drop_codes, int64_t window_code, int64_t k, const int64_t *lo, const int64_t *hi) {
    for (int64_t i = 0; i < n; i++) {
        int64_t c = codes[i];
        if (c >= 0 && c < 63 && ((drop_codes >> c) & 1)) {
            nbytes[i] = 0;
        } else if (c == window_code) {
            for (int64_t j = 0; j < k; j++) {
                if (lo[j] <= alloc_at[i] && alloc_at[i] < hi[j]) { nbytes[i] = 0; break; }
            }
        }
    }
}

/* record_log.Shifted: rows placed on a clock. out_alloc = alloc_at + offset; out_free = free_at +
   offset, or NEVER where the row is never freed or (has_limit) freed after `limit`. */
void vp_shift(int64_t n, const int64_t *alloc_at, const int64_t *free_at, int64_t offset, int64_t has_limit,
              int64_t limit, int64_t *out_alloc, int64_t *out_free) {
    for (int64_t i = 0; i < n; i++) {
        int64_t f = free_at[i];
        out_alloc[i] = alloc_at[i] + offset;
        out_free[i] = (f == NEVER || (has_limit && f > limit)) ? NEVER : f + offset;
    }
}
