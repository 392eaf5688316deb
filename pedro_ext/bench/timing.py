"""Median-of-repeats timing: warm-up first, CUDA events on a GPU (optionally CUDA-graph replay),
perf_counter on the CPU. The timed callable gets the repeat index so it can rotate its inputs."""
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int,
              cuda_graph: bool = False) -> float:
    if device.type == "cuda":
        return _cuda_ms(fn, warmup, repeats, cuda_graph)
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_ms(fn, warmup, repeats, cuda_graph):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(warmup):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if cuda_graph:
        # one graph per rotation slot, so replays still rotate their inputs
        graphs = []
        for i in range(min(repeats, 3)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(i)
            graphs.append(g)
        run = lambda i: graphs[i % len(graphs)].replay()  # noqa: E731
    else:
        run = fn
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(numel: int, dtype: torch.dtype, device: torch.device, warmup: int,
                       repeats: int) -> float:
    """The machine's measured copy bandwidth (read + write) for a tensor of numel elements."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
