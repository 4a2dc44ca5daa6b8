"""Both compiled extensions are built and called; without them the fallbacks work, with one warning."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from megatron_lite import _extensions
from megatron_lite.data import helpers


def test_helpers_extension_is_built_and_matches_numpy():
    ext = _extensions.load("_helpers")
    assert ext is not None, "csrc/helpers.cpp was not built: run `make build`"
    weights = np.array([0.5, 0.3, 0.2])
    got = ext.build_blending_indices(weights, 1000)
    want = helpers.build_blending_indices_numpy(weights, 1000)
    assert got[0].dtype == np.uint8 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.bincount(got[0]).tolist() == [500, 300, 200]


def test_fused_kernels_extension_is_built_and_matches_torch():
    ext = _extensions.load("_fused_kernels")
    assert ext is not None, "csrc/fused_kernels.cpp was not built: run `make build`"
    x = torch.randn(3, 5, 17)
    torch.testing.assert_close(ext.scaled_softmax_forward(x, 0.5), torch.softmax(x * 0.5, -1))


def test_without_extensions_the_fallback_runs_and_warns_once():
    code = textwrap.dedent("""
        import warnings
        import numpy as np
        from megatron_lite.data import helpers
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = helpers.build_blending_indices(np.array([0.25, 0.75]), 400)
            b = helpers.build_blending_indices(np.array([0.25, 0.75]), 400)
        msgs = [str(x.message) for x in w if "C++ extension" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "_helpers" in msgs[0] and "MEGATRON_LITE_NO_EXTENSIONS" in msgs[0], msgs
        assert np.bincount(a[0]).tolist() == [100, 300]
        assert (a[0] == b[0]).all()
        print("fallback ok")
    """)
    env = {**os.environ, "MEGATRON_LITE_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout
