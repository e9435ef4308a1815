"""Where the host time of one public call goes, under cProfile, for comparing two trees on a GPU:
python benchmarks/host_profile.py ROOT OUT.prof (ROOT: a folder holding a ``sigattn`` package).

The call is host_ab.py's D128 full 2001-token forward (4 x 2001 tokens, 16 heads, bf16; the Gluon kernel on
an sm_90 GPU). Prints its host time (``host_ab.host_us``), then profiles
10 loops of 200 calls, each synchronised outside the profile so the launch queue never fills, and writes
the stats to OUT.prof; compare two with ``pstats`` (calls and time per function, per call).
"""

import cProfile
import sys

from host_ab import host_us


def main() -> None:
    root, path = sys.argv[1:3]
    sys.path.insert(0, root)
    import torch

    import sigattn

    print(sigattn.__file__)
    q, k, v = (torch.randn(4, 2001, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def call():
        return sigattn.sigmoid_attn_func(q, k, v)

    print("host_us", host_us(call, torch.cuda.synchronize))
    profile = cProfile.Profile()
    for _ in range(10):
        profile.enable()
        for _ in range(200):
            call()
        profile.disable()
        torch.cuda.synchronize()
    profile.dump_stats(path)


if __name__ == "__main__":
    main()
