"""sphere-fast: SPHERE's projection benchmarked, and sequential editing with it.

bench-projection   time the reference projection against sphere_fast on one layer
edit, train-lm, demo, models   the editing layer (sphere_fast.editing.cli); --model takes
                   a local Hugging Face directory, a .gguf file or a named model (smollm2)
"""
from __future__ import annotations

import argparse
import sys
import threading
import time


def _progress(label: str, stop: threading.Event) -> None:
    """A spinner with elapsed seconds on stderr while a long call runs."""
    start = time.perf_counter()
    marks = "|/-\\"
    i = 0
    while not stop.wait(0.5):
        sys.stderr.write(f"\r  {label} {marks[i % 4]} {time.perf_counter() - start:6.1f} s")
        sys.stderr.flush()
        i += 1
    sys.stderr.write("\r" + " " * (len(label) + 20) + "\r")


def _timed(label: str, fn, *, spinner: bool):
    stop = threading.Event()
    thread = None
    if spinner and sys.stderr.isatty():
        thread = threading.Thread(target=_progress, args=(label, stop), daemon=True)
        thread.start()
    elif spinner:
        print(f"  running {label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        out = fn()
        _sync()
        return out, time.perf_counter() - start
    finally:
        stop.set()
        if thread:
            thread.join()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cmd_bench_projection(args) -> int:
    import torch

    from . import SphereProjector, sparse_projection
    from .reference import sparse_projection_reference
    from .synthetic import synthetic_weight

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, d = args.shape or ((4096, 14336) if device.type == "cuda" else (2048, 7168))
    dtype = getattr(torch, args.dtype)
    print(f"sphere-fast bench-projection: W [{n} x {d}] {args.dtype}, {args.spectrum} spectrum, "
          f"eta={args.eta} alpha={args.alpha}, device {device}")
    W = synthetic_weight(n, d, spectrum=args.spectrum, dtype=dtype, device=device, seed=args.seed)
    B = 1e-3 * synthetic_weight(n, d, spectrum="gaussian", dtype=dtype, device=device, seed=args.seed + 1)

    sparse_projection(W, B, args.eta, args.alpha)  # warm-up: first-call allocations and thread start-up
    fast, t_fast = _timed("sphere_fast fit + apply", lambda: sparse_projection(W, B, args.eta, args.alpha), spinner=False)
    t_fit = _timed("fit", lambda: SphereProjector.fit(W, args.eta, args.alpha), spinner=False)[1]
    print(f"  sphere_fast sparse_projection  {t_fast:9.3f} s   (fit alone {t_fit:.3f} s)  r = {fast[2].shape[1]}")
    if not args.skip_reference:
        ref, t_ref = _timed(f"reference (d x d eigh, d={d})", lambda: sparse_projection_reference(W.float(), B.float(), args.eta, args.alpha), spinner=True)
        print(f"  reference sparse_projection    {t_ref:9.3f} s   r = {ref[2].shape[1]}")
        print(f"  speed-up                       {t_ref / t_fast:9.1f} x")
    if not args.skip_error:
        # float64 ground truth on the small Gram side (exact in exact arithmetic).
        P = SphereProjector.fit(W.double(), args.eta, args.alpha, backend="torch", method="dense")
        err = float((fast[0].double() - P.apply(B.double())).norm() / B.double().norm())
        print(f"  float64 rank {P.rank} (trace {P.trace:.6f}); ||B_proj - B_proj_fp64|| / ||B|| = {err:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sphere-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench-projection", help="time the reference projection against sphere_fast on one layer")
    bench.add_argument("--shape", type=int, nargs=2, metavar=("N", "D"),
                       help="weight shape (default 2048 7168 on CPU, 4096 14336 on a GPU)")
    bench.add_argument("--spectrum", choices=("decaying", "steep", "gaussian"), default="decaying",
                       help="singular-value profile of the synthetic weight (see sphere_fast.synthetic)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    bench.add_argument("--eta", type=float, default=0.5)
    bench.add_argument("--alpha", type=float, default=0.5)
    bench.add_argument("--device", default=None)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--skip-reference", action="store_true", help="do not run the slow reference")
    bench.add_argument("--skip-error", action="store_true", help="do not compute the float64 error")
    bench.set_defaults(handler=cmd_bench_projection)
    try:
        from .editing import cli as editing_cli
    except ImportError as exc:  # the editing layer's own imports are deferred to its handlers
        raise RuntimeError(f"sphere_fast.editing.cli failed to import: {exc}") from exc
    editing_cli.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
