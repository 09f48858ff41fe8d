import torch
from torch.utils.flop_counter import FlopCounterMode
from benchmarks.model import ModelBenchConfig, _build
torch.set_num_threads(2)
cfg = ModelBenchConfig(vocab_size=256, dim=256, num_layers=4, num_heads=4, num_memory_modules=4, batch=8, seq_len=256, prompt_len=4, new_tokens=4, prefixes=(), backends=("torch",))
tok = torch.randint(0, 256, (8, 257)); x, y = tok[:, :-1], tok[:, 1:]
for name in ("transformer", "seed-hope", "paper-hope"):
    model = _build(cfg, name, "torch", torch.device("cpu"), 256)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fc:
        model(x, y)[1].backward()
    per = fc.get_flop_counts()
    ops = {}
    for mod, d in per.items():
        if mod == "Global":
            for k, v in d.items(): ops[str(k)] = v
    print(f"{name}: params {params/1e6:.2f}M  matmul GFLOP/step {fc.get_total_flops()/1e9:.2f}  by op " + ", ".join(f"{k} {v/1e9:.2f}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))
