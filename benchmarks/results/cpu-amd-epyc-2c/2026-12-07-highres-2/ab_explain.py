"""A/B of the whole explain (tokentm, N = 4097) with the flash twin's old and new attention.py, interleaved."""
import importlib.util, os, sys, time, torch
sys.path.insert(0, "benchmarks")
torch.set_num_threads(2)
import tokentm_fast as tf
import tokentm_fast.torch_ops.attention as new
from tokentm_fast.kernels._utils import AttentionKernels
from bench_models import random_images, random_vit
spec = importlib.util.spec_from_file_location("old_att", sys.argv[1]); old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
def triple(m):
    def backward(q, k, v, o, lse, do, scale, row=None, input_grads=True):
        return m.flash_backward(q, k, v, o, lse, do, scale, row=row, input_grads=input_grads)
    return lambda: AttentionKernels(m.flash_forward, backward, m.attention_rows)
orig = new.torch_attention
method = sys.argv[2]; reps = int(sys.argv[3])
model = random_vit("vit_base_patch16_224", "cpu", img_size=1024)
x, t = random_images(model, 1, "cpu")
small = random_vit("vit_base_patch16_224", "cpu", img_size=64); xs, ts = random_images(small, 1, "cpu")
tf.explain(small, xs, method=method, target=ts, backend="torch", attention="flash")
outs = {}
for r in range(reps):
    for name, m in (("old", old), ("new", None)):
        new.torch_attention = triple(old) if m is old else orig
        t0 = time.perf_counter()
        outs[name] = tf.explain(model, x, method=method, target=t, backend="torch", attention="flash")
        print(f"{method} {name}: {time.perf_counter() - t0:.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
print("max rel diff new vs old", float((outs["new"] - outs["old"]).norm() / outs["old"].norm()))
