"""Interleaved old/new timing of the flash twin's t-only pass (and rows / held dV) on one layer's tensors."""
import importlib.util, os, statistics, sys, time, torch
THR = int(os.environ.get("THR", "2")); torch.set_num_threads(THR)
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m); return m
old, new = load("old_att", sys.argv[1]), load("new_att", sys.argv[2])
cases = sys.argv[3].split(",") if len(sys.argv) > 3 else ["t"]
reps = int(os.environ.get("REPS", "5"))
torch.manual_seed(0)
B, H, N, d = 1, 12, 4097, 64
scale = d ** -0.5
q, k, v, do = (torch.randn(B, H, N, d) for _ in range(4))
row = torch.rand(B, N)
o, lse = new.flash_forward(q, k, v, scale)
calls = {
    "t": lambda m: m.flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=False)[3],
    "rows_p": lambda m: m.attention_rows(row, scale, q=q, k=k, lse=lse),
    "rows_dp": lambda m: m.attention_rows(row, 1.0, do=do, v=v),
    "dv": lambda m: m.flash_backward(q, k, v, o, lse, do, scale, input_grads="v")[2],
}
for c in cases:
    a, b = calls[c](old), calls[c](new)
    print(c, "rel diff new vs old", float((a - b).norm() / a.norm()), flush=True)
res = {}
for r in range(reps):
    for c in cases:
        for name, m in (("old", old), ("new", new)):
            t0, c0 = time.perf_counter(), time.process_time()
            calls[c](m)
            res.setdefault((c, name), []).append((time.perf_counter() - t0, time.process_time() - c0))
for (c, name), v_ in res.items():
    w = [x[0] for x in v_]
    print(f"{c:8s} {name}: wall median {statistics.median(w):.3f} s (all {[round(x, 2) for x in w]}), "
          f"cpu median {statistics.median(x[1] for x in v_):.3f} s", flush=True)
