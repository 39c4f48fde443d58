import os, statistics, sys, time, torch
THR = int(os.environ.get("THR", "2")); torch.set_num_threads(THR)
import tokentm_fast.torch_ops.attention as ta
budgets = [int(float(x) * (1 << 20)) for x in sys.argv[1].split(",")]
reps = int(os.environ.get("REPS", "5"))
torch.manual_seed(0)
B, H, N, d = 1, 12, 4097, 64
scale = d ** -0.5
q, k, v, do = (torch.randn(B, H, N, d) for _ in range(4))
row = torch.rand(B, N)
o, lse = ta.flash_forward(q, k, v, scale)
res = {}
for r in range(reps):
    for bud in budgets:
        ta.CPU_TILE_BYTES = bud
        t0, c0 = time.perf_counter(), time.process_time()
        ta.flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=False)
        res.setdefault(bud, []).append((time.perf_counter() - t0, time.process_time() - c0))
for bud, v_ in res.items():
    w = [x[0] for x in v_]
    print(f"{bud / (1 << 20):5.1f} MB tile {ta.tile_shape(12, N, N, 4, budget=bud)}: wall median {statistics.median(w):.3f} s "
          f"(all {[round(x, 2) for x in w]}), cpu median {statistics.median(x[1] for x in v_):.3f} s", flush=True)
