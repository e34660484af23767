"""Test-session setup.

Triton decorates its own standard library (tl.zeros, ...) when it is first
imported, and on a machine without a GPU those functions only work if the
interpreter was on at that moment. Other libraries (transformers) import
triton early, so import it here, under TRITON_INTERPRET=1, before anything
else does; the variable is then restored so tests that check CPU-only
backend selection see the machine as it is.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture()
def one_thread():
    """One torch thread: the calibration tests run tiny matrices, where
    threads only add scheduling noise (and nondeterministic sums)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# Tests of kernels that have not yet passed on a GPU (opt-in ones; node ids
# naming them) run after all others: a device fault such as an illegal address
# is sticky for the CUDA context, so it would also fail every later test in the
# same process, the proven kernels' included.
NOT_YET_RUN_ON_A_GPU = ("weight_only_wgmma", "sm90", "weight_only_dequant",
                        "layout_cublas", "lut_staged", "binary_dequant", "int_act_staged",
                        "m64", "tma", "lut_dequant", "acq_rel", "3cta")


# Within each of the two parts, tests that exercise torch.compile go last: a
# first compile takes seconds to tens of seconds, and a GPU run under a time
# limit should spend it on the kernels' results first.


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        items.sort(key=lambda item: (any(tag in item.nodeid for tag in NOT_YET_RUN_ON_A_GPU),
                                     "compile" in item.name
                                     or item.path.name == "test_compile.py"))
