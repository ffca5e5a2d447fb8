"""Multi-host (multi-controller) runs on localhost, for tests: N processes, each with its own CPU devices,
joined by jax.distributed into one global mesh (gloo collectives). The same code runs on N GPU hosts.

    python -m model.multihost --processes 2 --devices-per-process 4 --mesh expert=8 --out logits.npy

Each worker builds the tiny model from the same seed, shards it over the global mesh, runs prefill and two
greedy decode steps, and process 0 writes the gathered logits.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from model.cache import init_cache
from model.config import TINY
from model.forward import decode_step, prefill
from model.params import init
from model.placement import shard_cache, shard_params
from sharding.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def launch(n_proc: int, devices_per_process: int, mesh: str, out: Path, seed: int = 11, timeout: float = 300,
           port: int | None = None):
    """Start n_proc workers on localhost and wait for them.

    Fails fast: a taken port is refused before anything starts; as soon as any worker fails, the others are
    stopped and the error names the worker, its exit status and the tail of its stderr; no worker outlives the
    call (timeout included). port: the coordinator's (default: a free one)."""
    if port is None:
        port = free_port()
    elif port_in_use(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is already in use: the coordinator could not listen there "
                           f"(choose another, or leave the port out for a free one)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    # stderr into files, not pipes: a worker that writes much never blocks on a pipe nobody reads yet
    logs = [tempfile.TemporaryFile("w+") for _ in range(n_proc)]
    procs = []
    try:
        for i in range(n_proc):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "model.multihost", "--worker", str(i), "--processes", str(n_proc), "--port",
                 str(port), "--mesh", mesh, "--out", str(out), "--seed", str(seed)],
                env=env, stdout=subprocess.DEVNULL, stderr=logs[i], text=True, cwd=ROOT))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                raise RuntimeError("\n".join(_report(i, codes[i], logs[i]) for i in failed))
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                running = [i for i, c in enumerate(codes) if c is None]
                raise RuntimeError(f"multi-host workers {running} still running after {timeout} s; stopped")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for f in logs:
            f.close()


def _report(i: int, code: int, log) -> str:
    log.seek(0)
    tail = "\n".join(line for line in log.read().splitlines() if "Gloo" not in line)[-3000:]
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return f"multi-host worker {i} {how} (the others were stopped):\n{tail}"


def reference_run(params, cfg, mesh=None):
    """Prefill + two greedy decode steps on fixed tokens; returns stacked logits [3, B, V] (numpy)."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 16)).astype(np.int32)
    cache = init_cache(cfg, 2, 32)
    if mesh is not None:
        cache = shard_cache(cache, mesh)
    out = []
    logits, cache = prefill(params, cache, tokens, np.array([16, 11]), cfg=cfg, mesh=mesh)
    for _ in range(3):
        full = _gather(logits)
        out.append(full)
        if len(out) == 3:
            break
        logits, cache = decode_step(params, cache, full.argmax(-1).astype(np.int32), cfg=cfg, mesh=mesh)
    return np.stack(out)


def _gather(x):
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _worker(args):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.worker)
    cfg = TINY
    mesh = make_mesh(args.mesh)
    params = shard_params(init(cfg, jax.random.key(args.seed), std="fan_in"), cfg, mesh)
    logits = reference_run(params, cfg, mesh)
    if jax.process_index() == 0:
        np.save(args.out, logits)
    jax.distributed.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=4)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mesh", default="expert=8")
    ap.add_argument("--out", default="multihost_logits.npy")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    if args.worker is None:
        try:
            launch(args.processes, args.devices_per_process, args.mesh, Path(args.out), args.seed,
                   port=args.port or None)
        except RuntimeError as e:
            sys.exit(f"multihost: error: {e}")
        print(f"wrote {args.out}")
    else:
        _worker(args)


if __name__ == "__main__":
    main()
