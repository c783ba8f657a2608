"""Benchmark the selection (relevance + top-K + gather): torch reference vs Triton, on a GPU.

LLaVA-1.5-7B shapes: 576 image tokens x 4096 bf16 per image, query of T = 32/128/512 tokens,
1/16/64 images per call; times are medians of ``triton.testing.do_bench`` of ``select_tokens``
with each backend. The pass is memory-bound at small T, so next to the times the table gives the
bytes that must move and the achieved GB/s against a measured device-to-device copy. Each run is
appended to ``benchmarks/results/kernels-<device>.json`` with the device, versions and command.

    python -m lvlm_prune.benchmarks.bench_kernels            # needs CUDA
    python -m lvlm_prune.benchmarks.bench_kernels --smoke    # CPU, seconds: torch path + the
                                                             # Triton interpreter on one shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMAND = "python -m lvlm_prune.benchmarks.bench_kernels"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, in seconds")
    parser.add_argument("--tokens", type=int, default=576, help="image tokens N per image")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size D")
    parser.add_argument("--query-lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--out", type=Path, help="JSON file to append the run to")
    args = parser.parse_args(argv)
    command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])

    if args.smoke:
        return _smoke(args, command)
    if not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA GPU found; the Triton kernels only run on a GPU (Triton has "
            "no CPU backend). Nothing measured. `--smoke` checks the benchmark itself on CPU.",
            file=sys.stderr,
        )
        return 0
    return _bench_gpu(args, command)


# ---- GPU ----------------------------------------------------------------------------------------


def _bench_gpu(args, command: str) -> int:
    import triton
    import triton.testing

    from lvlm_prune.kernels import keep_count, select_tokens
    from lvlm_prune.kernels.relevance import relevance_triton
    from lvlm_prune.kernels.selection import _offsets

    device = torch.device("cuda")
    dtype = torch.bfloat16
    n, d = args.tokens, args.hidden
    k = keep_count(n, args.keep_ratio)
    copy_gbps = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s")
    print(f"N={n} D={d} {_dtype_name(dtype)} K={k} (keep_ratio {args.keep_ratio})\n")
    rows = []
    for b in args.images:
        for t in args.query_lengths:
            # Per-image slices of one projector output / one query batch, as the model has them.
            images = list(torch.randn(b * n, d, device=device, dtype=dtype).split(n))
            queries = list(torch.randn(b * t, d, device=device, dtype=dtype).split(t))
            kw = dict(methods=["simignore"] * b, merge=[False] * b, seeds=[0] * b)

            def run(backend, images=images, queries=queries, kw=kw, b=b):
                return select_tokens(images, queries, [k] * b, backend=backend, **kw)

            image_all, query_all = torch.cat(images), torch.cat(queries)
            offs = (_offsets([n] * b, device), _offsets([t] * b, device))

            def relevance_only(image_all=image_all, query_all=query_all, offs=offs):
                return relevance_triton(image_all, offs[0], query_all, offs[1])

            same = sum(
                torch.equal(x.kept, y.kept) for x, y in zip(run("torch"), run("triton"))
            )  # also warms up and autotunes
            ms_torch = _median_ms(triton, lambda: run("torch"))
            ms_triton = _median_ms(triton, lambda: run("triton"))
            ms_relevance = _median_ms(triton, relevance_only)
            moved = _bytes_moved(b, n, t, d, k, dtype)
            rows.append(
                dict(
                    op="relevance+topk+gather",
                    images=b,
                    tokens=n,
                    query=t,
                    hidden=d,
                    keep=k,
                    dtype=_dtype_name(dtype),
                    torch_ms=ms_torch,
                    triton_ms=ms_triton,
                    triton_relevance_ms=ms_relevance,
                    speedup=ms_torch / ms_triton,
                    bytes=moved,
                    triton_gbps=moved / ms_triton / 1e6,
                    copy_fraction=moved / ms_triton / 1e6 / copy_gbps,
                    kept_identical=f"{same}/{b}",
                )
            )
            _print_row(rows[-1], header=len(rows) == 1)
    _append_json(
        args.out or RESULTS_DIR / f"kernels-{_slug(torch.cuda.get_device_name())}.json",
        dict(
            **_environment(command, triton.__version__, torch.cuda.get_device_name()),
            copy_gbps=copy_gbps,
            rows=rows,
        ),
    )
    return 0


def _median_ms(triton, fn) -> float:
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def _copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written), the practical ceiling."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * src.numel() / ms / 1e6


def _bytes_moved(b: int, n: int, t: int, d: int, k: int, dtype) -> int:
    """What any implementation must read and write: image and query once, the scores, the
    kept indices, and the K gathered rows (read and written)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return b * ((n + t) * d * size + n * 4 + k * 8 + 2 * k * d * size)


