"""What one `at::parallel_for` region costs, the unit the native decode step pays per product and
attention pass (~37 per token at batch 1).

    python research/parallel_region_cost.py

Builds a tiny extension with the native step's OpenMP flags (shares torch's libgomp) and times
regions of 72 items that do (almost) nothing, at torch's thread count and at one thread.
"""

from __future__ import annotations

import torch
from torch.utils import cpp_extension

from nanomoe.kernels.extension import FLAGS

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <chrono>
double region_us(int64_t regions) {
  std::vector<float> data(1024, 1.f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < regions; ++i) {
    at::parallel_for(0, 72, 1, [&](int64_t begin, int64_t end) {
      volatile float sink = 0.f;
      for (int64_t j = begin; j < end; ++j) sink += data[j];
    });
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / regions * 1e6;
}
"""


def main() -> None:
    module = cpp_extension.load_inline("nanomoe_region_cost", cpp_sources=SOURCE, functions=["region_us"],
                                       extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        runs = [module.region_us(2000) for _ in range(3)]
        print(f"{threads} thread(s): {', '.join(f'{r:.2f}' for r in runs)} us per region")


if __name__ == "__main__":
    main()
