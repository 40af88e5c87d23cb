"""Why B2 G16-GN@260 spent >87 s in warm-up on an H100: each step timed alone, cuDNN autotuner on/off."""
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

import run_benchmark as rb
from training.measure import synchronize

spec, bench, limit, steps, batch = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device = torch.device("cuda")
torch.backends.cudnn.benchmark = bench
torch.backends.cudnn.benchmark_limit = limit
args = rb.BenchmarkConfig(batch_size=batch, device="cuda")
row = rb.parse_row(spec)
rb.check_row(row, batch)
t = time.perf_counter()
prepared = rb.prepare_row(row, args, device)
print(f"{spec} cudnn.benchmark={bench} limit={limit} batch={batch}: built in {time.perf_counter() - t:.1f} s", flush=True)
times = []
for i in range(steps):
    t = time.perf_counter()
    prepared.step()
    synchronize(device)
    times.append(time.perf_counter() - t)
    print(f"  step {i + 1}: {times[-1]:.3f} s ({batch / times[-1]:.0f} img/s)", flush=True)
tail = sorted(times[3:])
if tail:
    print(f"  median of steps 4-{steps}: {tail[len(tail) // 2]:.4f} s = {batch / tail[len(tail) // 2]:.0f} img/s; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
