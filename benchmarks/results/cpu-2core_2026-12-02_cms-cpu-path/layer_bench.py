"""One layer forward + backward at B=8, T=256, dim 256, 4 heads (M=4): softmax attention, the delta-rule
and outer-rule CMS, the MLP. The layers take turns within each round (a drift in the machine's speed
reaches all of them alike); prints each layer's median and the median over rounds of its time over
the attention's of the same round.  PYTHONPATH=<tree> python layer_bench.py [rounds]"""
import statistics, sys, time
import torch
torch.set_num_threads(2); torch.manual_seed(0)
from hope.attention import SoftmaxAttention
from hope.cms import CMSLayer
from hope.layers import MLP

B, T, D, H, M = 8, 256, 256, 4, 4
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
x = torch.randn(B, T, D, requires_grad=True)
layers = {"softmax attention": SoftmaxAttention(D, H, backend="torch"),
          "delta-rule CMS (M=4)": CMSLayer(D, H, M, backend="torch"),
          "outer-rule CMS (M=4)": CMSLayer(D, H, M, update="outer", backend="torch"),
          "MLP (4x)": MLP(D, 4 * D)}
steps = {name: (lambda m=m, mlp=name.startswith("MLP"): (m(x) if mlp else m(x, None)).square().mean().backward())
         for name, m in layers.items()}
for f in steps.values():
    f(); f()
ms = {name: [] for name in steps}
for _ in range(rounds):
    for name, f in steps.items():
        t0 = time.perf_counter(); f(); ms[name].append(1e3 * (time.perf_counter() - t0))
att = ms["softmax attention"]
for name, t in ms.items():
    ratio = statistics.median(a / b for a, b in zip(t, att))
    print(f"{name:22s} fwd+bwd median {statistics.median(t):7.1f} ms (min {min(t):.1f})  x attention {ratio:.2f}",
          flush=True)
