#!/usr/bin/env python3
"""Peer indexes for facematch's index harness (examples/index_harness.rs).

Builds hnswlib 0.8.0 HNSW, faiss-cpu 1.15.1 IndexHNSWFlat and IndexFlatIP on the
gallery written by the harness (gallery.npy, queries.npy in --dir), with the same
M / ef_construction / ef list / thread counts, and prints one JSON object per
(backend, ef, threads) on stdout. Result ids and scores of each (backend, ef) are
written as .npy files in --dir so the harness scores every backend with the same
code. Progress goes to stderr.

QPS: hnswlib and faiss HNSW get all queries in one call with the thread count
set (each query is searched on its own by one thread: the same work as the
harness's per-query rayon loop, without Python overhead per query). faiss
IndexFlatIP searches the whole batch with BLAS ("batch" mode, as the anchors).
"""
import argparse
import gc
import json
import os
import resource
import sys
import time

import numpy as np


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def log(*a):
    print("[peers]", *a, file=sys.stderr, flush=True)


def timed_search(fn, nq, min_secs):
    """Run fn() (one pass over all queries) until min_secs elapsed; returns (first result, qps)."""
    t0 = time.perf_counter()
    first = fn()
    passes = 1
    while time.perf_counter() - t0 < min_secs and passes < 1000:
        fn()
        passes += 1
    dt = time.perf_counter() - t0
    return first, passes * nq / dt


def emit(row):
    print(json.dumps(row), flush=True)


def save_results(d, backend, ef, ids, scores):
    tag = f"peer_{backend}_ef{ef if ef is not None else 'na'}"
    ids_path = os.path.join(d, tag + "_ids.npy")
    scores_path = os.path.join(d, tag + "_scores.npy")
    np.save(ids_path, np.ascontiguousarray(ids, dtype=np.int64))
    np.save(scores_path, np.ascontiguousarray(scores, dtype=np.float32))
    return ids_path, scores_path


def run_hnswlib(args, xb, xq):
    import hnswlib

    n, d = xb.shape
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=d)
    index.init_index(max_elements=n, M=args.m, ef_construction=args.efc, random_seed=100)
    index.add_items(xb, np.arange(n), num_threads=args.build_threads)
    build_s = time.perf_counter() - t0
    rss_delta = rss_bytes() - rss0
    try:
        index_bytes = int(index.index_file_size())
    except Exception:  # older bindings
        index_bytes = None
    log(f"hnswlib built in {build_s:.1f}s, rss +{rss_delta / 1e6:.0f} MB")
    for ef in args.ef:
        index.set_ef(max(ef, args.k))
        ids_path = scores_path = None
        for t in args.threads:
            (labels, dist), qps = timed_search(
                lambda: index.knn_query(xq, k=args.k, num_threads=t), len(xq), args.min_secs
            )
            if ids_path is None:
                ids_path, scores_path = save_results(args.dir, "hnswlib", ef, labels, 1.0 - dist)
            emit(dict(backend="hnswlib", mode="per-query", ef=ef, threads=t, build_s=build_s,
                      rss_delta_bytes=rss_delta, index_bytes=index_bytes, qps=qps,
                      ids=ids_path, scores=scores_path))
            log(f"hnswlib ef={ef} threads={t}: {qps:.0f} QPS")
    del index
    gc.collect()


def run_faiss_hnsw(args, xb, xq):
    import faiss

    n, d = xb.shape
    faiss.omp_set_num_threads(args.build_threads)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(d, args.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.efc
    index.add(xb)
    build_s = time.perf_counter() - t0
    rss_delta = rss_bytes() - rss0
    log(f"faiss_hnsw built in {build_s:.1f}s, rss +{rss_delta / 1e6:.0f} MB")
    for ef in args.ef:
        index.hnsw.efSearch = max(ef, args.k)
        ids_path = scores_path = None
        for t in args.threads:
            faiss.omp_set_num_threads(t)
            (scores, labels), qps = timed_search(lambda: index.search(xq, args.k), len(xq), args.min_secs)
            if ids_path is None:
                ids_path, scores_path = save_results(args.dir, "faiss_hnsw", ef, labels, scores)
            emit(dict(backend="faiss_hnsw", mode="per-query", ef=ef, threads=t, build_s=build_s,
                      rss_delta_bytes=rss_delta, index_bytes=None, qps=qps,
                      ids=ids_path, scores=scores_path))
            log(f"faiss_hnsw ef={ef} threads={t}: {qps:.0f} QPS")
    del index
    gc.collect()


def run_faiss_flat(args, xb, xq):
    import faiss

    n, d = xb.shape
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(d)
    index.add(xb)
    build_s = time.perf_counter() - t0
    rss_delta = rss_bytes() - rss0
    ids_path = scores_path = None
    for t in args.threads:
        faiss.omp_set_num_threads(t)
        (scores, labels), qps = timed_search(lambda: index.search(xq, args.k), len(xq), args.min_secs)
        if ids_path is None:
            ids_path, scores_path = save_results(args.dir, "faiss_flat", None, labels, scores)
        emit(dict(backend="faiss_flat", mode="batch", ef=None, threads=t, build_s=build_s,
                  rss_delta_bytes=rss_delta, index_bytes=n * d * 4, qps=qps,
                  ids=ids_path, scores=scores_path))
        log(f"faiss_flat threads={t}: {qps:.0f} QPS (batch of {len(xq)})")
    del index
    gc.collect()


RUNNERS = {"hnswlib": run_hnswlib, "faiss_hnsw": run_faiss_hnsw, "faiss_flat": run_faiss_flat}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="directory with gallery.npy and queries.npy")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--efc", type=int, default=200)
    p.add_argument("--ef", default="16,32,64,128,256")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--min-secs", type=float, default=1.0)
    p.add_argument("--backends", default="hnswlib,faiss_hnsw,faiss_flat")
    args = p.parse_args()
    args.ef = [int(x) for x in args.ef.split(",") if x]
    args.threads = [int(x) for x in args.threads.split(",") if x]
    xb = np.load(os.path.join(args.dir, "gallery.npy"), mmap_mode=None)
    xq = np.load(os.path.join(args.dir, "queries.npy"))
    if xb.dtype != np.float32 or xq.dtype != np.float32 or xb.ndim != 2 or xq.shape[1:] != xb.shape[1:]:
        sys.exit(f"index_peers: expected float32 (n, d) gallery and (q, d) queries, got {xb.dtype}{xb.shape}, {xq.dtype}{xq.shape}")
    xb = np.ascontiguousarray(xb)
    xq = np.ascontiguousarray(xq)
    log(f"gallery {xb.shape}, queries {xq.shape}")
    for name in [b for b in args.backends.split(",") if b]:
        if name not in RUNNERS:
            sys.exit(f"index_peers: unknown backend {name!r} (known: {', '.join(RUNNERS)})")
        try:
            RUNNERS[name](args, xb, xq)
        except ImportError as e:
            log(f"skipping {name}: {e} (run: bash scripts/setup.sh --with-peers)")


if __name__ == "__main__":
    main()
