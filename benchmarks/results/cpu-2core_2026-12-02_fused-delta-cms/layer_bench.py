"""One layer forward+backward at B=8, T=256, dim 256, H=4 (M=4): delta CMS vs softmax attention vs MLP."""
import sys, time, torch
torch.set_num_threads(2); torch.manual_seed(0)
from hope.cms import CMSLayer
from hope.attention import SoftmaxAttention
from hope.layers import MLP
B, T, D = 8, 256, 256
x = torch.randn(B, T, D, requires_grad=True)
layers = {"softmax attention": SoftmaxAttention(D, 4, backend="torch"),
          "delta-rule CMS (M=4)": CMSLayer(D, 4, 4, backend="torch"),
          "outer-rule CMS (M=4)": CMSLayer(D, 4, 4, update="outer", backend="torch"),
          "MLP": MLP(D, 4 * D)}
for name, m in layers.items():
    f = (lambda: m(x)) if name == "MLP" else (lambda: m(x, None))
    for _ in range(2):
        f().square().mean().backward()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); f().square().mean().backward(); ts.append(time.perf_counter() - t0)
    ts.sort(); print(f"{name:22s} fwd+bwd median {1e3*ts[3]:7.1f} ms (min {1e3*ts[0]:.1f})", flush=True)
