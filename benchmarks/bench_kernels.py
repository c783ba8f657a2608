"""The selection's kernels: torch reference vs Triton on a GPU, or compiled for GPUs without one.

torch and Triton only, no vLLM engine (``lvlm-prune bench kernels``; not part of ``all``):

- default (needs CUDA): ``select_tokens`` (relevance + top-K + gather) with each backend, and the
  relevance kernel alone, on LLaVA-1.5-7B shapes (576 x 4096 bf16 per image, T = 32/128/512,
  1/16/64 images); medians of ``triton.testing.do_bench``. Each time stands beside its memory
  floor: the bytes the selection must move at the device's measured copy bandwidth.
- ``--compile-only`` (no GPU needed): every kernel compiled for sm_80/90/100 (registers, spills,
  shared memory, occupancy; ``lvlm_prune.kernels.compile_check``) and a static roofline for
  LLaVA-1.5-7B and Qwen2.5-VL shapes; writes ``kernels-compile.{md,json}``.
- ``--cpu`` (no GPU needed): the torch reference, the production path on CPU servers, at the
  model shapes on this machine's CPU, against the same scores from one BLAS matmul (which rounds
  a row by its place in the matrix, see ``cosine_matrix``).
- ``--smoke`` (CPU, seconds): the torch path timed on tiny shapes, the Triton path once in its
  interpreter (a child process when this one imported Triton without it), kept sets compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lvlm_prune import envs
from lvlm_prune.kernels._triton_utils import DTYPE_NAMES

from . import common

NAME = "kernels"
NO_CUDA = (
    "bench kernels: no CUDA GPU found; the Triton kernels only run on a GPU (Triton has no CPU "
    "backend). Nothing measured. `--compile-only` compiles them for GPUs without one; `--smoke` "
    "checks the benchmark itself on CPU."
)
DTYPE = torch.bfloat16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, in seconds")
    mode.add_argument(
        "--compile-only",
        action="store_true",
        help="compile every kernel for sm_80/90/100 and write the static roofline (no GPU)",
    )
    mode.add_argument(
        "--cpu",
        action="store_true",
        help="time the torch reference at LLaVA-1.5-7B / Qwen2.5-VL shapes on this CPU",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON / markdown")
    parser.add_argument("--repeats", type=int, default=7, help="--cpu: timed calls per shape")
    parser.add_argument("--tokens", type=int, default=576, help="image tokens N per image")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size D")
    parser.add_argument("--query-lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--keep-ratio", type=float, default=0.25)


def main(args: argparse.Namespace, command: str) -> int:
    """Run the mode ``args`` ask for, write its files, print its table; the exit status."""
    if args.compile_only:
        result, stem = _compile_only(args), "kernels-compile"
        status = 1 if result["failures"] else 0
    elif args.cpu:
        result, stem, status = _bench_cpu(args), "kernels-cpu", 0
    elif args.smoke:
        result, stem = _smoke(args), "kernels-smoke"
        status = 0 if result["kept_identical"] is not False else 1
    elif not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 0
    else:
        result = _bench_gpu(args)
        stem, status = f"kernels-{_slug(torch.cuda.get_device_name())}", 0
    result["machine"] = common.machine_info()
    result["command"] = command
    out = args.out or common.results_dir(smoke=args.smoke)
    files = common.write_results(out, stem, result, "")
    section = markdown(result) + "\n\n" + common.machine_markdown(result["machine"], command)
    files["md"].write_text(section + "\n")
    print("\n" + section + "\n")
    print(f"wrote {files['json']}, {files['md']}")
    return status


def markdown(result: dict) -> str:
    writers = {
        "compile": _compile_markdown,
        "cpu": _cpu_markdown,
        "smoke": _smoke_markdown,
        "gpu": _gpu_markdown,
    }
    return writers[result["mode"]](result)


# ---- GPU ----------------------------------------------------------------------------------------


def _bench_gpu(args) -> dict:
    import triton
    import triton.testing

    from lvlm_prune.kernels import keep_count, select_tokens
    from lvlm_prune.kernels.relevance import relevance_triton
    from lvlm_prune.kernels.selection import row_offsets

    device = torch.device("cuda")
    n, d = args.tokens, args.hidden
    k = keep_count(n, args.keep_ratio)
    copy_gbps = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s")
    rows = []
    for b in args.images:
        for t in args.query_lengths:
            # Per-image slices of one projector output / one query batch, as the model has them.
            images = list(torch.randn(b * n, d, device=device, dtype=DTYPE).split(n))
            queries = list(torch.randn(b * t, d, device=device, dtype=DTYPE).split(t))
            kw = dict(methods=["simignore"] * b, merge=[False] * b, seeds=[0] * b)

            def run(backend, images=images, queries=queries, kw=kw, b=b):
                return select_tokens(images, queries, [k] * b, backend=backend, **kw)

            image_all, query_all = torch.cat(images), torch.cat(queries)
            offs = (row_offsets([n] * b, device), row_offsets([t] * b, device))

            def relevance_only(image_all=image_all, query_all=query_all, offs=offs):
                return relevance_triton(image_all, offs[0], query_all, offs[1])

            same = sum(torch.equal(x.kept, y.kept) for x, y in zip(run("torch"), run("triton")))
            moved = _selection_bytes(b, n, t, d, k)
            floor_ms = moved / copy_gbps / 1e6
            ms_triton = _median_ms(triton, lambda: run("triton"))
            rows.append(
                dict(
                    images=b,
                    tokens=n,
                    query=t,
                    hidden=d,
                    keep=k,
                    dtype=DTYPE_NAMES[DTYPE],
                    torch_ms=_median_ms(triton, lambda: run("torch")),
                    triton_ms=ms_triton,
                    triton_relevance_ms=_median_ms(triton, relevance_only),
                    bytes=moved,
                    floor_ms=floor_ms,
                    triton_over_floor=ms_triton / floor_ms,
                    kept_identical=f"{same}/{b}",
                )
            )
            print(f"B={b} T={t}: triton {ms_triton:.3f} ms, floor {floor_ms:.3f} ms", flush=True)
    return dict(
        mode="gpu",
        device=torch.cuda.get_device_name(),
        triton=triton.__version__,
        copy_gbps=copy_gbps,
        rows=rows,
    )


def _gpu_markdown(result: dict) -> str:
    rows = [
        [
            r["images"],
            r["query"],
            f"{r['torch_ms']:.3f}",
            f"{r['triton_ms']:.3f}",
            f"{r['torch_ms'] / r['triton_ms']:.1f}x",
            f"{r['triton_relevance_ms']:.3f}",
            f"{r['bytes'] / 1e6:.3g}",
            f"{r['floor_ms']:.3g}",
            f"{r['triton_over_floor']:.1f}x",
            r["kept_identical"],
        ]
        for r in result["rows"]
    ]
    first = result["rows"][0]
    return (
        f"### Selection kernels on {result['device']}\n\n"
        f"`select_tokens` (relevance + top-K + gather) per call, N = {first['tokens']} image tokens"
        f" x D = {first['hidden']} {first['dtype']} per image, K = {first['keep']}; medians of "
        "`triton.testing.do_bench` in ms. Floor: the bytes the selection must move (image and "
        "query read once, scores, indices, the K rows gathered) at the device-to-device copy "
        f"bandwidth measured here, {result['copy_gbps']:.0f} GB/s (Triton {result['triton']}). "
        "`same kept`: images whose kept set is the same with both backends; they round "
        "differently, so a near-tie at the cut may go either way.\n\n"
        + common.markdown_table(
            [
                "images",
                "T",
                "torch ms",
                "triton ms",
                "speed-up",
                "relevance ms",
                "MB moved",
                "floor ms",
                "triton / floor",
                "same kept",
            ],
            rows,
        )
    )


def _median_ms(triton, fn) -> float:
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def _copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written), the practical ceiling."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * src.numel() / ms / 1e6


def _selection_bytes(b: int, n: int, t: int, d: int, k: int, size: int = 2) -> int:
    """What any implementation of the selection must move: image and query read once, the
    scores, the kept indices, and the K gathered rows (read and written)."""
    return b * ((n + t) * d * size + n * 4 + k * 8 + 2 * k * d * size)


# ---- the torch reference on CPU ---------------------------------------------------------------


def _bench_cpu(args) -> dict:
    """``relevance_ref`` (row-invariant cosines) against one BLAS matmul per image, per shape,
    and the ``cover`` method's ``coverage_select_ref`` at keep 0.25 (its cost beside the
    relevance it starts from): the fastest and the median of ``--repeats`` calls (a shared
    machine's noise is one-sided)."""
    from lvlm_prune.kernels import keep_count
    from lvlm_prune.kernels.reference import coverage_select_ref, relevance_ref

    def blas(image, query):
        unit = torch.nn.functional.normalize
        return (unit(image.float(), dim=-1) @ unit(query.float(), dim=-1).T).amax(dim=1)

    rows = []
    for model, n, d in ROOFLINE_MODELS:
        for t in ROOFLINE_QUERIES:
            image = torch.randn(n, d).to(DTYPE)
            query = torch.randn(t, d).to(DTYPE)
            offsets = (torch.tensor([0, n]), torch.tensor([0, t]))
            ref = _cpu_times(relevance_ref, (image, offsets[0], query, offsets[1]), args.repeats)
            mm = _cpu_times(blas, (image, query), args.repeats)
            scores = relevance_ref(image, offsets[0], query, offsets[1])
            k = keep_count(n, 0.25)
            cover = _cpu_times(coverage_select_ref, (image, scores, k), args.repeats)
            rows.append(
                dict(
                    model=model, n=n, d=d, t=t, k=k, reference_ms=ref, matmul_ms=mm, cover_ms=cover
                )
            )
            print(
                f"{model} T={t}: reference {ref['min']:.1f} ms, matmul {mm['min']:.1f} ms, "
                f"cover (K={k}) {cover['min']:.1f} ms"
            )
    return dict(mode="cpu", torch_threads=torch.get_num_threads(), rows=rows)


def _cpu_times(fn, fn_args: tuple, repeats: int) -> dict:
    fn(*fn_args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*fn_args)
        times.append((time.perf_counter() - start) * 1e3)
    return dict(min=min(times), median=statistics.median(times), values=times)


def _cpu_markdown(result: dict) -> str:
    rows = [
        [
            r["model"],
            f"{r['n']} x {r['d']}",
            r["t"],
            f"{r['reference_ms']['min']:.1f} / {r['reference_ms']['median']:.1f}",
            f"{r['matmul_ms']['min']:.1f} / {r['matmul_ms']['median']:.1f}",
            f"{r['reference_ms']['min'] / r['matmul_ms']['min']:.0f}x",
            *(
                [r["k"], f"{r['cover_ms']['min']:.1f} / {r['cover_ms']['median']:.1f}"]
                if "cover_ms" in r
                else ["", ""]
            ),
        ]
        for r in result["rows"]
    ]
    return (
        "### The torch reference on CPU\n\n"
        "`relevance_ref` for one image (bf16 embeddings, max over the query): row-invariant "
        "cosines (elementwise multiply + sum over D) against the same scores from one BLAS "
        f"matmul, {result['torch_threads']} torch threads; fastest / median ms. `cover`: "
        "`coverage_select_ref` (the `cover` method after relevance: ceil(K/2) by score, the "
        "rest by farthest-point coverage) at keep 0.25.\n\n"
        + common.markdown_table(
            ["model", "N x D", "T", "reference ms", "BLAS matmul ms", "ratio", "K", "cover ms"],
            rows,
        )
    )


# ---- compile only -----------------------------------------------------------------------------

# (name, N image rows, D) of the models the roofline is drawn for, and the query lengths.
ROOFLINE_MODELS = [("LLaVA-1.5-7B", 576, 4096), ("Qwen2.5-VL-7B", 1536, 3584)]
ROOFLINE_QUERIES = (32, 512)


def _compile_only(args) -> dict:
    from lvlm_prune.kernels import compile_check, keep_count

    checked = compile_check.check_all()
    failures = [
        f"{r['kernel']} ({r['case']}, {r['target']}): {'; '.join(compile_check.failures(r))}"
        for r in checked["records"]
        if compile_check.failures(r)
    ]
    failures += [f"{kid}: no compile cases" for kid in checked["uncovered"]]
    roofline = []
    for model, n, d in ROOFLINE_MODELS:
        k = keep_count(n, args.keep_ratio)
        for kernel, t, moved, flops in _kernel_traffic(n, d, k):
            if t is None or t in ROOFLINE_QUERIES:
                roofline.append(
                    dict(model=model, kernel=kernel, n=n, d=d, t=t, k=k, bytes=moved, flops=flops)
                )
    targets = {
        t.name: dict(gpu=t.gpu, hbm_tb_s=t.hbm_tb_s, bf16_tflops=t.bf16_tflops)
        for t in compile_check.TARGETS.values()
    }
    return dict(
        mode="compile",
        triton=checked["triton"],
        ptxas=checked["ptxas"],
        kernels=checked["kernels"],
        records=checked["records"],
        failures=failures,
        targets=targets,
        roofline=roofline,
        keep_ratio=args.keep_ratio,
    )


def _kernel_traffic(n: int, d: int, k: int, size: int = 2):
    """(kernel, T or None, bytes it must move, FLOPs) per kernel for one image of N x D in a
    16-bit dtype: each input read once, each output written once."""
    for t in ROOFLINE_QUERIES:
        # image + query read, scores written; a dot product and both norms per (row, token).
        yield "relevance", t, (n + t) * d * size + n * 4, 2 * n * t * d + 2 * (n + t) * d
    yield "top-K", None, n * 4 + k * 8, 0  # scores read, kept indices written
    # image read (kept rows included), the kept indices, one target per row written.
    yield "merge assign", None, n * d * size + k * 8 + n * 4, 2 * (n - k) * k * d + 2 * n * d
    # image rows and targets read, K merged rows written.
    yield "merge reduce", None, n * d * size + n * 4 + k * 8 + k * d * size, n * d


def _compile_markdown(result: dict) -> str:
    from lvlm_prune.kernels import compile_check

    targets = result["targets"]
    parts = [
        "### Triton kernels compiled for NVIDIA GPUs (no GPU needed)\n",
        f"Triton {result['triton']} with its bundled {result['ptxas']} (sm_100); resource use from "
        "`cuobjdump -res-usage` of each cubin. Every launch the host code ships (kernel x dtype x "
        "variant), built by the launcher's own function and specialised as a real launch would "
        "be (unit-stride rows, 16-byte aligned pointers, 576 x 4096 image). Registers per thread; "
        "stack + local bytes are register spills; shared = static + Triton's dynamic shared "
        "memory per block; theoretical occupancy from registers (256-register allocation units "
        "per warp), shared memory (1 KiB reserved per block) and the warp / block limits per SM "
        "(64 warps, 32 blocks).\n",
        compile_check.table(result),
        "",
        "**Failed checks:** " + ("; ".join(result["failures"]) or "none") + ".\n",
        "### Static roofline\n",
        "Per kernel and image, bf16 embeddings: the bytes the kernel must move (every input read "
        "once, every output written once; tile re-reads hit L2 and are not counted), its FLOPs, "
        "and the time those take at the generation's HBM bandwidth and dense bf16 tensor-core "
        "peak: "
        + ", ".join(
            f"{t['gpu']} ({name}) {t['hbm_tb_s']:g} TB/s, {t['bf16_tflops']:g} TFLOPS"
            for name, t in targets.items()
        )
        + f". K = ceil({result['keep_ratio']:g} N). The floor is the larger of the two. Not "
        "counted: the relevance kernel reads each image tile once per BLOCK_T = 32 query tokens "
        "(16 times at T = 512) and the query once per 64 image rows, from L2 after the first "
        "time (one image is 4.7 MB); the top-K runs one program per image over 35 passes of its "
        "scores, bound by latency rather than by either floor.\n",
    ]
    headers = ["model", "kernel", "N x D", "T", "MB", "GFLOP", "FLOP/B"]
    for t in targets.values():
        headers.append(f"{t['gpu']} floor µs")
    rows = []
    for r in result["roofline"]:
        row = [
            r["model"],
            r["kernel"],
            f"{r['n']} x {r['d']}",
            r["t"] if r["t"] is not None else "",
            f"{r['bytes'] / 1e6:.3g}",
            f"{r['flops'] / 1e9:.3g}",
            f"{r['flops'] / r['bytes']:.0f}",
        ]
        for t in targets.values():
            memory_us = r["bytes"] / (t["hbm_tb_s"] * 1e12) * 1e6
            compute_us = r["flops"] / (t["bf16_tflops"] * 1e12) * 1e6
            bound = "compute" if compute_us > memory_us else "memory"
            row.append(f"{max(memory_us, compute_us):.3g} ({bound})")
        rows.append(row)
    parts.append(common.markdown_table(headers, rows))
    return "\n".join(parts)


# ---- smoke (CPU) --------------------------------------------------------------------------------

_SMOKE = dict(n=24, d=32)


def _smoke(args) -> dict:
    """Tiny shapes on CPU: the torch path timed, the Triton path run once in the interpreter."""
    from lvlm_prune.kernels import keep_count, select_tokens

    n, d = _SMOKE["n"], _SMOKE["d"]
    k = keep_count(n, args.keep_ratio)
    rows = []
    for b in (1, 3):
        for t in (0, 4):
            images = list(torch.randn(b * n, d, dtype=DTYPE).split(n))
            queries = [torch.randn(t, d, dtype=DTYPE) for _ in range(b)]
            kw = dict(methods=["simignore"] * b, merge=[False] * b, seeds=[0] * b)

            def run(images=images, queries=queries, kw=kw, b=b):
                return select_tokens(images, queries, [k] * b, backend="torch", **kw)

            ms = _cpu_median_ms(run)
            moved = _selection_bytes(b, n, t, d, k)
            rows.append(
                dict(images=b, query=t, tokens=n, hidden=d, keep=k, torch_ms=ms, bytes=moved)
            )
            print(f"smoke torch  B={b} T={t} N={n} D={d}: {ms:.3f} ms, {moved} bytes")
    interpreter = _interpreter_check(args.keep_ratio)
    if interpreter is None:
        print("smoke triton: skipped (triton is not installed)")
    else:
        print(
            f"smoke triton (interpreter) B=2 T=4: {interpreter['ms']:.0f} ms, kept identical to "
            f"torch: {interpreter['kept_identical']}"
        )
    return dict(
        mode="smoke",
        device="cpu",
        torch=torch.__version__,
        rows=rows,
        interpreter=interpreter,
        kept_identical=None if interpreter is None else interpreter["kept_identical"],
    )


def _smoke_markdown(result: dict) -> str:
    rows = [
        [r["images"], r["query"], r["tokens"], r["hidden"], f"{r['torch_ms']:.3f}", r["bytes"]]
        for r in result["rows"]
    ]
    check = result["interpreter"]
    line = (
        "Triton: not installed, skipped."
        if check is None
        else f"Triton in its interpreter (B=2, T=4, one image merged): {check['ms']:.0f} ms, "
        f"kept identical to torch: {check['kept_identical']}."
    )
    return (
        "### Kernel benchmark, smoke (CPU)\n\n"
        + common.markdown_table(["images", "T", "N", "D", "torch ms", "bytes"], rows)
        + f"\n\n{line}"
    )


def _interpreter_check(keep_ratio: float) -> dict | None:
    """Select on CPU tensors with both backends, Triton in its interpreter: in this process when
    it runs the interpreter, else in a child process that does."""
    from lvlm_prune.kernels._triton_utils import HAS_TRITON, interpreter_active

    if not HAS_TRITON:
        return None
    if interpreter_active():
        return interpreter_check(keep_ratio)
    env = dict(os.environ, **{envs.TRITON_INTERPRET: "1"})
    code = f"from {__name__} import interpreter_check; import json; "
    code += f"print(json.dumps(interpreter_check({keep_ratio!r})))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"the interpreter check failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interpreter_check(keep_ratio: float) -> dict:
    """Two images through ``select_tokens`` with each backend (Triton in its interpreter)."""
    from lvlm_prune.kernels import keep_count, select_tokens

    n, d = _SMOKE["n"], _SMOKE["d"]
    k = keep_count(n, keep_ratio)
    images = list(torch.randn(2 * n, d, dtype=DTYPE).split(n))
    queries = list(torch.randn(2 * 4, d, dtype=DTYPE).split(4))
    kw = dict(methods=["simignore"] * 2, merge=[False, True], seeds=[0, 0])
    start = time.perf_counter()
    got = select_tokens(images, queries, [k, k], backend="triton", **kw)
    ms = (time.perf_counter() - start) * 1e3
    want = select_tokens(images, queries, [k, k], backend="torch", **kw)
    same = all(torch.equal(x.kept, y.kept) for x, y in zip(got, want))
    return dict(ms=ms, kept_identical=same)


def _cpu_median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
