"""Every Triton kernel compiles for sm_80 / sm_90 / sm_100 without register spills, no GPU needed.

The cases come from the kernel modules themselves (``compile_cases()``, built by the functions
the launchers call), the kernels from the package (``compile_check.discover_kernels``): a new
kernel without cases, a changed signature or a config that spills fails here. The compile runs
in one child process (Triton in compile mode; this process runs its interpreter).
"""

from __future__ import annotations

import pytest
from kernel_testing import requires_triton

from lvlm_prune.kernels._triton_utils import HAS_TRITON

if HAS_TRITON:
    from lvlm_prune.kernels import compile_check

    CASES = [(kid, launch.label) for kid, launch in compile_check.compile_cases()]
    TARGETS = list(compile_check.TARGETS)
else:
    CASES, TARGETS = [], []

pytestmark = requires_triton


@pytest.fixture(scope="module")
def compiled() -> dict:
    result = compile_check.check_all()
    result["by_case"] = {(r["kernel"], r["case"], r["target"]): r for r in result["records"]}
    return result


def test_every_kernel_of_the_package_has_compile_cases(compiled):
    assert {
        "relevance._relevance_kernel",
        "topk._topk_select_kernel",
        "merge._merge_assign_kernel",
        "merge._merge_reduce_kernel",
    } <= set(compiled["kernels"])
    assert compiled["uncovered"] == [], "kernels without compile_cases(): add them to their module"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kernel,case", CASES, ids=[f"{k.split('.')[-1]}-{c}" for k, c in CASES])
def test_compiles_without_spills(compiled, kernel, case, target):
    record = compiled["by_case"][(kernel, case, target)]
    assert "error" not in record, record["error"]
    assert record["stack"] == 0 and record["local"] == 0, (
        f"{kernel} ({case}) spills on {target}: {record['registers']} registers, stack "
        f"{record['stack']} B, local {record['local']} B; meta {record['meta']}"
    )
    assert record["shared"] <= record["shared_limit"], record
    assert 0 < record["occupancy"] <= 1, record
