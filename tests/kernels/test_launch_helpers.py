"""Host-side launch arithmetic (kernels/_launch.py) equals triton's own helpers, which cost ~5 µs per host call."""
import triton
from llm2vec_fast.kernels._launch import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for a in list(range(0, 300)) + [65535, 65536, 65537, 2**31 + 5]:
        for b in (1, 2, 3, 7, 16, 64, 128, 4096):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(0, 4100)) + [2**20 - 1, 2**20, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