# ---- smoke (CPU) --------------------------------------------------------------------------------


def _smoke(args, command: str) -> int:
    """Tiny shapes on CPU: the torch path timed, the Triton path run once in the interpreter."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    from lvlm_prune.kernels import HAS_TRITON, keep_count, select_tokens
    from lvlm_prune.kernels._triton_utils import interpreter_active

    n, d, dtype = 24, 32, torch.bfloat16
    k = keep_count(n, args.keep_ratio)
    rows = []
    for b in (1, 3):
        for t in (0, 4):
            images = list(torch.randn(b * n, d, dtype=dtype).split(n))
            queries = (
                list(torch.randn(b * t, d, dtype=dtype).split(t))
                if t
                else [torch.empty(0, d, dtype=dtype)] * b
            )
            kw = dict(methods=["simignore"] * b, merge=[False] * b, seeds=[0] * b)

            def run(backend, images=images, queries=queries, kw=kw, b=b):
                return select_tokens(images, queries, [k] * b, backend=backend, **kw)

            ms = _cpu_median_ms(lambda: run("torch"))
            row = dict(
                op="relevance+topk+gather",
                images=b,
                tokens=n,
                query=t,
                hidden=d,
                keep=k,
                dtype=_dtype_name(dtype),
                torch_ms=ms,
                bytes=_bytes_moved(b, n, t, d, k, dtype),
            )
            rows.append(row)
            print(f"smoke torch  B={b} T={t} N={n} D={d}: {ms:.3f} ms, {row['bytes']} bytes")
    triton_version = None
    if HAS_TRITON and interpreter_active():
        import triton

        triton_version = triton.__version__
        images = list(torch.randn(2 * n, d, dtype=dtype).split(n))
        queries = list(torch.randn(2 * 4, d, dtype=dtype).split(4))
        kw = dict(methods=["simignore"] * 2, merge=[False, True], seeds=[0, 0])
        start = time.perf_counter()
        got = select_tokens(images, queries, [k, k], backend="triton", **kw)
        ms = (time.perf_counter() - start) * 1e3
        want = select_tokens(images, queries, [k, k], backend="torch", **kw)
        same = all(torch.equal(x.kept, y.kept) for x, y in zip(got, want))
        rows.append(
            dict(
                op="triton-interpreter",
                images=2,
                tokens=n,
                query=4,
                hidden=d,
                keep=k,
                dtype=_dtype_name(dtype),
                interpreter_ms=ms,
                kept_identical=same,
            )
        )
        print(f"smoke triton (interpreter) B=2 T=4: {ms:.0f} ms, kept identical to torch: {same}")
        if not same:
            print("bench_kernels --smoke: Triton and torch kept different rows", file=sys.stderr)
            return 1
    else:
        print("smoke triton: skipped (triton missing, or imported before TRITON_INTERPRET=1)")
    if args.out:
        _append_json(args.out, dict(**_environment(command, triton_version, "cpu"), rows=rows))
    return 0


def _cpu_median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---- output -------------------------------------------------------------------------------------


_COLUMNS = [  # key, title, width, format
    ("images", "B", 4, "{}"),
    ("query", "T", 4, "{}"),
    ("torch_ms", "torch ms", 9, "{:.3f}"),
    ("triton_ms", "triton ms", 9, "{:.3f}"),
    ("speedup", "speed-up", 8, "{:.2f}x"),
    ("triton_relevance_ms", "relevance ms", 12, "{:.3f}"),
    ("bytes", "MB moved", 8, "{:.1f}"),
    ("triton_gbps", "GB/s", 6, "{:.0f}"),
    ("copy_fraction", "of copy", 7, "{:.0%}"),
    ("kept_identical", "same kept", 9, "{}"),
]


def _print_row(row: dict, header: bool) -> None:
    if header:
        print("  ".join(title.rjust(width) for _, title, width, _ in _COLUMNS))
    cells = []
    for key, _, width, fmt in _COLUMNS:
        value = row[key] / 1e6 if key == "bytes" else row[key]
        cells.append(fmt.format(value).rjust(width))
    print("  ".join(cells), flush=True)


def _environment(command: str, triton_version, device_name: str) -> dict:
    return dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name,
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        command=command,
    )


def _append_json(path: Path, run: dict) -> None:
    """Append this run to the file's list of runs (one file per device, every run kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs.append(run)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(f"\nappended to {path}")


def _dtype_name(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main())
