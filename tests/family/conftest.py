"""The family fixture: every test that asks for it runs once per entry of ``FAMILIES``.

Module scope, so pytest orders each module's tests by family and builds each module's engine once
per family (a test may narrow the families with ``@pytest.mark.parametrize("family", [...],
indirect=True)``; it shares the same engine).
"""

import pytest

from family.families import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES, ids=str)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, request) -> str:
    return request.getfixturevalue(family.model_dir_fixture)
