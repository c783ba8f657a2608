"""Compile every Triton kernel of the package for NVIDIA GPUs ahead of time, without a GPU.

Triton's interpreter checks what a kernel computes but never compiles it; this compiles each
launch the host code ships (kernel x dtype x variant, built by the same function the launcher
calls, so the specialisation is the one a real launch gets) for sm_80, sm_90 and sm_100 with
Triton's bundled ``ptxas``, and reads the cubin's resource use with the bundled ``cuobjdump``:
registers, stack and local memory (spills), shared memory, and the theoretical occupancy those
allow. Kernels are found in the package's modules (every ``@triton.jit`` named ``*_kernel``);
each module lists its launches in ``compile_cases()``.

    python -m lvlm_prune.kernels.compile_check            # table; exit 1 on a failed check
    python -m lvlm_prune.kernels.compile_check --json -   # the records as JSON

Needs Triton in compile mode: when this process runs the interpreter (``TRITON_INTERPRET=1``),
``check_all`` runs itself in a child process without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ._triton_utils import HAS_TRITON, interpreter_active


@dataclasses.dataclass(frozen=True)
class Target:
    """One GPU generation: compute capability, per-SM limits, and the numbers the static
    roofline uses (a representative part of the generation)."""

    arch: int
    gpu: str
    max_shared_per_block: int  # bytes, opt-in maximum
    shared_per_sm: int  # bytes
    hbm_tb_s: float  # HBM bandwidth, TB/s
    bf16_tflops: float  # dense bf16 tensor-core peak
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024  # the CUDA runtime's share of every block, cc >= 8.0

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"; bandwidth and
# peak from NVIDIA's data sheets (A100 SXM 80 GB, H100 SXM, B200).
TARGETS = {
    t.name: t
    for t in (
        Target(80, "A100", 163 * 1024, 164 * 1024, 2.0, 312),
        Target(90, "H100 SXM", 227 * 1024, 228 * 1024, 3.35, 989),
        Target(100, "B200", 227 * 1024, 228 * 1024, 8.0, 2250),
    )
}


def kernel_modules() -> list:
    """Every module of the kernels package (imported)."""
    package = importlib.import_module(__package__)
    return [
        importlib.import_module(f"{__package__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name != Path(__file__).stem
    ]


def discover_kernels() -> dict[str, object]:
    """``{module.name: kernel}`` for every ``@triton.jit`` function named ``*_kernel`` defined
    in the package (interpreted or compiled, whichever mode Triton is in)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for module in kernel_modules():
        for name, obj in vars(module).items():
            if (
                isinstance(obj, (JITFunction, InterpretedFunction))
                and name.endswith("_kernel")
                and obj.fn.__module__ == module.__name__
            ):
                found[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = obj
    return found


def compile_cases() -> list[tuple[str, object]]:
    """``(kernel id, Launch)`` for every launch a module ships, from its ``compile_cases()``."""
    cases = []
    for module in kernel_modules():
        build = getattr(module, "compile_cases", None)
        if build is None:
            continue
        short = module.__name__.rsplit(".", 1)[-1]
        cases.extend((f"{short}.{launch.kernel.fn.__name__}", launch) for launch in build())
    return cases


def compile_launch(launch, target: Target) -> dict:
    """Compile one launch for ``target`` as ``JITFunction.run`` would on that GPU (same binder,
    same specialisation of ints and pointer alignment), and read the cubin's resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    gpu = GPUTarget("cuda", target.arch, 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.meta, bound, specialization, options
    )
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__
    )
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    warps = options.num_warps
    shared = usage["shared_static"] + compiled.metadata.shared
    return {
        "target": target.name,
        "gpu": target.gpu,
        "num_warps": warps,
        "num_stages": options.num_stages,
        "registers": usage["registers"],
        "stack": usage["stack"],
        "local": usage["local"],
        "shared": shared,
        "shared_limit": target.max_shared_per_block,
        "occupancy": occupancy(target, usage["registers"], warps, shared),
        "compile_s": round(seconds, 2),
    }


def occupancy(target: Target, registers: int, warps: int, shared: int) -> float:
    """Theoretical occupancy: resident warps / the SM's maximum, limited by registers (allocated
    per warp in units of 256), shared memory, warps and blocks per SM."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (target.regs_per_sm // per_warp) // warps if per_warp else target.max_blocks_per_sm
    by_shared = target.shared_per_sm // (shared + target.reserved_shared_per_block)
    by_warps = target.max_warps_per_sm // warps
    blocks = min(by_regs, by_shared, by_warps, target.max_blocks_per_sm)
    return blocks * warps / target.max_warps_per_sm


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    regs, stack, shared, local = (int(x) for x in match.groups())
    return {"registers": regs, "stack": stack, "shared_static": shared, "local": local}


