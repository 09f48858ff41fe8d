import sys, torch, time
from torch.profiler import profile, ProfilerActivity
from benchmarks.model import ModelBenchConfig, _build
torch.set_num_threads(2)
name = sys.argv[1]; out = sys.argv[2]
cfg = ModelBenchConfig(vocab_size=256, dim=256, num_layers=4, num_heads=4, num_memory_modules=4, batch=8, seq_len=256, prompt_len=4, new_tokens=4, prefixes=(), backends=("torch",))
model = _build(cfg, name, "torch", torch.device("cpu"), 256)
params = [p for p in model.parameters()]
opt = torch.optim.AdamW(params, lr=1e-4)
tok = torch.randint(0, 256, (8, 257)); x, y = tok[:, :-1], tok[:, 1:]
def step():
    loss = model(x, y)[1]; loss.backward(); opt.step()
    for p in params: p.grad = None
step()
t0 = time.perf_counter(); step(); print(name, "step s", time.perf_counter() - t0)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    step()
s = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
s2 = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=70)
open(out, "w").write(s + "\n\n" + s2)
print(s)
