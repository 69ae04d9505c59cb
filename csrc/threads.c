/* threads.c — a small persistent pthread pool for the GEMM.
 *
 * One parallel region runs at a time: the caller hands out task indices through an atomic
 * counter and works on them too. A second caller (another Python thread, the GIL being released)
 * does not wait for the pool: it runs its tasks serially, so there is no deadlock and no
 * oversubscription. Workers start lazily and are re-created after fork() (the child has none).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "sasq.h"

#define MAX_THREADS 256

static pthread_mutex_t region_lock = PTHREAD_MUTEX_INITIALIZER; /* one region at a time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;          /* guards the fields below */
static pthread_cond_t cv_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t cv_done = PTHREAD_COND_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static int n_threads = 1;  /* requested size, caller included */
static int n_workers = 0;  /* workers actually running */
static pthread_t workers[MAX_THREADS];
static uint64_t generation = 0;
static int stopping = 0;
static int active = 0;     /* workers still inside the current job */

static sasq_task_fn job_fn;
static void *job_ctx;
static int64_t job_ntasks;
static atomic_llong next_task;
static int job_helpers;            /* workers allowed to join the current job */
static atomic_int joined;          /* workers that asked to join it */

static void run_tasks(sasq_task_fn fn, void *ctx, int64_t ntasks) {
    for (;;) {
        int64_t t = atomic_fetch_add(&next_task, 1);
        if (t >= ntasks) break;
        fn(ctx, t);
    }
}

/* arg = the generation at creation: a worker that gets scheduled only after the next job was
 * posted must still see that job as new. */
static void *worker_main(void *arg) {
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (generation == seen && !stopping) pthread_cond_wait(&cv_work, &mu);
        if (stopping) break;
        seen = generation;
        sasq_task_fn fn = job_fn;
        void *ctx = job_ctx;
        int64_t nt = job_ntasks;
        int helpers = job_helpers;
        pthread_mutex_unlock(&mu);
        if (atomic_fetch_add(&joined, 1) < helpers) run_tasks(fn, ctx, nt);
        pthread_mutex_lock(&mu);
        if (--active == 0) pthread_cond_signal(&cv_done);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* In a forked child the workers do not exist: forget them (locks are re-initialised). */
static void after_fork_child(void) {
    pthread_mutex_t m0 = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c0 = PTHREAD_COND_INITIALIZER;
    region_lock = m0;
    mu = m0;
    cv_work = c0;
    cv_done = c0;
    n_workers = 0;
    stopping = 0;
    active = 0;
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

/* Caller holds region_lock. */
static void stop_workers(void) {
    pthread_mutex_lock(&mu);
    stopping = 1;
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < n_workers; i++) pthread_join(workers[i], NULL);
    pthread_mutex_lock(&mu);
    stopping = 0;
    n_workers = 0;
    pthread_mutex_unlock(&mu);
}

/* Caller holds region_lock. */
static void start_workers(void) {
    pthread_once(&atfork_once, register_atfork);
    while (n_workers < n_threads - 1) {
        if (pthread_create(&workers[n_workers], NULL, worker_main, (void *)(uintptr_t)generation) != 0) break;
        n_workers++;
    }
}

int sasq_set_num_threads(int n) {
    if (n < 1 || n > MAX_THREADS) return -1;
    pthread_mutex_lock(&region_lock);
    if (n != n_threads) {
        stop_workers();
        n_threads = n;
    }
    pthread_mutex_unlock(&region_lock);
    return 0;
}

int sasq_get_num_threads(void) { return n_threads; }

void sasq_parallel_for(int64_t ntasks, sasq_task_fn fn, void *ctx) {
    sasq_parallel_for_max(ntasks, fn, ctx, 0);
}

void sasq_parallel_for_max(int64_t ntasks, sasq_task_fn fn, void *ctx, int max_threads) {
    if (ntasks <= 0) return;
    if (max_threads <= 0 || max_threads > n_threads) max_threads = n_threads;
    if (ntasks == 1 || max_threads == 1 || pthread_mutex_trylock(&region_lock) != 0) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    start_workers();
    pthread_mutex_lock(&mu);
    job_fn = fn;
    job_ctx = ctx;
    job_ntasks = ntasks;
    job_helpers = max_threads - 1;
    atomic_store(&joined, 0);
    atomic_store(&next_task, 0);
    active = n_workers;
    generation++;
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);

    run_tasks(fn, ctx, ntasks);

    pthread_mutex_lock(&mu);
    while (active > 0) pthread_cond_wait(&cv_done, &mu);
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&region_lock);
}