def failures(record: dict) -> list[str]:
    """What is wrong with one compiled launch: spills, or shared memory over the limit."""
    problems = []
    if "error" in record:
        problems.append(f"does not compile: {record['error']}")
        return problems
    if record["stack"] or record["local"]:
        problems.append(f"spills (stack {record['stack']} B, local {record['local']} B)")
    if record["shared"] > record["shared_limit"]:
        problems.append(f"shared memory {record['shared']} B > {record['shared_limit']} B")
    return problems


def _check_here(targets: list[str], jobs: int) -> dict:
    import triton

    kernels = discover_kernels()
    cases = compile_cases()
    work = [(kid, launch, TARGETS[t]) for kid, launch in cases for t in targets]

    def one(item):
        kid, launch, target = item
        base = {"kernel": kid, "case": launch.label, "meta": dict(launch.meta)}
        try:
            return base | compile_launch(launch, target)
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result to report
            return base | {"target": target.name, "error": f"{type(exc).__name__}: {exc}"}

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(one, work))
    return {
        "triton": triton.__version__,
        "ptxas": _ptxas_version(),
        "kernels": sorted(kernels),
        "uncovered": sorted(set(kernels) - {kid for kid, _ in cases}),
        "records": records,
    }


def check_all(targets: list[str] | None = None, *, jobs: int | None = None) -> dict:
    """Compile every case for every target: ``{"records": [...], "kernels": [...],
    "uncovered": [kernels no module lists a case for], "triton": ..., "ptxas": ...}``."""
    targets = list(targets or TARGETS)
    jobs = jobs or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if not HAS_TRITON:
        raise RuntimeError("the compile check needs the `triton` package")
    if not interpreter_active():
        return _check_here(targets, jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", __name__, "--json", "-", "--jobs", str(jobs), "--targets", *targets],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"compile check failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the JSON is the last line


def _ptxas_version() -> str:
    """The bundled ptxas releases: Triton compiles sm_100 with a newer one (``ptxas-blackwell``)."""
    versions = []
    for name in ("ptxas", "ptxas-blackwell"):
        if Path(_tool(name)).exists():
            out = subprocess.run([_tool(name), "--version"], capture_output=True, text=True).stdout
            match = re.search(r"release ([\d.]+)", out)
            versions.append(f"{name} {match.group(1) if match else '?'}")
    return ", ".join(versions)


def table(result: dict) -> str:
    """Markdown table of the records, one row per kernel x case x target."""
    lines = [
        "| kernel | case | target | warps | stages | registers | stack + local B | shared B | "
        "occupancy | check |",
        "|:--|:--|:--|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for r in result["records"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['target']} | | | | | | | error |")
            continue
        problems = failures(r)
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['target']} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['registers']} | {r['stack'] + r['local']} | {r['shared']} | "
            f"{r['occupancy']:.0%} | {'; '.join(problems) or 'ok'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles")
    parser.add_argument("--json", metavar="PATH", help="write the records as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    result = check_all(args.targets, jobs=args.jobs)
    bad = [r for r in result["records"] if failures(r)] or result["uncovered"]
    if args.json == "-":
        print(json.dumps(result))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))
        if result["uncovered"]:
            print(f"kernels without compile cases: {result['uncovered']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
