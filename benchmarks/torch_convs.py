"""PyTorch's time for SAU-Net's 3x3(x3) convolution layers, one at a time: forward, input and
kernel gradients, channels-last (what the peer's oneDNN kernels run), with torch's default
threads; `--amp` under bfloat16 autocast. Run by `run.py --only=convs` in a child process.

    python benchmarks/torch_convs.py '[[[8, 128, 128, 3], [3, 3, 3, 32]], ...]' --steps 5 --warmup 2

Input: a JSON list of (input shape NHWC / NDHWC, kernel shape HWIO / DHWIO). Prints one JSON
line: torch's version, threads and the seconds per layer.
"""
import argparse
import json
import time

import torch


def layer_seconds(shape, kshape, steps, warmup, amp):
    nd = len(shape) - 2
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([shape[0], shape[-1], *shape[1:-1]], generator=gen)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    k = (torch.randn([kshape[-1], kshape[-2], *kshape[:-2]], generator=gen) * 0.1).requires_grad_()
    conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = conv(x, k, padding=1)
        (y.float() ** 2).sum().backward()
        x.grad = k.grad = None

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layers")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    a = p.parse_args()
    secs = [layer_seconds(s, k, a.steps, a.warmup, a.amp) for s, k in json.loads(a.layers)]
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "layer_s": [round(t, 5) for t in secs]}))


if __name__ == "__main__":
    main()
